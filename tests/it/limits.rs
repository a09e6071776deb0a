//! Limit stores against the real Redis at 127.0.0.1:6379: the Redis script
//! decides exactly as the in-process store does for every kind of limit,
//! settlements ride along with the next check (one round trip per request)
//! or are sent by the store itself when it is idle, and several instances
//! sharing one Redis never admit more than the limit together.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use warden::limits::gcra::Rate;
use warden::limits::memory::MemoryStore;
use warden::limits::redis::RedisStore;
use warden::limits::store::{Charge, LedgerEntry, LedgerUsage, Limit, Settlement};

const REDIS: &str = "redis://127.0.0.1:6379";
const SEC: u64 = 1_000_000_000;

/// A store on a fresh random key prefix, or `None` when Redis is not running
/// here and this is not CI (where it must run, so the test fails instead).
async fn fresh_redis() -> Option<(RedisStore, String)> {
    let prefix = format!("warden_test_{}", uuid::Uuid::now_v7().simple());
    match RedisStore::connect(REDIS, &prefix).await {
        Ok(store) => Some((store, prefix)),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: Redis not reachable at 127.0.0.1:6379 ({e}); CI runs this test");
            None
        }
        Err(e) => panic!("Redis must be running for CI: {e}"),
    }
}

/// Another instance: its own connection, the same prefix.
async fn instance(prefix: &str) -> RedisStore {
    RedisStore::connect(REDIS, prefix).await.unwrap()
}

/// A plain connection, to look at what the store wrote.
async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Redis's clock, in ns since the Unix epoch.
async fn redis_now(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    s * SEC + us * 1000
}

fn rate(amount: u64, period: Duration, burst: u64) -> Limit {
    Limit::Rate(Rate::new(amount, period, burst).unwrap())
}

fn charge(key: &str, limit: Limit, cost: u64) -> Charge<'_> {
    Charge { key, limit, cost }
}

fn settlement(key: &str, limit: Limit, reserved: u64, actual: u64) -> Settlement<'_> {
    Settlement {
        key,
        limit,
        reserved,
        actual,
    }
}

