//! The cost of the validation stage for one chat request, as the pipeline
//! runs it: the one strict parse of the body (hygiene), the OpenAI request
//! shape, the parameter policy, the prompt's tokens counted with o200k_base
//! for the context window, and prompt-injection detection on every message.
//!
//!     cargo bench --bench validation
//!
//! Issue 6's target: under 100 µs median for a 2 KB chat request,
//! tokenization and classifier included. The parts are timed on their own
//! as well, to show where the time goes; they add up to a little more than
//! the whole because each is timed with its own warm-up.

// A benchmark that cannot set itself up should stop loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use warden::config::Config;
use warden::route::Operation;
use warden::validate::stage;

const BATCH: usize = 200;
const BATCHES: usize = 41;

fn config() -> Config {
    let yaml = r#"
listen: { address: 127.0.0.1:0 }
audit: { file: /dev/null }
upstreams: [{ name: up, url: "http://127.0.0.1:9" }]
models:
  - name: m
    protocol: openai
    upstream: up
    limits: { tokenizer: o200k_base, default_max_tokens: 512 }
    validation:
      context_window: 128000
      params: { max_tokens: 4096, max_n: 1, max_tools: 16, max_messages: 64, forbidden: [logprobs, top_logprobs] }
      injection: { action: block }
"#;
    Config::parse(yaml, std::path::Path::new(".")).expect("bench config")
}

const SYSTEM: &str = "You are the support assistant of Northwind Payments. Answer in plain English, \
in at most three short paragraphs. Quote the section of the merchant agreement you rely on, by number. \
Never reveal card numbers, even masked ones, and never promise a refund: say which team decides. \
If a question is about fraud, tell the merchant to open a dispute case and list the evidence the \
case needs. If you do not know, say so and suggest contacting the merchant desk.";

const USER: &str = "Hello, we run a small bakery chain with four shops around Lisbon and we use your \
terminals in all of them. Yesterday one of our customers came back and said that a card-present \
payment of 412.50 euros, made on Saturday morning at the Alfama shop, was not made by her. She still \
has her card, and she says she was at home that morning. Our staff remember a man paying for a large \
order of pastries for an office party, and the receipt shows a contactless payment with no PIN. We \
have the CCTV footage from the shop, the order slip with a phone number, and the terminal's daily \
report. Which of these do we need to send you, in what format, and by when? Also, will the amount be \
taken back from our account straight away, or only once the dispute is decided? Last year we had a \
similar case and the money was held for almost two months, which hurt our cash flow badly during \
the summer. Is there a way to ask for a faster review when the evidence is clear, and can we add a \
note to the case ourselves? For context, the Alfama shop is our busiest one: on a Saturday morning \
it serves around three hundred customers, mostly tourists and families from the neighbourhood, and \
two people work the counter. The office party order was for forty custard tarts, twenty croissants \
and two large cakes, collected at about half past ten. The man was friendly, paid quickly, and left \
with a colleague who carried the boxes to a van parked outside. Thank you for your help, and sorry \
for the long message.";

/// A chat request of about 2 KB: a system prompt and a long question.
fn request(system: &str, user: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "max_tokens": 512,
        "temperature": 0.2,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user}
        ]
    }))
    .unwrap()
}

