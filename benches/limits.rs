//! The cost of the limit stores for one request: four rules (a principal's
//! request rate, its tenant's token rate, a global request rate and a daily
//! dollar budget, a calendar window) decided together, then settled with a
//! ledger entry.
//!
//!     cargo bench --bench limits
//!
//! Issue 5's targets are for the whole limits stage: under 30 µs median in
//! memory, and exactly one Redis round trip per request. This measures the
//! stores that stage calls. The Redis part needs the machine's Redis at
//! 127.0.0.1:6379 and says so when it cannot reach it.

// A benchmark that cannot set itself up should stop loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use warden::limits::gcra::Rate;
use warden::limits::memory::MemoryStore;
use warden::limits::redis::RedisStore;
use warden::limits::store::{Charge, LedgerEntry, LedgerUsage, Limit, Settlement};

const BATCH: usize = 1_000;
const BATCHES: usize = 51;
const PRINCIPALS: usize = 1_000;
const REDIS: &str = "redis://127.0.0.1:6379";
const DAY_NS: u64 = 86_400 * 1_000_000_000;

struct Rules {
    per_principal: Limit,
    per_tenant_tokens: Limit,
    global: Limit,
    dollars: Limit,
    day: String,
    principals: Vec<String>,
    principal_keys: Vec<String>,
    dollar_keys: Vec<String>,
    tenants: Vec<String>,
    tenant_keys: Vec<String>,
}

fn unix_ns() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()).unwrap()
}

impl Rules {
    fn new() -> Rules {
        let rate = |amount, period, burst| Limit::Rate(Rate::new(amount, period, burst).unwrap());
        // Today's window (UTC); its start is in the key.
        let today = unix_ns() / DAY_NS;
        let day = jiff::Timestamp::from_second(i64::try_from(today * 86_400).unwrap())
            .unwrap()
            .strftime("%Y-%m-%d")
            .to_string();
        Rules {
            // Generous limits: the benchmark measures deciding, not refusing.
            per_principal: rate(1_000_000, Duration::from_secs(60), 1_000_000),
            per_tenant_tokens: rate(1_000_000_000, Duration::from_secs(60), 1_000_000_000),
            global: rate(1_000_000_000, Duration::from_secs(1), 1_000_000_000),
            // $1,000,000 a day, in micro-dollars.
            dollars: Limit::Window {
                limit: 1_000_000_000_000,
                window_end_ns: (today + 1) * DAY_NS,
            },
            principals: (0..PRINCIPALS).map(|i| format!("user-{i}")).collect(),
            principal_keys: (0..PRINCIPALS)
                .map(|i| format!("principal:user-{i}:requests"))
                .collect(),
            dollar_keys: (0..PRINCIPALS)
                .map(|i| format!("principal:user-{i}:dollars:{day}"))
                .collect(),
            tenants: (0..PRINCIPALS / 10).map(|i| format!("t-{i}")).collect(),
            tenant_keys: (0..PRINCIPALS / 10).map(|i| format!("tenant:t-{i}:tokens")).collect(),
            day,
        }
    }

    /// The four rules of request `i`: 1 request, 500 tokens, 1 request, 7,500 µ$.
    fn of(&self, i: usize) -> [Charge<'_>; 4] {
        [
            Charge {
                key: &self.principal_keys[i % PRINCIPALS],
                limit: self.per_principal,
                cost: 1,
            },
            Charge {
                key: &self.tenant_keys[i % (PRINCIPALS / 10)],
                limit: self.per_tenant_tokens,
                cost: 500,
            },
            Charge {
                key: "global:requests",
                limit: self.global,
                cost: 1,
            },
            Charge {
                key: &self.dollar_keys[i % PRINCIPALS],
                limit: self.dollars,
                cost: 7_500,
            },
        ]
    }

    /// What request `i` turned out to cost: fewer tokens and dollars than
    /// reserved.
    fn settled(&self, i: usize) -> [Settlement<'_>; 2] {
        let four = self.of(i);
        [
            Settlement {
                key: four[1].key,
                limit: four[1].limit,
                reserved: 500,
                actual: 320,
            },
            Settlement {
                key: four[3].key,
                limit: four[3].limit,
                reserved: 7_500,
                actual: 4_100,
            },
        ]
    }

    fn ledger(&self, i: usize) -> LedgerEntry<'_> {
        LedgerEntry {
            day: &self.day,
            principal: &self.principals[i % PRINCIPALS],
            tenant: &self.tenants[i % (PRINCIPALS / 10)],
            model: "gpt-4o-mini",
            usage: LedgerUsage {
                requests: 1,
                input_tokens: 120,
                output_tokens: 200,
                compute_ns: 350_000_000,
                micro_dollars: 4_100,
            },
        }
    }
}

fn memory(rules: &Rules) {
    let store = MemoryStore::new();
    let mut i = 0usize;
    let check = support::median_per_call(BATCH, BATCHES, || {
        i += 1;
        let hold = format!("req-{i}");
        black_box(store.check_all(unix_ns(), &hold, &rules.of(i)));
    });
    let mut j = 0usize;
    let both = support::median_per_call(BATCH, BATCHES, || {
        j += 1;
        let hold = format!("req-{j}");
        let now = unix_ns();
        black_box(store.check_all(now, &hold, &rules.of(j)));
        store.settle(now, &hold, &rules.settled(j), Some(rules.ledger(j)));
    });
    println!(
        "  memory: check 4 rules                     {:>8.2} µs median   (target for the whole stage < 30 µs)",
        check * 1e6
    );
    println!(
        "  memory: check + settle + ledger entry     {:>8.2} µs median per request",
        both * 1e6
    );
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
    // Warm up.
    for i in 0..200 {
        let hold = format!("warm-{i}");
        store.check_all(&hold, &rules.of(i)).await.unwrap();
        store.settle(&hold, &rules.settled(i), Some(rules.ledger(i)));
    }
    store.flush().await.unwrap();
    const N: usize = 5_000;
    let scripts_before = scripts_run(&mut probe).await;
    let trips_before = store.round_trips();
    let mut times = Vec::with_capacity(N);
    for i in 0..N {
        let started = Instant::now();
        let hold = format!("req-{i}");
        black_box(store.check_all(&hold, &rules.of(i)).await.unwrap());
        // Queued: carried by the next iteration's check.
        store.settle(&hold, &rules.settled(i), Some(rules.ledger(i)));
        times.push(started.elapsed());
    }
    let trips = store.round_trips() - trips_before;
    let scripts_after = scripts_run(&mut probe).await;
    store.flush().await.unwrap();
    times.sort();
    // Nothing else runs scripts against this Redis during the benchmark
    // (the INFO figure is server-wide, so another client would show).
    let per_request = trips as f64 / N as f64;
    let scripts = (scripts_after - scripts_before) as f64 / N as f64;
    println!(
        "  redis:  check + settle + ledger entry     {:>8.2} µs median, {:.0} µs p99 per request",
        times[N / 2].as_secs_f64() * 1e6,
        times[N * 99 / 100].as_secs_f64() * 1e6,
    );
    println!("  redis:  round trips per request           {per_request:>8.3}   (store's count; target: exactly 1)");
    println!("  redis:  scripts per request (Redis INFO)  {scripts:>8.3}");
    println!(
        "  redis:  settlements dropped               {:>8}",
        store.dropped_settlements()
    );
    let rows = store.ledger(&rules.day, &rules.day).await.unwrap();
    let booked: u64 = rows.iter().map(|r| r.usage.requests).sum();
    println!(
        "  redis:  ledger rows today                 {:>8}   ({booked} requests booked)",
        rows.len()
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