/// A seeded random schedule of multi-rule requests over all three kinds of
/// limit (rates, calendar windows, concurrency), many settled at a
/// different actual cost and with a ledger entry, replayed through both
/// stores at the same instants: every outcome is identical, and so are the
/// ledgers.
#[tokio::test]
async fn redis_decides_exactly_as_memory() {
    let Some((redis, _)) = fresh_redis().await else {
        return;
    };
    let memory = MemoryStore::new();
    // Redis expires keys on its own clock: the replayed clock runs about a
    // thousand times faster (half a second a request), so no key expires in
    // Redis while the replay still needs it.
    let requests = rate(30, Duration::from_secs(60), 5);
    let tokens = rate(20_000, Duration::from_secs(60), 2000);
    // Windows of 20 replayed seconds, each with a budget of 400,000 units.
    let window_ns = 20 * SEC;
    let concurrency = Limit::Concurrency {
        max: 3,
        lease: Duration::from_secs(5),
    };
    let mut rng = StdRng::seed_from_u64(5);
    let mut now: u64 = 1_800_000_000_123_456_789;
    let (mut admitted, mut refused) = (0, 0);
    // Rules refusing, by kind: rate, window, concurrency.
    let mut refusals = [0u32; 3];
    let mut settled_requests = 0u64;
    for i in 0..600u64 {
        now += rng.random_range(0..1_000_000_000);
        let key = format!("key:{}", rng.random_range(0..3));
        let tenant = format!("tenant:{}", rng.random_range(0..2));
        let token_cost = rng.random_range(50..400);
        // A caller whose clock lags charges a window that just ended (still
        // counted, within the grace), or one long over (counts nothing).
        let lag = match rng.random_range(0..10) {
            0 => 1,
            1 => 4,
            _ => 0,
        };
        let index = (now / window_ns).saturating_sub(lag);
        let budget_key = format!("{tenant}:budget:{index}");
        let budget = Limit::Window {
            limit: 400_000,
            window_end_ns: (index + 1) * window_ns,
        };
        // Now and then a cost no budget can ever cover.
        let dollar_cost = if i % 37 == 0 {
            u64::MAX
        } else {
            rng.random_range(1_000..60_000)
        };
        let conc_key = format!("{tenant}:in-flight");
        let hold_id = format!("req-{i}");
        let rules = [
            charge(&key, requests, 1),
            charge(&tenant, tokens, token_cost),
            // The same key twice: charged one after the other.
            charge(&key, requests, u64::from(i % 17 == 0) * 2),
            charge(&budget_key, budget, dollar_cost),
            charge(&conc_key, concurrency, 1),
            // The same concurrency key twice: one hold.
            charge(&conc_key, concurrency, u64::from(i % 13 == 0)),
        ];
        let from_memory = memory.check_all(now, &hold_id, &rules);
        let from_redis = redis.check_all_at(now, &hold_id, &rules).await.unwrap();
        assert_eq!(from_memory, from_redis, "request {i} at {now}");
        if dollar_cost == u64::MAX {
            assert_eq!(from_redis[3].retry_after, None, "never");
        }
        if from_memory.iter().all(|o| o.allowed) {
            admitted += 1;
            // Most requests settle, a little later; the others never do
            // (crashed), and their holds live out their lease.
            if rng.random_bool(0.7) {
                let at = now + rng.random_range(0..300_000_000);
                let settlements = [
                    settlement(&tenant, tokens, token_cost, rng.random_range(0..2 * token_cost)),
                    settlement(&budget_key, budget, dollar_cost, rng.random_range(0..3 * dollar_cost)),
                    settlement(&conc_key, concurrency, 1, 0),
                ];
                let day = format!("2027-01-{:02}", 1 + i / 100);
                let ledger = LedgerEntry {
                    day: &day,
                    principal: &key,
                    tenant: &tenant,
                    model: if i % 2 == 0 { "gpt" } else { "llama" },
                    usage: LedgerUsage {
                        requests: 1,
                        input_tokens: token_cost,
                        output_tokens: i,
                        compute_ns: 1_000 * i,
                        micro_dollars: dollar_cost,
                    },
                };
                memory.settle(at, &hold_id, &settlements, Some(ledger));
                redis.settle_at(at, &hold_id, &settlements, Some(ledger));
                settled_requests += 1;
            }
        } else {
            refused += 1;
            for (n, o) in from_memory.iter().enumerate() {
                if !o.allowed {
                    refusals[match n {
                        0..=2 => 0,
                        3 => 1,
                        _ => 2,
                    }] += 1;
                }
            }
        }
    }
    redis.flush().await.unwrap();
    let from_memory = memory.ledger("2027-01-01", "2027-12-31");
    let from_redis = redis.ledger("2027-01-01", "2027-12-31").await.unwrap();
    assert_eq!(from_memory, from_redis, "the ledgers agree");
    let booked: u64 = from_redis.iter().map(|r| r.usage.requests).sum();
    assert_eq!(booked, settled_requests);
    assert_eq!(redis.dropped_settlements(), 0);
    println!(
        "replayed 600 requests: {admitted} admitted, {refused} refused (rate {}, window {}, concurrency {}), \
         {} ledger rows, identically",
        refusals[0],
        refusals[1],
        refusals[2],
        from_redis.len()
    );
    assert!(admitted > 50 && refused > 50, "the schedule exercised both");
    assert!(refusals.iter().all(|&n| n >= 5), "every kind refused: {refusals:?}");
}

/// N requests checked and settled in a loop cost N round trips: each
/// settlement rides with the next check, and one flush sends the last.
#[tokio::test]
async fn settlements_piggyback_on_the_next_check() {
    let Some((store, _)) = fresh_redis().await else {
        return;
    };
    let mut conn = raw().await;
    let end = redis_now(&mut conn).await + 3600 * SEC;
    let budget = Limit::Window {
        limit: 1_000_000,
        window_end_ns: end,
    };
    let tokens = rate(100_000, Duration::from_secs(60), 100_000);
    let slots = Limit::Concurrency {
        max: 1,
        lease: Duration::from_secs(30),
    };
    const N: u64 = 50;
    let before = store.round_trips();
    for i in 0..N {
        let hold = format!("req-{i}");
        let rules = [
            charge("b", budget, 100),
            charge("t", tokens, 500),
            charge("c", slots, 1),
        ];
        let out = store.check_all(&hold, &rules).await.unwrap();
        // One slot: admitted only because the previous request's release
        // was carried, and applied first, by this very call.
        assert!(out.iter().all(|o| o.allowed), "request {i}: {out:?}");
        let settled = [
            settlement("b", budget, 100, 7),
            settlement("t", tokens, 500, 20),
            settlement("c", slots, 1, 0),
        ];
        let entry = LedgerEntry {
            day: "2026-06-01",
            principal: "alice",
            tenant: "acme",
            model: "gpt",
            usage: LedgerUsage {
                requests: 1,
                micro_dollars: 7,
                ..LedgerUsage::default()
            },
        };
        store.settle(&hold, &settled, Some(entry));
        assert_eq!(store.queued_settlements(), 1);
    }
    assert_eq!(store.round_trips() - before, N, "one round trip per request");
    store.flush().await.unwrap();
    assert_eq!(store.round_trips() - before, N + 1, "plus one flush");
    assert_eq!(store.queued_settlements(), 0);
    let out = store.check_all("probe", &[charge("b", budget, 0)]).await.unwrap();
    assert_eq!(out[0].remaining, 1_000_000 - 7 * N, "every refund was applied");
    let rows = store.ledger("2026-06-01", "2026-06-01").await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].usage.requests, rows[0].usage.micro_dollars), (N, 7 * N));
    println!("{N} requests: {} round trips, then 1 flush", N);
}