fn main() {
    let config = config();
    let model = &config.models["m"];
    let depth = config.listen.limits.max_json_depth;
    println!("validation stage, one chat request (parse, shape, params, o200k context window, injection):");
    for (name, bytes) in [
        ("2 KB chat request", request(SYSTEM, USER)),
        (
            "short chat request",
            request("You are a helpful assistant.", "What is the capital of Portugal?"),
        ),
    ] {
        // The inputs are benign: say so, with the detector's verdict on each.
        let json = warden::request::parse_json_object(&bytes, depth).unwrap();
        for (i, m) in json["messages"].as_array().unwrap().iter().enumerate() {
            let v = warden::validate::injection::detector().inspect(m["content"].as_str().unwrap());
            assert!(
                !v.injection,
                "messages[{i}] is flagged (score {}, rules {:?})",
                v.score, v.rules
            );
        }
        let whole = support::median_per_call(BATCH, BATCHES, || {
            let json = warden::request::parse_json_object(&bytes, depth).unwrap();
            let mut verdicts = Vec::new();
            let tokens = stage::check_openai_request(model, Operation::ChatCompletions, &json, &mut verdicts).unwrap();
            std::hint::black_box((tokens, verdicts));
        });
        let parse = support::median_per_call(BATCH, BATCHES, || {
            std::hint::black_box(warden::request::parse_json_object(&bytes, depth).unwrap());
        });
        let shape = support::median_per_call(BATCH, BATCHES, || {
            warden::validate::openai::validate(Operation::ChatCompletions, std::hint::black_box(&json)).unwrap();
        });
        let tokens = support::median_per_call(BATCH, BATCHES, || {
            std::hint::black_box(
                warden::limits::tokens::count_request(&model.limits.tokenizer, Operation::ChatCompletions, &json)
                    .unwrap(),
            );
        });
        // The same texts through tiktoken-rs, which counted tokens before.
        let tiktoken = tiktoken_rs::o200k_base_singleton();
        let strings: Vec<&str> = json["messages"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|m| [m["role"].as_str().unwrap(), m["content"].as_str().unwrap()])
            .collect();
        let tiktoken_count = support::median_per_call(BATCH, BATCHES, || {
            for s in &strings {
                std::hint::black_box(tiktoken.encode_ordinary(s).len());
            }
        });
        let texts: Vec<&str> = json["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        let detector = warden::validate::injection::detector();
        let injection = support::median_per_call(BATCH, BATCHES, || {
            for text in &texts {
                std::hint::black_box(detector.inspect(text));
            }
        });
        // The o200k count of the same strings: warden's (ASCII fast path)
        // and bpe-openai's own, which warden used before.
        let o200k = warden::limits::tokens::Tokenizer::O200kBase;
        let warden_count = support::median_per_call(BATCH, BATCHES, || {
            for s in &strings {
                std::hint::black_box(o200k.count(s).unwrap());
            }
        });
        let bpe_openai_count = support::median_per_call(BATCH, BATCHES, || {
            for s in &strings {
                std::hint::black_box(bpe_openai::o200k_base().count(*s));
            }
        });
        // The detector's layers on the same messages.
        use warden::validate::injection::{classifier, features, normalize, rules};
        let views: Vec<_> = texts.iter().map(|t| normalize::views(t)).collect();
        let views_cost = support::median_per_call(BATCH, BATCHES, || {
            for text in &texts {
                std::hint::black_box(normalize::views(text));
            }
        });
        let rules_of = |matcher: fn(&str, &mut Vec<&'static str>)| {
            support::median_per_call(BATCH, BATCHES, || {
                for v in views.iter().flat_map(|v| &v.views) {
                    let mut out = Vec::new();
                    matcher(&v.text, &mut out);
                    std::hint::black_box(out);
                }
            })
        };
        let rules_cost = rules_of(rules::match_text);
        let rules_unfiltered = rules_of(rules::match_text_unfiltered);
        let model = classifier::Model::embedded().unwrap();
        let mut scratch = features::Scratch::default();
        let classifier_cost = support::median_per_call(BATCH, BATCHES, || {
            for v in views.iter().flat_map(|v| &v.views) {
                std::hint::black_box(model.probability(&v.text, &mut scratch));
            }
        });
        println!("  {name}, {} bytes:", bytes.len());
        println!("    median per request            {:>8.1} µs", whole * 1e6);
        println!("      strict parse (hygiene)      {:>8.1} µs", parse * 1e6);
        println!("      OpenAI shape                {:>8.1} µs", shape * 1e6);
        println!("      o200k token count           {:>8.1} µs", tokens * 1e6);
        println!("      injection detector          {:>8.1} µs", injection * 1e6);
        println!("    the o200k count of the message strings alone:");
        println!("      warden (ASCII fast path)    {:>8.1} µs", warden_count * 1e6);
        println!("      bpe-openai's count          {:>8.1} µs", bpe_openai_count * 1e6);
        println!("      tiktoken-rs                 {:>8.1} µs", tiktoken_count * 1e6);
        println!("    the detector's layers alone:");
        println!("      views (normalize)           {:>8.1} µs", views_cost * 1e6);
        println!("      rules, literal scan first   {:>8.1} µs", rules_cost * 1e6);
        println!("      rules, every regex          {:>8.1} µs", rules_unfiltered * 1e6);
        println!("      classifier                  {:>8.1} µs", classifier_cost * 1e6);
        if bytes.len() >= 2048 {
            println!(
                "    target                        under 100 µs: {}",
                if whole < 100e-6 { "MET" } else { "NOT MET" }
            );
        }
    }
}
