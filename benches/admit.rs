//! The cost of the limits stage for one request, as the pipeline runs it:
//! the request's input tokens counted with the model's tokenizer and its
//! cost estimated, every applying rule reserved at once, then the
//! reservation settled with the usage and added to the ledger.
//!
//!     cargo bench --bench admit
//!
//! Four rules apply (a key's request rate, a tenant's token rate, a global
//! request rate and a tenant's daily dollar budget), over 1,000 keys in 100
//! tenants. Issue 5's targets: under 30 µs median in memory, and exactly
//! one Redis round trip per request. The Redis part needs the machine's
//! Redis at 127.0.0.1:6379 and says so when it cannot reach it.

// A benchmark that cannot set itself up should stop loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Instant;

use warden::config::Config;
use warden::limits::admit::{Limiter, Observed, estimate};
use warden::limits::rules::Subject;
use warden::route::Operation;

const BATCH: usize = 1_000;
const BATCHES: usize = 31;
const KEYS: usize = 1_000;

fn config(store: &str) -> Config {
    let yaml = format!(
        r#"
listen: {{ address: 127.0.0.1:0 }}
audit: {{ file: /dev/null }}
upstreams: [{{ name: up, url: "http://127.0.0.1:9" }}]
models:
  - name: m
    protocol: openai
    upstream: up
    limits:
      prices: {{ input: "$2.50", output: "$10" }}
      default_max_tokens: 256
limits:
{store}
  rules:
    - {{ name: key-rate, key: [api_key], rate: 1M/min }}
    - {{ name: tenant-tokens, key: [tenant], unit: total_tokens, rate: 1000M/min }}
    - {{ name: global, key: [global], rate: 1000M/s }}
    - {{ name: spend, key: [tenant], unit: dollars, budget: "$1000000", per: day }}
"#
    );
    Config::parse(&yaml, std::path::Path::new(".")).expect("bench config")
}

/// A typical chat request: a system prompt and a question, ~60 tokens.
fn body() -> serde_json::Value {
    serde_json::json!({
        "model": "m",
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "You are a careful assistant for a payments company. Answer briefly and cite the policy section you rely on."},
            {"role": "user", "content": "A customer disputes a card-present transaction of $412.50 made yesterday in Lisbon. Which evidence do we need before we refund it?"}
        ]
    })
}

struct Names {
    keys: Vec<String>,
    tenants: Vec<String>,
    ids: Vec<String>,
}

fn names() -> Names {
    Names {
        keys: (0..KEYS).map(|i| format!("key-{i}")).collect(),
        tenants: (0..KEYS / 10).map(|i| format!("tenant-{i}")).collect(),
        ids: (0..BATCH).map(|i| format!("req-{i:08}")).collect(),
    }
}

/// One request through the stage; returns the time it took.
async fn one(limiter: &Arc<Limiter>, config: &Config, names: &Names, body: &mut serde_json::Value, i: usize) {
    let limits = config.limits.as_ref().unwrap();
    let model = &config.models["m"];
    let est = estimate(
        limits,
        &model.limits,
        Operation::ChatCompletions,
        false,
        None,
        Some(body),
    )
    .unwrap();
    let subject = Subject {
        principal: &names.keys[i % KEYS],
        api_key: Some(&names.keys[i % KEYS]),
        client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        tenant: Some(&names.tenants[i % (KEYS / 10)]),
        model: "m",
        tier: None,
        high_value: false,
    };
    let admission = limiter
        .admit(limits, &subject, est.demand, model.limits.prices, &names.ids[i % BATCH])
        .await
        .expect("admitted");
    admission.settle(&Observed {
        upstream_answered: true,
        prompt_tokens: Some(est.demand.input_tokens),
        cached_tokens: None,
        completion_tokens: Some(120),
        counted_output_tokens: None,
        compute: None,
    });
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let names = names();
    let mut body = body();

    // In memory.
    let memory_config = config("");
    let limiter = Arc::new(rt.block_on(Limiter::new(None)).unwrap());
    let mut i = 0;
    let memory = support::median_per_call(BATCH, BATCHES, || {
        rt.block_on(one(&limiter, &memory_config, &names, &mut body, i));
        i += 1;
    });
    // The parts, to show where the time goes.
    let limits = memory_config.limits.as_ref().unwrap();
    let model = &memory_config.models["m"];
    let counting = support::median_per_call(BATCH, BATCHES, || {
        std::hint::black_box(
            estimate(
                limits,
                &model.limits,
                Operation::ChatCompletions,
                false,
                None,
                Some(&mut body),
            )
            .unwrap(),
        );
    });
    println!("limits stage, in memory (4 rules, tokens counted with o200k_base):");
    println!("  median per request            {:>8.2} µs", memory * 1e6);
    println!("    of which counting/estimate  {:>8.2} µs", counting * 1e6);
    println!(
        "  target                        under 30 µs: {}",
        if memory < 30e-6 { "MET" } else { "NOT MET" }
    );

    // In Redis.
    let prefix = format!("warden_bench_{}", uuid::Uuid::now_v7().simple());
    let redis_config = config(&format!(
        "  store: redis\n  redis: {{ url: \"redis://127.0.0.1:6379\", prefix: {prefix}, timeout: 1s }}"
    ));
    let limiter = match rt.block_on(Limiter::new(redis_config.limits.as_ref().unwrap().redis.as_ref())) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            println!("limits stage, Redis: skipped, Redis not reachable at 127.0.0.1:6379 ({e})");
            return;
        }
    };
    let before = limiter.redis_round_trips().unwrap();
    let started = Instant::now();
    let mut i = 0;
    let redis = support::median_per_call(BATCH, BATCHES, || {
        rt.block_on(one(&limiter, &redis_config, &names, &mut body, i));
        i += 1;
    });
    let elapsed = started.elapsed();
    let trips = limiter.redis_round_trips().unwrap() - before;
    println!("limits stage, Redis at 127.0.0.1:6379 (one request at a time, settlements carried by the next check):");
    println!("  median per request            {:>8.2} µs", redis * 1e6);
    println!(
        "  round trips per request       {:>8.3} ({trips} for {i} requests in {:.1} s)",
        trips as f64 / i as f64,
        elapsed.as_secs_f64()
    );
}
