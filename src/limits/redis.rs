//! The Redis store: the same decisions as [`super::memory`], kept in Redis
//! so that several Warden instances enforce one limit together.
//!
//! Each request is one Lua script (EVALSHA, falling back to EVAL when Redis
//! does not have it cached) covering every rule of the request, so the
//! decision is atomic: Redis runs one script at a time. The script repeats
//! the integer arithmetic of [`super::gcra`] step for step; see that module
//! for why every quantity stays below 2^53, where Lua's doubles are exact.
//!
//! Time comes from Redis (`TIME`), not from the instance, so instances whose
//! clocks disagree still agree on every limit.
//!
//! Keys are `{prefix}:key`. The `{prefix}` hash tag puts every limit key in
//! one Redis Cluster slot, which a multi-key script requires (a request's
//! rules are per key, per tenant, global…, and any combination must be one
//! script). The price is that all limit state lives on one cluster node: the
//! limits do not shard across a cluster. Each check is a few microseconds of
//! that node's time, so one node goes a long way; a deployment that outgrows
//! it can run several prefixes, at the cost of a request's rules no longer
//! being atomic across them.

use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::gcra::Outcome;
use super::memory::{Rule, Settlement};

/// Why the Redis store could not decide.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// Connecting to Redis, or running the script, failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The key prefix is empty or contains `{` or `}`, which would break the
    /// hash tag.
    #[error("the limit key prefix {0:?} must be non-empty, without '{{' or '}}'")]
    Prefix(String),
    /// The script answered something other than four integers per rule.
    #[error("unexpected reply from the rate-limit script: {0}")]
    Reply(String),
}

/// Shared by both scripts: the current time, and TATs as strings of
/// nanoseconds handled as seconds and nanoseconds apart, because an absolute
/// instant in nanoseconds (~1.8e18) is far beyond a double's exact range
/// while every difference the algorithm needs is well within it.
const PRELUDE: &str = r#"
-- Redis before 5 replicates scripts verbatim, which a script reading TIME
-- may not be; later versions always replicate effects, and this is a no-op.
if redis.replicate_commands then redis.replicate_commands() end
local function split(s)
  local n = string.len(s)
  if n <= 9 then return 0, tonumber(s) end
  return tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
end
local now_s, now_ns
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now_s, now_ns = tonumber(t[1]), tonumber(t[2]) * 1000
else
  now_s, now_ns = split(ARGV[1])
end
-- floor(a / b) for non-negative integers, exact even where a / b rounds up.
local function floordiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
-- How far a stored TAT is ahead of now, in ns; 0 when absent or past.
local function ahead_of(tat)
  if not tat then return 0 end
  local s, ns = split(tat)
  local d = (s - now_s) * 1000000000 + (ns - now_ns)
  if d < 0 then return 0 end
  return d
end
-- Stores now + ahead, expiring once it is in the past (a full limit, the
-- same as no key); ahead 0 is a full limit already.
local function write(key, ahead)
  if ahead <= 0 then
    redis.call('DEL', key)
    return
  end
  local ns = now_ns + ahead
  local carry = floordiv(ns, 1000000000)
  local tat = string.format('%d%09d', now_s + carry, ns - carry * 1000000000)
  redis.call('SET', key, tat, 'PX', floordiv(ahead, 1000000) + 1)
end
"#;

/// KEYS: one per rule. ARGV: now in ns or '' for Redis time, then per rule
/// interval, burst, cost. Returns per rule allowed, remaining, reset_after
/// (ns), retry_after (ns, or -1 for never).
const CHECK: &str = r#"
local function decide(ahead, t, burst, cost)
  local tau = burst * t
  local left = floordiv(math.max(tau - ahead, 0), t)
  if cost > burst then return {0, left, ahead, -1} end
  local inc = cost * t
  if ahead > tau - inc then return {0, left, ahead, ahead - (tau - inc)} end
  local new = ahead + inc
  return {1, floordiv(tau - new, t), new, 0}
end
local pending, out, all = {}, {}, true
for i = 1, #KEYS do
  local key, a = KEYS[i], 1 + (i - 1) * 3
  local t, burst, cost = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local ahead = pending[key]
  if ahead == nil then ahead = ahead_of(redis.call('GET', key)) end
  out[i] = decide(ahead, t, burst, cost)
  if out[i][1] == 1 then pending[key] = out[i][3] else all = false end
end
if all then
  for key, ahead in pairs(pending) do write(key, ahead) end
else
  -- Nothing is charged; rules that would have allowed report their state.
  for i = 1, #KEYS do
    if out[i][1] == 1 then
      local a = 1 + (i - 1) * 3
      out[i] = decide(ahead_of(redis.call('GET', KEYS[i])), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), 0)
    end
  end
end
local flat = {}
for i = 1, #KEYS do
  for j = 1, 4 do flat[#flat + 1] = out[i][j] end
end
return flat
"#;

/// KEYS: one per settlement. ARGV: now in ns or '', then per settlement
/// interval, burst, reserved, actual.
const SETTLE: &str = r#"
for i = 1, #KEYS do
  local key, a = KEYS[i], 1 + (i - 1) * 4
  local t, burst = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local reserved, actual = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local cap = 2 * burst
  local delta = math.min(actual, cap) - math.min(reserved, cap)
  local ahead = ahead_of(redis.call('GET', key)) + delta * t
  -- Rounding is monotonic, so clamping an inexact sum still gives 2 * tau.
  if ahead < 0 then ahead = 0 elseif ahead > 2 * burst * t then ahead = 2 * burst * t end
  write(key, ahead)
end
return 0
"#;

/// GCRA state for any number of limit keys, in Redis, shared by every
/// instance that uses the same prefix.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    check: Script,
    settle: Script,
}

