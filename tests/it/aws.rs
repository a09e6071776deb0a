//! AWS IAM callers end to end: a real SigV4 signature (made with AWS's own
//! signer) over `sts:GetCallerIdentity`, forwarded by Warden to an
//! in-process STS stand-in that verifies the signature by signing the
//! request it received again with the caller's secret.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use base64::Engine;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;

use crate::common::*;

const SERVER_ID: &str = "warden.acme.example";
const BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
/// Access key id → (secret, the ARN STS reports for it).
const ACCOUNTS: [(&str, &str, &str); 2] = [
    (
        "AKIDBATCH",
        "batch-secret-key",
        "arn:aws:sts::123456789012:assumed-role/batch-scorer/i-0abc",
    ),
    (
        "AKIDOTHER",
        "other-secret-key",
        "arn:aws:sts::123456789012:assumed-role/unknown-role/x",
    ),
];

/// The signature of a request, computed with AWS's signer.
fn signature(
    url: &str,
    headers: &[(String, String)],
    body: &str,
    akid: &str,
    secret: &str,
    time: SystemTime,
) -> (String, String) {
    let identity = Credentials::new(akid, secret, None, None, "test").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("sts")
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let signable = SignableRequest::new(
        "POST",
        url,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(body.as_bytes()),
    )
    .unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    let mut request = http::Request::builder().uri(url).body(()).unwrap();
    instructions.apply_to_request_http1x(&mut request);
    let header = |name: &str| request.headers()[name].to_str().unwrap().to_owned();
    (header("authorization"), header("x-amz-date"))
}

/// The `x-warden-aws-iam` header a caller with these credentials sends.
fn aws_header(sts: &str, server_id: Option<&str>, body: &str, akid: &str, secret: &str) -> String {
    let mut headers = vec![(
        "content-type".to_owned(),
        "application/x-www-form-urlencoded; charset=utf-8".to_owned(),
    )];
    if let Some(id) = server_id {
        headers.push(("x-warden-server-id".to_owned(), id.to_owned()));
    }
    let (authorization, date) = signature(sts, &headers, body, akid, secret, SystemTime::now());
    let mut all: serde_json::Map<String, serde_json::Value> = headers.into_iter().map(|(k, v)| (k, json!(v))).collect();
    all.insert("authorization".into(), json!(authorization));
    all.insert("x-amz-date".into(), json!(date));
    let signed = json!({"method": "POST", "url": sts, "body": body, "headers": all});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signed.to_string())
}

