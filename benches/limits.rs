//! The cost of the rate-limit stores for one request: four rules (a
//! principal's request rate, its tenant's token rate, a global request rate
//! and a daily dollar budget) decided together, then settled.
//!
//!     cargo bench --bench limits
//!
//! Issue 5's targets are for the whole limits stage, which is not on the
//! request path yet: under 30 µs median in memory, and exactly one Redis
//! round trip per request. This measures the stores that stage will call.
//! The Redis part needs the machine's Redis at 127.0.0.1:6379 and says so
//! when it cannot reach it.

// A benchmark that cannot set itself up should stop loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use warden::limits::gcra::Rate;
use warden::limits::memory::MemoryStore;
use warden::limits::redis::RedisStore;

const BATCH: usize = 1_000;
const BATCHES: usize = 51;
const PRINCIPALS: usize = 1_000;
const REDIS: &str = "redis://127.0.0.1:6379";

struct Rules {
    per_principal: Rate,
    per_tenant_tokens: Rate,
    global: Rate,
    dollars: Rate,
    principal_keys: Vec<String>,
    dollar_keys: Vec<String>,
    tenant_keys: Vec<String>,
}

impl Rules {
    fn new() -> Rules {
        Rules {
            // Generous limits: the benchmark measures deciding, not refusing.
            per_principal: Rate::new(1_000_000, Duration::from_secs(60), 1_000_000).unwrap(),
            per_tenant_tokens: Rate::new(1_000_000_000, Duration::from_secs(60), 1_000_000_000).unwrap(),
            global: Rate::new(1_000_000_000, Duration::from_secs(1), 1_000_000_000).unwrap(),
            // $1,000,000 a day, in micro-dollars.
            dollars: Rate::new(1_000_000_000_000, Duration::from_secs(86_400), 1_000_000_000_000).unwrap(),
            principal_keys: (0..PRINCIPALS)
                .map(|i| format!("principal:user-{i}:requests"))
                .collect(),
            dollar_keys: (0..PRINCIPALS).map(|i| format!("principal:user-{i}:dollars")).collect(),
            tenant_keys: (0..PRINCIPALS / 10).map(|i| format!("tenant:t-{i}:tokens")).collect(),
        }
    }

    /// The four rules of request `i`: 1 request, 500 tokens, 1 request, 7,500 µ$.
    fn of(&self, i: usize) -> [(&str, Rate, u64); 4] {
        [
            (self.principal_keys[i % PRINCIPALS].as_str(), self.per_principal, 1),
            (
                self.tenant_keys[i % (PRINCIPALS / 10)].as_str(),
                self.per_tenant_tokens,
                500,
            ),
            ("global:requests", self.global, 1),
            (self.dollar_keys[i % PRINCIPALS].as_str(), self.dollars, 7_500),
        ]
    }
}

fn now_ns(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn memory(rules: &Rules) {
    let store = MemoryStore::new();
    let epoch = Instant::now();
    let mut i = 0usize;
    let check = support::median_per_call(BATCH, BATCHES, || {
        i += 1;
        black_box(store.check_all(now_ns(epoch), &rules.of(i)));
    });
    let mut j = 0usize;
    let both = support::median_per_call(BATCH, BATCHES, || {
        j += 1;
        let now = now_ns(epoch);
        let four = rules.of(j);
        black_box(store.check_all(now, &four));
        // Settled with the actual cost: fewer tokens and dollars than reserved.
        let settled = [(four[1].0, four[1].1, 500, 320), (four[3].0, four[3].1, 7_500, 4_100)];
        store.settle_all(now, &settled);
    });
    println!(
        "  memory: check 4 rules         {:>8.2} µs   (target for the whole stage < 30 µs)",
        check * 1e6
    );
    println!("  memory: check + settle        {:>8.2} µs", both * 1e6);
}

/// Scripts run so far (`EVALSHA` and `EVAL` calls): each is one round trip
/// from a client. Commands a script runs inside Redis are counted apart.
async fn scripts_run(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next())
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

async fn redis(rules: &Rules) {
    let client = match redis::Client::open(REDIS) {
        Ok(c) => c,
        Err(e) => return println!("  redis: skipped ({e})"),
    };
    let mut probe = match tokio::time::timeout(Duration::from_secs(2), client.get_multiplexed_async_connection()).await
    {
        Ok(Ok(c)) => c,
        _ => return println!("  redis: skipped (not reachable at 127.0.0.1:6379)"),
    };
    let prefix = format!("warden-bench-{}", uuid::Uuid::now_v7().simple());
    let store = RedisStore::connect(REDIS, &prefix).await.unwrap();
    // Warm up (loads the script: the first call may be EVALSHA then EVAL).
    for i in 0..200 {
        store.check_all(&rules.of(i)).await.unwrap();
    }
    const N: usize = 5_000;
    let before = scripts_run(&mut probe).await;
    let mut times = Vec::with_capacity(N);
    for i in 0..N {
        let started = Instant::now();
        black_box(store.check_all(&rules.of(i)).await.unwrap());
        times.push(started.elapsed());
    }
    let after = scripts_run(&mut probe).await;
    times.sort();
    // Nothing else runs scripts against this Redis during the benchmark.
    let per_request = (after - before) as f64 / N as f64;
    println!(
        "  redis:  check 4 rules         {:>8.2} µs median, {:.0} µs p99, {:.3} scripts (round trips) per request (target: exactly 1)",
        times[N / 2].as_secs_f64() * 1e6,
        times[N * 99 / 100].as_secs_f64() * 1e6,
        per_request
    );
}

fn main() {
    let rules = Rules::new();
    println!("limits stores, one request of 4 rules ({BATCHES} batches of {BATCH}, medians):");
    memory(&rules);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(redis(&rules));
}