impl RedisStore {
    /// Connects to Redis at `url` (`redis://host:port/db`); every key this
    /// store touches is `{prefix}:…`. The connection is re-established
    /// automatically when it drops.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisStore, RedisStoreError> {
        // An empty tag `{}` is no hash tag at all in Redis Cluster: keys
        // would scatter over slots and the multi-key script would fail.
        if prefix.is_empty() || prefix.contains(['{', '}']) {
            return Err(RedisStoreError::Prefix(prefix.to_owned()));
        }
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(3);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisStore {
            conn,
            prefix: prefix.to_owned(),
            check: Script::new(&format!("{PRELUDE}{CHECK}")),
            settle: Script::new(&format!("{PRELUDE}{SETTLE}")),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{{{}}}:{key}", self.prefix)
    }

    /// Decides every rule of one request on Redis's clock, all or nothing,
    /// exactly as [`super::memory::MemoryStore::check_all`] does.
    pub async fn check_all(&self, rules: &[Rule<'_>]) -> Result<Vec<Outcome>, RedisStoreError> {
        self.run_check("", rules).await
    }

    /// [`RedisStore::check_all`] at `now` (ns since the Unix epoch) instead
    /// of Redis's clock: for tests and replays. Keys still expire on Redis's
    /// clock.
    pub async fn check_all_at(&self, now: u64, rules: &[Rule<'_>]) -> Result<Vec<Outcome>, RedisStoreError> {
        self.run_check(&now.to_string(), rules).await
    }

    /// Settles every rule of one admitted request on Redis's clock, as
    /// [`super::memory::MemoryStore::settle_all`] does.
    pub async fn settle_all(&self, settlements: &[Settlement<'_>]) -> Result<(), RedisStoreError> {
        self.run_settle("", settlements).await
    }

    /// [`RedisStore::settle_all`] at `now` (ns since the Unix epoch).
    pub async fn settle_all_at(&self, now: u64, settlements: &[Settlement<'_>]) -> Result<(), RedisStoreError> {
        self.run_settle(&now.to_string(), settlements).await
    }

    async fn run_check(&self, now: &str, rules: &[Rule<'_>]) -> Result<Vec<Outcome>, RedisStoreError> {
        if rules.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.check.prepare_invoke();
        call.arg(now);
        for &(key, rate, cost) in rules {
            call.key(self.key(key))
                .arg(rate.interval_ns())
                .arg(rate.burst())
                .arg(cost);
        }
        // ConnectionManager is a cheap handle onto one multiplexed connection.
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = call.invoke_async(&mut conn).await?;
        if reply.len() != rules.len() * 4 {
            return Err(RedisStoreError::Reply(format!(
                "{} integers for {} rules",
                reply.len(),
                rules.len()
            )));
        }
        reply.chunks_exact(4).map(outcome).collect()
    }

    async fn run_settle(&self, now: &str, settlements: &[Settlement<'_>]) -> Result<(), RedisStoreError> {
        if settlements.is_empty() {
            return Ok(());
        }
        let mut call = self.settle.prepare_invoke();
        call.arg(now);
        for &(key, rate, reserved, actual) in settlements {
            call.key(self.key(key))
                .arg(rate.interval_ns())
                .arg(rate.burst())
                .arg(reserved)
                .arg(actual);
        }
        let mut conn = self.conn.clone();
        let _: i64 = call.invoke_async(&mut conn).await?;
        Ok(())
    }
}

/// One rule's four integers from the check script.
fn outcome(v: &[i64]) -> Result<Outcome, RedisStoreError> {
    let bad = || RedisStoreError::Reply(format!("{v:?}"));
    let &[allowed, remaining, reset, retry] = v else {
        return Err(bad());
    };
    let nanos = |n: i64| u64::try_from(n).map(Duration::from_nanos).map_err(|_| bad());
    Ok(Outcome {
        allowed: match allowed {
            0 => false,
            1 => true,
            _ => return Err(bad()),
        },
        remaining: u64::try_from(remaining).map_err(|_| bad())?,
        reset_after: nanos(reset)?,
        retry_after: if retry == -1 { None } else { Some(nanos(retry)?) },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn replies_are_parsed_strictly() {
        let o = outcome(&[1, 3, 500, 0]).unwrap();
        assert!(o.allowed);
        assert_eq!(o.remaining, 3);
        assert_eq!(o.retry_after, Some(Duration::ZERO));
        assert_eq!(outcome(&[0, 0, 9, -1]).unwrap().retry_after, None);
        assert!(matches!(outcome(&[2, 0, 0, 0]), Err(RedisStoreError::Reply(_))));
        assert!(matches!(outcome(&[1, -5, 0, 0]), Err(RedisStoreError::Reply(_))));
        assert!(matches!(outcome(&[1, 0, 0]), Err(RedisStoreError::Reply(_))));
    }

    #[tokio::test]
    async fn a_braced_prefix_is_refused() {
        for prefix in ["a{b", "a}b", ""] {
            let err = RedisStore::connect("redis://127.0.0.1:6379", prefix)
                .await
                .err()
                .unwrap();
            assert!(matches!(err, RedisStoreError::Prefix(_)), "{prefix:?}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_an_error_not_a_panic() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = RedisStore::connect(&format!("redis://{addr}"), "t")
            .await
            .err()
            .unwrap();
        assert!(matches!(err, RedisStoreError::Redis(_)), "{err}");
    }
}