/// With no check to carry it, a settlement is sent by the store itself
/// within a few milliseconds.
#[tokio::test]
async fn an_idle_store_flushes_by_itself() {
    let Some((store, prefix)) = fresh_redis().await else {
        return;
    };
    let mut conn = raw().await;
    let end = redis_now(&mut conn).await + 3600 * SEC;
    let budget = Limit::Window {
        limit: 1_000,
        window_end_ns: end,
    };
    let slots = Limit::Concurrency {
        max: 1,
        lease: Duration::from_secs(30),
    };
    let rules = [charge("b", budget, 100), charge("c", slots, 1)];
    assert!(store.check_all("r1", &rules).await.unwrap().iter().all(|o| o.allowed));
    let before = store.round_trips();
    let started = Instant::now();
    store.settle(
        "r1",
        &[settlement("b", budget, 100, 3), settlement("c", slots, 1, 0)],
        None,
    );
    let key = format!("{{{prefix}}}:window:b");
    let mut used = String::new();
    while started.elapsed() < Duration::from_millis(100) {
        tokio::time::sleep(Duration::from_millis(2)).await;
        used = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
        if used == "3" {
            break;
        }
    }
    let took = started.elapsed();
    assert_eq!(used, "3", "the refund reached Redis without a check");
    let holds: i64 = redis::cmd("ZCARD")
        .arg(format!("{{{prefix}}}:conc:c"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(holds, 0, "the hold was released");
    assert_eq!(store.round_trips() - before, 1, "one round trip, by the store itself");
    assert_eq!(store.queued_settlements(), 0);
    println!("an idle settlement reached Redis within {took:?}");
}

/// Three instances, each with its own connection, drive one limit at once:
/// together they admit at most the limit, and close to it.
async fn three_instances(limit: Limit, cost: u64, per_instance: u32) -> Option<(u64, Duration)> {
    let (first, prefix) = fresh_redis().await?;
    let stores = [first, instance(&prefix).await, instance(&prefix).await];
    let start = Instant::now();
    let tasks: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(n, store)| {
            tokio::spawn(async move {
                let mut admitted = 0u64;
                for i in 0..per_instance {
                    let hold = format!("{n}-{i}");
                    let out = store.check_all(&hold, &[charge("shared", limit, cost)]).await.unwrap();
                    admitted += u64::from(out[0].allowed);
                }
                admitted
            })
        })
        .collect();
    let mut counts = Vec::new();
    for task in tasks {
        counts.push(task.await.unwrap());
    }
    let elapsed = start.elapsed();
    println!("admitted per instance {counts:?} in {elapsed:?}");
    Some((counts.iter().sum(), elapsed))
}

/// The most units a rate may admit over `elapsed`: one burst plus what was
/// emitted meanwhile (plus one for the interval in progress).
fn ceiling(rate: Rate, elapsed: Duration) -> u64 {
    let emitted = u64::try_from(elapsed.as_nanos()).unwrap() / rate.interval_ns();
    rate.burst() + emitted + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn three_instances_share_one_request_limit() {
    // 100 requests a minute, all of them at once if need be.
    let limit = Rate::new(100, Duration::from_secs(60), 100).unwrap();
    let Some((admitted, elapsed)) = three_instances(Limit::Rate(limit), 1, 200).await else {
        return;
    };
    let ceiling = ceiling(limit, elapsed);
    println!("request limit: {admitted} of 600 admitted, ceiling {ceiling}");
    assert!(admitted >= 100, "the whole burst is admitted");
    assert!(admitted <= ceiling, "{admitted} > {ceiling}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn three_instances_share_one_dollar_budget() {
    // $10 a day in micro-dollars; each request costs $0.123457.
    let budget = Rate::new(10_000_000, Duration::from_secs(86_400), 10_000_000).unwrap();
    let cost = 123_457;
    let Some((admitted, elapsed)) = three_instances(Limit::Rate(budget), cost, 150).await else {
        return;
    };
    let spent = admitted * cost;
    let ceiling = ceiling(budget, elapsed);
    println!("dollar budget: {admitted} of 450 admitted, {spent} µ$ spent, ceiling {ceiling} µ$");
    // 80 requests fit in $10; a second of emission adds about 116 µ$.
    assert!(admitted >= 10_000_000 / cost, "the whole budget is usable");
    assert!(spent <= ceiling, "{spent} > {ceiling}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn three_instances_share_one_calendar_budget() {
    // $10 for the day, exactly: a window admits no more than its limit.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let budget = Limit::Window {
        limit: 10_000_000,
        window_end_ns: u64::try_from(now.as_nanos()).unwrap() + 3600 * SEC,
    };
    let cost = 123_457;
    let Some((admitted, _)) = three_instances(budget, cost, 150).await else {
        return;
    };
    println!("calendar budget: {admitted} of 450 admitted");
    assert_eq!(admitted, 10_000_000 / cost, "exactly as many as fit");
}

/// Three instances run requests that each hold one of five slots while
/// they "work", and release it when done: never more than five are at work
/// at once across the instances, and releases, queued and carried by later
/// checks, free the slots for others.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn three_instances_share_one_concurrency_limit() {
    let Some((first, prefix)) = fresh_redis().await else {
        return;
    };
    let stores = [first, instance(&prefix).await, instance(&prefix).await];
    let slots = Limit::Concurrency {
        max: 5,
        lease: Duration::from_secs(30),
    };
    let working = Arc::new(AtomicI64::new(0));
    let most = Arc::new(AtomicI64::new(0));
    let tasks: Vec<_> = stores
        .into_iter()
        .enumerate()
        .flat_map(|(n, store)| {
            // Four concurrent requests per instance: twelve want five slots.
            (0..4).map(move |w| (n, w, store.clone()))
        })
        .map(|(n, w, store)| {
            let (working, most) = (working.clone(), most.clone());
            tokio::spawn(async move {
                let mut admitted = 0u64;
                for i in 0..40 {
                    let hold = format!("{n}-{w}-{i}");
                    let out = store.check_all(&hold, &[charge("slots", slots, 1)]).await.unwrap();
                    if out[0].allowed {
                        admitted += 1;
                        let now = working.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        working.fetch_sub(1, Ordering::SeqCst);
                        store.settle(&hold, &[settlement("slots", slots, 1, 0)], None);
                    } else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                store.flush().await.unwrap();
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += task.await.unwrap();
    }
    let most = most.load(Ordering::SeqCst);
    println!("concurrency: {admitted} of 480 admitted, at most {most} at once");
    assert!(most <= 5, "{most} at once");
    assert!(admitted >= 40, "released slots were reused: {admitted}");
    let mut conn = raw().await;
    let holds: i64 = redis::cmd("ZCARD")
        .arg(format!("{{{prefix}}}:conc:slots"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(holds, 0, "every hold was released");
}

/// Idle keys vanish: each key expires when its limit is full again, on
/// Redis's clock, and lives under the store's one hash tag.
#[tokio::test]
async fn idle_keys_expire() {
    let Some((store, prefix)) = fresh_redis().await else {
        return;
    };
    let limit = rate(10, Duration::from_secs(1), 5);
    let out = store.check_all("a", &[charge("caller", limit, 2)]).await.unwrap();
    assert!(out[0].allowed);
    assert_eq!(out[0].reset_after, Duration::from_millis(200));
    let mut conn = raw().await;
    let key = format!("{{{prefix}}}:rate:caller");
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
    assert!((1..=201).contains(&ttl), "PTTL {ttl}");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await.unwrap();
    assert_eq!(exists, 0, "an idle key is gone");
    // A refund that fills the limit deletes the key at once.
    store.check_all("b", &[charge("caller", limit, 5)]).await.unwrap();
    store.settle("b", &[settlement("caller", limit, 5, 0)], None);
    store.flush().await.unwrap();
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await.unwrap();
    assert_eq!(exists, 0, "a full limit needs no key");
}
