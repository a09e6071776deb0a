//! The official-shaped OpenAI SDK (`async-openai`), unchanged, pointed at
//! Warden: every call works as it would against OpenAI, and Warden's errors
//! surface as the SDK's errors.

use std::sync::Arc;
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use async_openai::types::embeddings::CreateEmbeddingRequestArgs;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};
use tokio::time::timeout;

use crate::common::*;

const PROMPT: &str = "Hello Warden, how are you?";

fn sdk(gw: &TestGateway, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", gw.url))
            .with_api_key(key),
    )
}

fn chat_request(prompt: &str) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model("demo-chat")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(prompt)
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap()
}

const LIMIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_through_the_sdk() {
    let gw = demo_gateway().await;
    let client = sdk(&gw, ACME);
    let response = timeout(LIMIT, client.chat().create(chat_request(PROMPT)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.object, "chat.completion");
    assert_eq!(response.model, "demo-chat");
    assert_eq!(response.choices.len(), 1);
    let content = response.choices[0].message.content.as_deref().unwrap();
    assert!(content.contains("Hello"), "{content}");
    assert!(content.contains(PROMPT), "the simulator quotes the prompt: {content}");
    let usage = response.usage.unwrap();
    assert!(usage.total_tokens > 0);
    assert_eq!(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);

    let records = gw.audit(1).await;
    assert_eq!(records[0]["status"], 200);
    assert_eq!(records[0]["usage"]["total_tokens"], usage.total_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_through_the_sdk_matches_the_unstreamed_answer() {
    let gw = demo_gateway().await;
    let client = sdk(&gw, ACME);
    let whole = timeout(LIMIT, client.chat().create(chat_request(PROMPT)))
        .await
        .unwrap()
        .unwrap();
    let expected = whole.choices[0].message.content.clone().unwrap();

    let mut request = chat_request(PROMPT);
    request.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let mut stream = timeout(LIMIT, client.chat().create_stream(request))
        .await
        .unwrap()
        .unwrap();
    let (mut content, mut chunks, mut usage) = (String::new(), 0, None);
    timeout(LIMIT, async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            assert_eq!(chunk.object, "chat.completion.chunk");
            chunks += 1;
            for choice in &chunk.choices {
                content.push_str(choice.delta.content.as_deref().unwrap_or(""));
            }
            if let Some(u) = chunk.usage {
                assert!(chunk.choices.is_empty(), "the usage chunk has no choices");
                usage = Some(u);
            }
        }
    })
    .await
    .expect("stream did not end");
    assert!(chunks > 3, "expected word-by-word chunks, got {chunks}");
    assert_eq!(content, expected);
    let usage = usage.expect("no usage chunk");
    assert_eq!(Some(&usage), whole.usage.as_ref());

    let records = gw.audit(2).await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[1]["stream"], true);
    assert_eq!(records[1]["outcome"], "completed");
    assert_eq!(records[1]["usage"]["total_tokens"], usage.total_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_and_models_through_the_sdk() {
    let gw = demo_gateway().await;
    let client = sdk(&gw, ACME);
    let request = CreateEmbeddingRequestArgs::default()
        .model("demo-chat")
        .input("The food was delicious")
        .dimensions(16u32)
        .build()
        .unwrap();
    let response = timeout(LIMIT, client.embeddings().create(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.data.len(), 1);
    assert_eq!(response.data[0].index, 0);
    assert_eq!(response.data[0].embedding.len(), 16);
    let norm: f32 = response.data[0].embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "not a unit vector: {norm}");

    let models = timeout(LIMIT, client.models().list()).await.unwrap().unwrap();
    let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert!(ids.contains(&"demo-chat"), "{ids:?}");

    // globex may call demo-chat only, and sees only that.
    let models = timeout(LIMIT, sdk(&gw, GLOBEX).models().list()).await.unwrap().unwrap();
    let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["demo-chat"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_an_sdk_api_error_and_is_not_retried() {
    let gw = demo_gateway().await;
    let client = sdk(&gw, "wdn_not_a_real_key_0000000000");
    let err = timeout(LIMIT, client.chat().create(chat_request(PROMPT)))
        .await
        .expect("the SDK did not give up")
        .expect_err("a wrong key was accepted");
    let e = match err {
        OpenAIError::ApiError(e) => e,
        other => panic!("expected an API error, got {other:?}"),
    };
    assert_eq!(e.status_code.as_u16(), 401);
    assert_eq!(e.api_error.code.as_deref(), Some("invalid_api_key"));
    assert_eq!(e.api_error.r#type.as_deref(), Some("authentication_error"));
    assert_eq!(e.api_error.message, "invalid API key");

    // A request with a good key afterwards: once its record is in, any retry
    // of the refused one would be too (records are written in order).
    timeout(LIMIT, sdk(&gw, ACME).models().list()).await.unwrap().unwrap();
    let records = gw.audit(2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    let refused: Vec<&Value> = records.iter().filter(|r| r["status"] == 401).collect();
    assert_eq!(refused.len(), 1, "the refused request was retried: {records:?}");
    assert_eq!(refused[0]["reject_reason"], "invalid_api_key");
    assert_eq!(records[1]["status"], 200);
}

const CHUNK: &str = "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\
    \"model\":\"demo-chat\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"first\"},\
    \"finish_reason\":null}]}\n\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_warden_cuts_off_is_an_error_in_the_sdk() {
    // One chunk, then silence longer than the harness's idle_timeout (500ms).
    let never = Arc::new(Notify::new());
    let upstream = spawn_upstream(move |_req| {
        let never = Arc::clone(&never);
        async move {
            let (tx, rx) = mpsc::channel::<Bytes>(2);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(CHUNK.as_bytes())).await;
                let _ = timeout(Duration::from_secs(4), never.notified()).await;
                drop(tx);
            });
            sse_response(rx)
        }
    })
    .await;
    let gw = TestGateway::start(&config(upstream, upstream, "")).await;
    let client = sdk(&gw, ACME);
    let mut stream = timeout(LIMIT, client.chat().create_stream(chat_request(PROMPT)))
        .await
        .unwrap()
        .unwrap();

    let first = timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("first chunk not relayed")
        .expect("stream ended early")
        .unwrap();
    assert_eq!(first.choices[0].delta.content.as_deref(), Some("first"));

    let next = timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("the SDK stream hung after the upstream went silent");
    match next {
        Some(Err(OpenAIError::JSONDeserialize(_, data))) => {
            let event: Value = serde_json::from_str(&data).unwrap();
            assert_eq!(event["error"]["code"], "upstream_timeout", "{data}");
            assert_eq!(event["error"]["type"], "api_error", "{data}");
        }
        Some(Err(other)) => panic!("unexpected error kind: {other:?}"),
        Some(Ok(chunk)) => panic!("a cut-off stream yielded a chunk: {chunk:?}"),
        None => panic!("a cut-off stream ended without an error"),
    }
    let after = timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("stream not closed");
    assert!(after.is_none(), "{after:?}");

    let records = gw.audit(1).await;
    assert_eq!(records[0]["outcome"], "upstream_idle_timeout");
}