/// An STS stand-in that accepts a request only if its SigV4 signature is
/// the one the caller's secret gives.
async fn sts_stand_in(calls: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let me = Arc::new(std::sync::Mutex::new(None::<std::net::SocketAddr>));
    let addr_slot = Arc::clone(&me);
    let addr = spawn_upstream(move |req: hyper::Request<hyper::body::Incoming>| {
        let calls = Arc::clone(&calls);
        let me = *addr_slot.lock().unwrap();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let (parts, body) = req.into_parts();
            let body = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
            let header = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let authorization = header("authorization");
            let field = |name: &str| {
                authorization
                    .split([' ', ','])
                    .find_map(|p| p.strip_prefix(name))
                    .unwrap_or("")
                    .to_owned()
            };
            let akid = field("Credential=").split('/').next().unwrap_or("").to_owned();
            let signed_headers = field("SignedHeaders=");
            let account = ACCOUNTS.iter().find(|(id, _, _)| *id == akid);
            let date = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", header("x-amz-date"))
                .ok()
                .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
                .map(|z| UNIX_EPOCH + Duration::from_secs(z.timestamp().as_second().unsigned_abs()));
            let verified = match (account, date) {
                (Some((id, secret, _)), Some(time)) => {
                    let headers: Vec<(String, String)> = signed_headers
                        .split(';')
                        .filter(|h| !matches!(*h, "host" | "x-amz-date"))
                        .map(|h| (h.to_owned(), header(h)))
                        .collect();
                    let url = format!("http://{}/", me.unwrap());
                    signature(&url, &headers, &body, id, secret, time).0 == authorization
                }
                _ => false,
            };
            if !verified {
                return hyper::Response::builder()
                    .status(403)
                    .body(full("<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code></Error></ErrorResponse>"))
                    .unwrap();
            }
            let arn = account.map_or("", |a| a.2);
            hyper::Response::builder()
                .header("content-type", "text/xml")
                .body(full(format!(
                    "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>{arn}</Arn><UserId>AROA:i-0abc</UserId><Account>123456789012</Account></GetCallerIdentityResult></GetCallerIdentityResponse>"
                )))
                .unwrap()
        }
    })
    .await;
    *me.lock().unwrap() = Some(addr);
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_callers_are_proven_by_sts() {
    let calls = Arc::new(AtomicUsize::new(0));
    let sts = sts_stand_in(Arc::clone(&calls)).await;
    let sts_url = format!("http://{sts}/");
    let (chat, fraud) = demo_upstreams().await;
    let yaml = config(chat, fraud, "").replace(
        "api_keys:",
        &format!(
            "aws:\n  sts_endpoint: {sts_url}\n  server_id: {SERVER_ID}\n  principals:\n    - arn: arn:aws:iam::123456789012:role/batch-scorer\n      tenant: acme\n      models: [demo-chat]\napi_keys:"
        ),
    );
    let gw = TestGateway::start(&yaml).await;
    let send = |header: String| {
        let gw = &gw;
        async move {
            client()
                .post(format!("{}/v1/chat/completions", gw.url))
                .header("x-warden-aws-iam", header)
                .json(&chat_body("demo-chat", false))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let (akid, secret, _) = ACCOUNTS[0];
    let valid = aws_header(&sts_url, Some(SERVER_ID), BODY, akid, secret);
    assert_eq!(send(valid.clone()).await, StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(send(valid).await, StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a proven caller is cached");

    // STS refuses a signature made with the wrong secret.
    assert_eq!(
        send(aws_header(&sts_url, Some(SERVER_ID), BODY, akid, "guessed")).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // A real signature of a principal nobody configured.
    let (other, other_secret, _) = ACCOUNTS[1];
    assert_eq!(
        send(aws_header(&sts_url, Some(SERVER_ID), BODY, other, other_secret)).await,
        StatusCode::UNAUTHORIZED
    );
    // Refused before STS: made for another server, no server id, another action.
    let before = calls.load(Ordering::SeqCst);
    for header in [
        aws_header(&sts_url, Some("other-service"), BODY, akid, secret),
        aws_header(&sts_url, None, BODY, akid, secret),
        aws_header(
            &sts_url,
            Some(SERVER_ID),
            "Action=GetSessionToken&Version=2011-06-15",
            akid,
            secret,
        ),
        "not base64 json".to_owned(),
    ] {
        assert_eq!(send(header).await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "nothing unacceptable is forwarded to STS"
    );

    let records = gw.audit(8).await;
    assert_eq!(records[0]["auth_method"], "aws_iam");
    assert_eq!(records[0]["principal_kind"], "service");
    assert_eq!(records[0]["principal"], "arn:aws:iam::123456789012:role/batch-scorer");
    assert_eq!(records[0]["tenant"], "acme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_unreachable_refuses_with_503() {
    let dead = dead_address().await;
    let sts_url = format!("http://{dead}/");
    let (chat, fraud) = demo_upstreams().await;
    let yaml = config(chat, fraud, "").replace(
        "api_keys:",
        &format!(
            "aws:\n  sts_endpoint: {sts_url}\n  server_id: {SERVER_ID}\n  principals:\n    - arn: arn:aws:iam::123456789012:role/batch-scorer\n      tenant: acme\n      models: [demo-chat]\napi_keys:"
        ),
    );
    let gw = TestGateway::start(&yaml).await;
    let (akid, secret, _) = ACCOUNTS[0];
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header(
            "x-warden-aws-iam",
            aws_header(&sts_url, Some(SERVER_ID), BODY, akid, secret),
        )
        .json(&chat_body("demo-chat", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "authentication_unavailable");
}
