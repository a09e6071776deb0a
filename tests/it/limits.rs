//! Rate-limit stores against the real Redis at 127.0.0.1:6379: the Redis
//! script decides exactly as the in-process store does, and several
//! instances sharing one Redis never admit more than the limit together.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use warden::limits::gcra::Rate;
use warden::limits::memory::MemoryStore;
use warden::limits::redis::RedisStore;

const REDIS: &str = "redis://127.0.0.1:6379";

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

fn rate(amount: u64, period: Duration, burst: u64) -> Rate {
    Rate::new(amount, period, burst).unwrap()
}

/// A seeded random schedule of multi-rule requests, some settled at a
/// different actual cost, replayed through both stores at the same instants:
/// every outcome is identical.
#[tokio::test]
async fn redis_decides_exactly_as_memory() {
    let Some((redis, _)) = fresh_redis().await else {
        return;
    };
    let memory = MemoryStore::new();
    // Redis expires keys on its own clock: the replayed clock runs about a
    // thousand times faster (half a second a request), so no key expires in
    // Redis while the replay still needs it.
    let requests = rate(60, Duration::from_secs(60), 10);
    let tokens = rate(20_000, Duration::from_secs(60), 2000);
    let dollars = rate(3_000_000, Duration::from_secs(60), 1_000_000);
    let mut rng = StdRng::seed_from_u64(5);
    let mut now: u64 = 1_800_000_000_123_456_789;
    let (mut admitted, mut refused) = (0, 0);
    for i in 0..400 {
        now += rng.random_range(0..1_000_000_000);
        let key = format!("key:{}", rng.random_range(0..3));
        let tenant = format!("tenant:{}", rng.random_range(0..2));
        let token_cost = rng.random_range(50..400);
        // Now and then a cost no budget can ever cover.
        let dollar_cost = if i % 37 == 0 {
            u64::MAX
        } else {
            rng.random_range(1_000..60_000)
        };
        let rules = [
            (key.as_str(), requests, 1),
            (tenant.as_str(), tokens, token_cost),
            // The same key twice: charged one after the other.
            (key.as_str(), requests, u64::from(i % 17 == 0) * 2),
            ("global:dollars", dollars, dollar_cost),
        ];
        let from_memory = memory.check_all(now, &rules);
        let from_redis = redis.check_all_at(now, &rules).await.unwrap();
        assert_eq!(from_memory, from_redis, "request {i} at {now}");
        if dollar_cost == u64::MAX {
            assert_eq!(from_redis[3].retry_after, None, "never");
        }
        if from_memory.iter().all(|o| o.allowed) {
            admitted += 1;
            if rng.random_bool(0.5) {
                let settlements = [
                    (tenant.as_str(), tokens, token_cost, rng.random_range(0..2 * token_cost)),
                    (
                        "global:dollars",
                        dollars,
                        dollar_cost,
                        rng.random_range(0..3 * dollar_cost),
                    ),
                ];
                memory.settle_all(now, &settlements);
                redis.settle_all_at(now, &settlements).await.unwrap();
            }
        } else {
            refused += 1;
        }
    }
    println!("replayed 400 requests: {admitted} admitted, {refused} refused, identically");
    assert!(admitted > 50 && refused > 50, "the schedule exercised both");
}

/// Three instances, each with its own connection, drive one limit at once:
/// together they admit at most the limit, and close to it.
async fn three_instances(rate: Rate, cost: u64, per_instance: u32) -> Option<(u64, Duration)> {
    let (first, prefix) = fresh_redis().await?;
    let stores = [first, instance(&prefix).await, instance(&prefix).await];
    let start = Instant::now();
    let tasks: Vec<_> = stores
        .into_iter()
        .map(|store| {
            tokio::spawn(async move {
                let mut admitted = 0u64;
                for _ in 0..per_instance {
                    let out = store.check_all(&[("shared", rate, cost)]).await.unwrap();
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
    let limit = rate(100, Duration::from_secs(60), 100);
    let Some((admitted, elapsed)) = three_instances(limit, 1, 200).await else {
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
    let budget = rate(10_000_000, Duration::from_secs(86_400), 10_000_000);
    let cost = 123_457;
    let Some((admitted, elapsed)) = three_instances(budget, cost, 150).await else {
        return;
    };
    let spent = admitted * cost;
    let ceiling = ceiling(budget, elapsed);
    println!("dollar budget: {admitted} of 450 admitted, {spent} µ$ spent, ceiling {ceiling} µ$");
    // 80 requests fit in $10; a second of emission adds about 116 µ$.
    assert!(admitted >= 10_000_000 / cost, "the whole budget is usable");
    assert!(spent <= ceiling, "{spent} > {ceiling}");
}

/// Idle keys vanish: each key expires when its limit is full again, on
/// Redis's clock, and lives under the store's one hash tag.
#[tokio::test]
async fn idle_keys_expire() {
    let Some((store, prefix)) = fresh_redis().await else {
        return;
    };
    let limit = rate(10, Duration::from_secs(1), 5);
    let out = store.check_all(&[("caller", limit, 2)]).await.unwrap();
    assert!(out[0].allowed);
    assert_eq!(out[0].reset_after, Duration::from_millis(200));
    let mut conn = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{{{prefix}}}:caller");
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
    assert!((1..=201).contains(&ttl), "PTTL {ttl}");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await.unwrap();
    assert_eq!(exists, 0, "an idle key is gone");
    // A refund that fills the limit deletes the key at once.
    store.check_all(&[("caller", limit, 5)]).await.unwrap();
    store.settle_all(&[("caller", limit, 5, 0)]).await.unwrap();
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await.unwrap();
    assert_eq!(exists, 0, "a full limit needs no key");
}
