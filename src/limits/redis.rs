//! The Redis store: the same decisions as [`super::memory`], kept in Redis
//! so that several Warden instances enforce one limit together, and the
//! usage ledger.
//!
//! # One round trip per request
//!
//! Everything is one Lua script (EVALSHA, falling back to EVAL when Redis
//! lost its script cache), and a request costs one call of it. The decision
//! is atomic: Redis runs one script at a time. Settlement costs no round
//! trip of its own: [`RedisStore::settle`] is synchronous (it runs from a
//! response body's `Drop`) and only queues the settlement; the next
//! [`RedisStore::check_all`] on the store sends the queued settlements and
//! then its own charges in the same script call, settled first. A
//! background task sends queued settlements alone when no check has
//! carried them within [`FLUSH_AFTER`], so an idle instance still settles
//! promptly; [`RedisStore::flush`] sends them at once (at shutdown).
//!
//! # When Redis fails
//!
//! Queued settlements are kept and retried with the next call, at most
//! [`MAX_QUEUED`] of them; beyond that the oldest are dropped and counted
//! ([`RedisStore::dropped_settlements`]): an outage long enough to queue a
//! hundred thousand requests' settlements loses the oldest refunds and
//! ledger entries rather than the instance's memory. A failed call may
//! still have run in Redis (a reply lost to a timeout or a dropped
//! connection), so a retry must not apply a settlement twice: each queued
//! settlement carries a sequence number, the script records the numbers it
//! applied in a small sorted set per store instance
//! (`{prefix}:applied:{instance}`), and skips any it has seen. The set holds
//! only numbers still unresolved on the instance (the script trims those
//! below the lowest unresolved one), so it stays a handful of entries.
//!
//! A call that fails because of what it asked (a script error rather than a
//! connection problem) might fail because of a settlement it carried, which
//! must not take every later check down with it: its settlements are set
//! aside and sent alone, one per call, by the background task; one that
//! fails alone too is dropped (and counted).
//!
//! # Arithmetic and keys
//!
//! The script repeats the integer arithmetic of [`super::gcra`] and
//! [`super::store`] step for step; see those modules for why every quantity
//! stays below 2^53, where Lua's doubles are exact. Ledger figures never go
//! through Lua numbers: they are passed as strings to `HINCRBY`.
//!
//! Time comes from Redis (`TIME`), not from the instance, so instances whose
//! clocks disagree still agree on every limit (the `_at` variants take the
//! time from the caller instead, for tests and replays).
//!
//! Keys are `{prefix}:rate:key`, `{prefix}:window:key`, `{prefix}:conc:key`
//! (each kind its own key space, as in the memory store), the ledger
//! `{prefix}:ledger:YYYY-MM-DD` and the sequence set above. The `{prefix}`
//! hash tag puts every key in one Redis Cluster slot, which a multi-key
//! script requires (a request's rules are per key, per tenant, global…, and
//! any combination must be one script). The price is that all limit state
//! lives on one cluster node: the limits do not shard across a cluster.
//! Each check is a few microseconds of that node's time, so one node goes a
//! long way; a deployment that outgrows it can run several prefixes, at the
//! cost of a request's rules no longer being atomic across them.
//!
//! A window's key expires at the window's end plus [`WINDOW_GRACE`]; a
//! concurrency key is a sorted set of hold ids scored by lease expiry (in
//! µs), pruned of expired holds before every count, and expiring a minute
//! after its longest lease; a ledger day expires
//! [`LEDGER_RETENTION_DAYS`] days after it began.
//!
//! [`WINDOW_GRACE`]: super::store::WINDOW_GRACE

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script, ServerErrorKind};
use tokio::sync::Notify;

use super::gcra::Outcome;
use super::memory::sort_rows;
use super::store::{
    Charge, LEDGER_RETENTION_DAYS, LedgerEntry, LedgerRow, LedgerUsage, Limit, MAX_UNITS, OwnedSettlement, Settlement,
    lease_us, ledger_field, parse_day, parse_ledger_field,
};

/// Queued settlements no check has carried for this long are sent alone.
pub const FLUSH_AFTER: Duration = Duration::from_millis(5);

/// The most settlements (requests' worth) queued; beyond it the oldest
/// are dropped and counted.
pub const MAX_QUEUED: usize = 100_000;

/// The most queued settlements one script call carries; more wait for the
/// next call, so that a backlog after an outage never makes one huge call.
const MAX_BATCH: usize = 256;

/// How long the set of applied sequence numbers outlives its last write.
const APPLIED_TTL_MS: u64 = 3_600_000;

/// The longest pause between two attempts of the background task to send
/// settlements while Redis fails.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

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
    /// A ledger day is not a date written `YYYY-MM-DD`.
    #[error("{0:?} is not a day written YYYY-MM-DD")]
    Day(String),
}

/// The script. Its arguments are read in order, with a cursor over ARGV
/// and another over KEYS:
///
/// - the number of queued settlements `n`; when `n > 0`, the sequence set's
///   key and the lowest unresolved sequence number, then per settlement:
///   sequence number, now ('' for Redis's clock), hold id, the number of
///   its rules and per rule a kind and its key, then `r` interval burst
///   reserved actual, `w` window-end reserved actual, or `c` (nothing);
///   then `1` with the ledger day's key, its expiry (Unix seconds), the
///   field prefix and five figures, or `0`;
/// - the number of charges `c`; when `c > 0`, now ('' for Redis's clock),
///   the hold id, then per charge a kind and its key, then `r` interval
///   burst cost, `w` limit window-end cost, or `c` max lease-µs.
///
/// Returns, per charge, allowed, remaining, reset_after (ns), retry_after
/// (ns, or -1 for never).
const SCRIPT: &str = r#"
-- Redis before 5 replicates scripts verbatim, which a script reading TIME
-- may not be; later versions always replicate effects, and this is a no-op.
if redis.replicate_commands then redis.replicate_commands() end
local MAXD = 4503599627370496
local GRACE = 60000000000
local ap, kp = 0, 0
local function arg() ap = ap + 1; return ARGV[ap] end
local function num() return tonumber(arg()) end
local function key() kp = kp + 1; return KEYS[kp] end
-- Absolute instants are strings of nanoseconds, handled as seconds and
-- nanoseconds apart: ~1.8e18 is far beyond a double's exact range, while
-- every difference the algorithms need is well within it.
local function split(s)
  local n = string.len(s)
  if n <= 9 then return 0, tonumber(s) end
  return tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
end
local time_s, time_ns, now_s, now_ns
local function set_now(s)
  if s == '' then
    if not time_s then
      local t = redis.call('TIME')
      time_s, time_ns = tonumber(t[1]), tonumber(t[2]) * 1000
    end
    now_s, now_ns = time_s, time_ns
  else
    now_s, now_ns = split(s)
  end
end
-- floor(a / b) for non-negative integers, exact even where a / b rounds up.
local function floordiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function now_us() return now_s * 1000000 + floordiv(now_ns, 1000) end

-- Rates (GCRA). How far a stored TAT is ahead of now, in ns; 0 when
-- absent or past.
local function ahead_of(tat)
  if not tat then return 0 end
  local s, ns = split(tat)
  local d = (s - now_s) * 1000000000 + (ns - now_ns)
  if d < 0 then return 0 end
  return d
end
-- Stores now + ahead, expiring once it is in the past (a full limit, the
-- same as no key); ahead 0 is a full limit already.
local function write(k, ahead)
  if ahead <= 0 then
    redis.call('DEL', k)
    return
  end
  local ns = now_ns + ahead
  local carry = floordiv(ns, 1000000000)
  local tat = string.format('%d%09d', now_s + carry, ns - carry * 1000000000)
  redis.call('SET', k, tat, 'PX', floordiv(ahead, 1000000) + 1)
end
local function decide(ahead, t, burst, cost)
  local tau = burst * t
  local left = floordiv(math.max(tau - ahead, 0), t)
  if cost > burst then return {0, left, ahead, -1} end
  local inc = cost * t
  if ahead > tau - inc then return {0, left, ahead, ahead - (tau - inc)} end
  local new = ahead + inc
  return {1, floordiv(tau - new, t), new, 0}
end
local function rate_settle(k, t, burst, reserved, actual)
  local cap = 2 * burst
  local delta = math.min(actual, cap) - math.min(reserved, cap)
  local ahead = ahead_of(redis.call('GET', k)) + delta * t
  -- Rounding is monotonic, so clamping an inexact sum still gives 2 * tau.
  if ahead < 0 then ahead = 0 elseif ahead > 2 * burst * t then ahead = 2 * burst * t end
  write(k, ahead)
end

-- Windows. Nanoseconds from now until an instant, clamped to +-2^52.
local function until_ns(s)
  local es, ens = split(s)
  local ds = es - now_s
  if ds > 9000000 then return MAXD end
  if ds < -9000000 then return -MAXD end
  local d = ds * 1000000000 + (ens - now_ns)
  if d > MAXD then return MAXD elseif d < -MAXD then return -MAXD end
  return d
end
local function live(d) return d > -GRACE end
local function used_of(k, d)
  if not live(d) then return 0 end
  local v = redis.call('GET', k)
  if not v then return 0 end
  return tonumber(v)
end
local function store_used(k, used, d)
  if used <= 0 or not live(d) then
    redis.call('DEL', k)
    return
  end
  redis.call('SET', k, string.format('%d', used), 'PX', floordiv(d + GRACE, 1000000) + 1)
end
local function wdecide(limit, used, d, cost)
  local reset = math.max(d, 0)
  local left = math.max(limit - used, 0)
  if cost > limit then return {0, left, reset, -1} end
  if used > limit or cost > limit - used then return {0, left, reset, reset} end
  return {1, limit - (used + cost), reset, 0}
end

-- Concurrency: live holds (expired ones pruned first), and whether the
-- hold id is one of them.
local function holds(k, hold, nus)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', nus)
  return redis.call('ZCARD', k), redis.call('ZSCORE', k, hold) ~= false
end
local function cdecide(max, count, held)
  if held or count < max then
    local after = count
    if not held then after = count + 1 end
    return {1, math.max(max - after, 0), 0, 0}, after
  end
  local retry = 1000000000
  if max == 0 then retry = -1 end
  return {0, math.max(max - count, 0), 0, retry}, nil
end

-- Queued settlements, first.
local METRICS = {'requests', 'input_tokens', 'output_tokens', 'compute_ns', 'micro_dollars'}
local n = num()
if n > 0 then
  local applied, low = key(), arg()
  redis.call('ZREMRANGEBYSCORE', applied, '-inf', '(' .. low)
  for _ = 1, n do
    local seq = arg()
    local skip = redis.call('ZSCORE', applied, seq) ~= false
    set_now(arg())
    local hold, rules = arg(), num()
    for _ = 1, rules do
      local kind, k = arg(), key()
      if kind == 'r' then
        local t, burst, reserved, actual = num(), num(), num(), num()
        if not skip then rate_settle(k, t, burst, reserved, actual) end
      elseif kind == 'w' then
        local e, reserved, actual = arg(), num(), num()
        if not skip then
          local d = until_ns(e)
          if live(d) then
            -- Exact: used, reserved and actual are at most 2^52.
            local used = used_of(k, d) - reserved + actual
            if used < 0 then used = 0 elseif used > MAXD then used = MAXD end
            store_used(k, used, d)
          end
        end
      elseif not skip then
        redis.call('ZREM', k, hold)
      end
    end
    if arg() == '1' then
      local lk, expire_at, field = key(), arg(), arg()
      for m = 1, 5 do
        local v = arg()
        -- A total past 2^63 fails alone (pcall): it stays where it was.
        if not skip and (m == 1 or v ~= '0') then redis.pcall('HINCRBY', lk, field .. METRICS[m], v) end
      end
      if not skip then redis.call('EXPIREAT', lk, expire_at) end
    end
    -- Recorded once applied: a settlement that fails half-way is not marked,
    -- so it fails again when sent alone, and is dropped and counted.
    if not skip then redis.call('ZADD', applied, seq, seq) end
  end
  redis.call('PEXPIRE', applied, APPLIED_TTL)
end

-- Then the charges.
local c = num()
if c == 0 then return {} end
set_now(arg())
local hold = arg()
local nus = now_us()
local pending, rules, out, all = {}, {}, {}, true
for i = 1, c do
  local r = {kind = arg(), key = key()}
  local p = pending[r.key]
  if r.kind == 'r' then
    r.t, r.burst, r.cost = num(), num(), num()
    local ahead
    if p then ahead = p.ahead else ahead = ahead_of(redis.call('GET', r.key)) end
    out[i] = decide(ahead, r.t, r.burst, r.cost)
    if out[i][1] == 1 then pending[r.key] = {kind = 'r', ahead = out[i][3]} end
  elseif r.kind == 'w' then
    r.limit, r.e, r.cost = num(), arg(), num()
    r.d = until_ns(r.e)
    local used
    if p then used = p.used else used = used_of(r.key, r.d) end
    out[i] = wdecide(r.limit, used, r.d, r.cost)
    if out[i][1] == 1 then pending[r.key] = {kind = 'w', used = used + r.cost, d = r.d} end
  else
    r.max, r.lease = num(), num()
    local count, held
    if p then count, held = p.count, true else count, held = holds(r.key, hold, nus) end
    local o, after = cdecide(r.max, count, held)
    out[i] = o
    if after then pending[r.key] = {kind = 'c', count = after, lease = r.lease} end
  end
  rules[i] = r
  if out[i][1] ~= 1 then all = false end
end
if all then
  for k, p in pairs(pending) do
    if p.kind == 'r' then
      write(k, p.ahead)
    elseif p.kind == 'w' then
      store_used(k, p.used, p.d)
    else
      redis.call('ZADD', k, nus + p.lease, hold)
      local want = floordiv(p.lease, 1000) + 60000
      if redis.call('PTTL', k) < want then redis.call('PEXPIRE', k, want) end
    end
  end
else
  -- Nothing is charged; rules that would have allowed report their state.
  for i = 1, c do
    if out[i][1] == 1 then
      local r = rules[i]
      if r.kind == 'r' then
        out[i] = decide(ahead_of(redis.call('GET', r.key)), r.t, r.burst, 0)
      elseif r.kind == 'w' then
        out[i] = wdecide(r.limit, used_of(r.key, r.d), r.d, 0)
      else
        out[i] = {1, math.max(r.max - redis.call('ZCARD', r.key), 0), 0, 0}
      end
    end
  end
end
local flat = {}
for i = 1, c do
  for j = 1, 4 do flat[#flat + 1] = out[i][j] end
end
return flat
"#;

/// A ledger entry as the script books it.
#[derive(Debug, Clone)]
struct QueuedLedger {
    key: String,
    expire_at: i64,
    field: String,
    usage: LedgerUsage,
}

/// One request's settlement, waiting for a script call to carry it.
#[derive(Debug, Clone)]
struct Queued {
    seq: u64,
    now: Option<u64>,
    hold_id: String,
    settlements: Vec<OwnedSettlement>,
    ledger: Option<QueuedLedger>,
    queued_at: Instant,
}

#[derive(Default)]
struct Queue {
    /// Oldest first.
    items: VecDeque<Queued>,
    /// Settlements set aside after a script error: sent alone, one per call.
    suspects: VecDeque<Queued>,
    /// Sequence numbers queued or in flight.
    unresolved: BTreeSet<u64>,
}

impl Queue {
    fn len(&self) -> usize {
        self.items.len() + self.suspects.len()
    }

    /// Drops the oldest settlements beyond [`MAX_QUEUED`]; how many.
    fn trim(&mut self) -> u64 {
        let mut dropped = 0;
        while self.len() > MAX_QUEUED {
            let suspect_older = match (self.items.front(), self.suspects.front()) {
                (Some(a), Some(b)) => b.queued_at <= a.queued_at,
                (None, _) => true,
                (_, None) => false,
            };
            let gone = if suspect_older {
                self.suspects.pop_front()
            } else {
                self.items.pop_front()
            };
            if let Some(gone) = gone {
                self.unresolved.remove(&gone.seq);
                dropped += 1;
            }
        }
        dropped
    }

    fn oldest(&self) -> Option<Instant> {
        let a = self.items.front().map(|q| q.queued_at);
        let b = self.suspects.front().map(|q| q.queued_at);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What the store instances and the background task share.
struct Shared {
    conn: ConnectionManager,
    prefix: String,
    /// `{prefix}:applied:{instance}`.
    applied_key: String,
    script: Script,
    queue: Mutex<Queue>,
    /// Wakes the background task: settlements queued, or the last store
    /// dropped.
    wake: Notify,
    next_seq: AtomicU64,
    round_trips: AtomicU64,
    dropped: AtomicU64,
}

/// Which queued settlements a call takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    /// Ordinary ones, to carry with a check.
    Carry,
    /// One set-aside one, to send alone.
    Suspect,
}

/// Queued settlements taken by one call: put back if the call fails or is
/// cancelled (a caller's timeout dropping the future), released once sent.
struct Batch<'a> {
    shared: &'a Shared,
    items: Vec<Queued>,
    /// The lowest sequence number still unresolved on this instance.
    low: u64,
}

impl Batch<'_> {
    /// The call ran in Redis: these settlements are done.
    fn sent(mut self) {
        if self.items.is_empty() {
            return;
        }
        let items = std::mem::take(&mut self.items);
        let mut queue = self.shared.lock();
        for item in &items {
            queue.unresolved.remove(&item.seq);
        }
    }

    /// The call failed with `error`; `alone` when it carried nothing else.
    fn failed(mut self, error: &RedisError, alone: bool) {
        let items = std::mem::take(&mut self.items);
        if items.is_empty() {
            return;
        }
        if !poisonous(error) {
            self.shared.requeue(items, false);
        } else if !alone {
            tracing::warn!(error = %error, settlements = items.len(), "limit script failed: its settlements are retried one by one");
            self.shared.requeue(items, true);
        } else {
            tracing::warn!(error = %error, settlements = items.len(), "a limit settlement fails on its own: dropped");
            let mut queue = self.shared.lock();
            for item in &items {
                queue.unresolved.remove(&item.seq);
            }
            drop(queue);
            self.shared.dropped.fetch_add(items.len() as u64, Ordering::Relaxed);
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        // Neither sent nor failed: the call was cancelled, and may or may
        // not have run; the sequence numbers make a retry safe either way.
        if !self.items.is_empty() {
            self.shared.requeue(std::mem::take(&mut self.items), false);
        }
    }
}

/// Whether a failure may come from what the call asked (so retrying the
/// same settlements could fail forever) rather than from reaching Redis.
fn poisonous(error: &RedisError) -> bool {
    if error.code() == Some("OOM") {
        return false;
    }
    matches!(
        error.kind(),
        ErrorKind::Server(ServerErrorKind::ResponseError | ServerErrorKind::ExecAbort)
            | ErrorKind::Extension
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::Parse
    )
}

/// Keys and arguments of one script call.
#[derive(Default)]
struct Call {
    keys: Vec<String>,
    args: Vec<String>,
}

impl Call {
    fn arg(&mut self, a: impl ToString) -> &mut Call {
        self.args.push(a.to_string());
        self
    }

    fn key(&mut self, k: String) -> &mut Call {
        self.keys.push(k);
        self
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Every update of the queue is a push or a pop: a panic elsewhere
        // cannot leave it inconsistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key(&self, kind: &str, key: &str) -> String {
        format!("{{{}}}:{kind}:{key}", self.prefix)
    }

    fn enqueue(&self, item: Queued) {
        let mut queue = self.lock();
        let was_empty = queue.len() == 0;
        queue.unresolved.insert(item.seq);
        queue.items.push_back(item);
        let dropped = queue.trim();
        drop(queue);
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Puts settlements back at the front (they are the oldest), as
    /// suspects or not.
    fn requeue(&self, items: Vec<Queued>, suspect: bool) {
        let mut queue = self.lock();
        let deque = if suspect { &mut queue.suspects } else { &mut queue.items };
        for item in items.into_iter().rev() {
            deque.push_front(item);
        }
        let dropped = queue.trim();
        drop(queue);
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        self.wake.notify_one();
    }

    fn take(&self, take: Take) -> Batch<'_> {
        let mut queue = self.lock();
        let items: Vec<Queued> = match take {
            Take::Carry => {
                let n = queue.items.len().min(MAX_BATCH);
                queue.items.drain(..n).collect()
            }
            Take::Suspect => queue.suspects.pop_front().into_iter().collect(),
        };
        let low = queue.unresolved.first().copied().unwrap_or(0);
        Batch {
            shared: self,
            items,
            low,
        }
    }

    /// Appends queued settlements to a call.
    fn push_settlements(&self, call: &mut Call, batch: &Batch<'_>) {
        call.arg(batch.items.len());
        if batch.items.is_empty() {
            return;
        }
        call.key(self.applied_key.clone()).arg(batch.low);
        for item in &batch.items {
            call.arg(item.seq)
                .arg(item.now.map(|n| n.to_string()).unwrap_or_default())
                .arg(&item.hold_id)
                .arg(item.settlements.len());
            for s in &item.settlements {
                match s.limit {
                    Limit::Rate(rate) => {
                        call.arg("r")
                            .key(self.key("rate", &s.key))
                            .arg(rate.interval_ns())
                            .arg(rate.burst())
                            .arg(s.reserved)
                            .arg(s.actual);
                    }
                    Limit::Window { window_end_ns, .. } => {
                        call.arg("w")
                            .key(self.key("window", &s.key))
                            .arg(window_end_ns)
                            .arg(s.reserved.min(MAX_UNITS))
                            .arg(s.actual.min(MAX_UNITS));
                    }
                    Limit::Concurrency { .. } => {
                        call.arg("c").key(self.key("conc", &s.key));
                    }
                }
            }
            match &item.ledger {
                None => {
                    call.arg("0");
                }
                Some(l) => {
                    call.arg("1").key(l.key.clone()).arg(l.expire_at).arg(&l.field);
                    for (_, value) in l.usage.metrics() {
                        call.arg(value);
                    }
                }
            }
        }
    }

    /// Runs the script: one round trip, two when Redis lost the script.
    async fn eval(&self, call: &Call) -> Result<redis::Value, RedisError> {
        let mut conn = self.conn.clone();
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha
            .arg(self.script.get_hash())
            .arg(call.keys.len())
            .arg(&call.keys)
            .arg(&call.args);
        match evalsha.query_async(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.round_trips.fetch_add(1, Ordering::Relaxed);
                let mut eval = redis::cmd("EVAL");
                eval.arg(script_source())
                    .arg(call.keys.len())
                    .arg(&call.keys)
                    .arg(&call.args);
                eval.query_async(&mut conn).await
            }
            other => other,
        }
    }

    /// Sends one batch of queued settlements alone; false when there was
    /// nothing to send.
    async fn flush_one(&self, take: Take) -> Result<bool, RedisError> {
        let batch = self.take(take);
        if batch.items.is_empty() {
            return Ok(false);
        }
        let mut call = Call::default();
        self.push_settlements(&mut call, &batch);
        call.arg(0);
        match self.eval(&call).await {
            Ok(_) => {
                batch.sent();
                Ok(true)
            }
            Err(e) => {
                batch.failed(&e, take == Take::Suspect);
                Err(e)
            }
        }
    }

    /// Sends what is queued now (set-aside settlements one by one, the
    /// others in batches), not what is queued meanwhile.
    async fn flush(&self) -> Result<(), RedisError> {
        let (mut suspects, mut items) = {
            let queue = self.lock();
            (queue.suspects.len(), queue.items.len())
        };
        while suspects > 0 && self.flush_one(Take::Suspect).await? {
            suspects -= 1;
        }
        while items > 0 && self.flush_one(Take::Carry).await? {
            items = items.saturating_sub(MAX_BATCH);
        }
        Ok(())
    }
}

/// The script's source, with its constants filled in.
fn script_source() -> String {
    SCRIPT.replace("APPLIED_TTL", &APPLIED_TTL_MS.to_string())
}

/// Ends when the last [`RedisStore`] clone is dropped (after one last
/// flush): `alive` is then dead.
async fn background(shared: Arc<Shared>, alive: Weak<Handle>) {
    let mut backoff = Duration::ZERO;
    loop {
        if alive.strong_count() == 0 {
            if let Err(e) = shared.flush().await {
                tracing::warn!(error = %e, "queued limit settlements lost: the store was dropped while Redis failed");
            }
            return;
        }
        let oldest = shared.lock().oldest();
        let Some(oldest) = oldest else {
            shared.wake.notified().await;
            continue;
        };
        let due = (oldest + FLUSH_AFTER).max(Instant::now() + backoff);
        if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
            continue;
        }
        match shared.flush().await {
            Ok(()) => backoff = Duration::ZERO,
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_BACKOFF);
                tracing::debug!(error = %e, ?backoff, "sending queued limit settlements failed; retrying");
            }
        }
    }
}

/// Held by every [`RedisStore`] clone; its drop tells the background task
/// that the last one is gone.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.wake.notify_one();
    }
}

/// The state of any number of limit keys, and the usage ledger, in Redis,
/// shared by every instance that uses the same prefix. Clones share one
/// connection, one settlement queue and one background task.
/// Reconnects quickly: a decision waits for Redis only as long as the
/// caller's timeout, and the fail modes cover the rest.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(3)
}

#[derive(Clone)]
pub struct RedisStore {
    handle: Arc<Handle>,
}

impl RedisStore {
    /// Connects to Redis at `url` (`redis://host:port/db`); every key this
    /// store touches is `{prefix}:…`. The connection is re-established
    /// automatically when it drops. Loads the script, and starts the task
    /// that sends idle settlements (on the current Tokio runtime).
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisStore, RedisStoreError> {
        // An empty tag `{}` is no hash tag at all in Redis Cluster: keys
        // would scatter over slots and the multi-key script would fail.
        if prefix.is_empty() || prefix.contains(['{', '}']) {
            return Err(RedisStoreError::Prefix(prefix.to_owned()));
        }
        let client = redis::Client::open(url)?;
        let mut conn = ConnectionManager::new_with_config(client, manager_config()).await?;
        let script = Script::new(&script_source());
        script.load_async(&mut conn).await?;
        Ok(RedisStore::start(conn, prefix, script, 1))
    }

    /// Like [`RedisStore::connect`], but without reaching Redis now: the
    /// connection is made on first use (and the script loaded then), so a
    /// gateway can start while Redis is down and apply its rules' fail
    /// modes until Redis is back. Fails only on a malformed URL or prefix.
    pub fn connect_lazy(url: &str, prefix: &str) -> Result<RedisStore, RedisStoreError> {
        if prefix.is_empty() || prefix.contains(['{', '}']) {
            return Err(RedisStoreError::Prefix(prefix.to_owned()));
        }
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config())?;
        Ok(RedisStore::start(conn, prefix, Script::new(&script_source()), 0))
    }

    /// The store over `conn`, with its settlement task started;
    /// `round_trips` counts those already made (the script load).
    fn start(conn: ConnectionManager, prefix: &str, script: Script, round_trips: u64) -> RedisStore {
        let instance = uuid::Uuid::now_v7().simple().to_string();
        let shared = Arc::new(Shared {
            conn,
            prefix: prefix.to_owned(),
            applied_key: format!("{{{prefix}}}:applied:{instance}"),
            script,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            next_seq: AtomicU64::new(1),
            round_trips: AtomicU64::new(round_trips),
            dropped: AtomicU64::new(0),
        });
        let handle = Arc::new(Handle {
            shared: Arc::clone(&shared),
        });
        tokio::spawn(background(shared, Arc::downgrade(&handle)));
        RedisStore { handle }
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// Decides every rule of one request on Redis's clock, all or nothing,
    /// exactly as [`super::memory::MemoryStore::check_all`] does, after
    /// applying every settlement queued on this store: one round trip.
    ///
    /// If the call fails (or the future is dropped before it ends), the
    /// settlements it carried stay queued.
    pub async fn check_all(&self, hold_id: &str, charges: &[Charge<'_>]) -> Result<Vec<Outcome>, RedisStoreError> {
        self.run_check(None, hold_id, charges).await
    }

    /// [`RedisStore::check_all`] at `now` (ns since the Unix epoch) instead
    /// of Redis's clock: for tests and replays. Keys still expire on Redis's
    /// clock.
    pub async fn check_all_at(
        &self,
        now: u64,
        hold_id: &str,
        charges: &[Charge<'_>],
    ) -> Result<Vec<Outcome>, RedisStoreError> {
        self.run_check(Some(now), hold_id, charges).await
    }

    /// Settles every rule of one admitted request, as
    /// [`super::memory::MemoryStore::settle`] does, and books its usage in
    /// the ledger, on Redis's clock when the settlement reaches Redis (with
    /// the next check, or within about [`FLUSH_AFTER`]). Synchronous and
    /// cheap: it only queues owned copies. A ledger entry whose day is not
    /// `YYYY-MM-DD` is dropped, with a warning.
    pub fn settle(&self, hold_id: &str, settlements: &[Settlement<'_>], ledger: Option<LedgerEntry<'_>>) {
        self.queue(None, hold_id, settlements, ledger);
    }

    /// [`RedisStore::settle`] at `now` (ns since the Unix epoch).
    pub fn settle_at(&self, now: u64, hold_id: &str, settlements: &[Settlement<'_>], ledger: Option<LedgerEntry<'_>>) {
        self.queue(Some(now), hold_id, settlements, ledger);
    }

    /// Sends every settlement queued now, without waiting for a check: at
    /// shutdown, and for tests. A failed send leaves the rest queued.
    pub async fn flush(&self) -> Result<(), RedisStoreError> {
        Ok(self.shared().flush().await?)
    }

    /// The ledger's totals for every day from `from_day` to `to_day`
    /// inclusive (`YYYY-MM-DD`), sorted by day, principal, tenant and model:
    /// one round trip. At most the last [`LEDGER_RETENTION_DAYS`] + 1 days
    /// of the range are read (older ones have expired). Settlements still
    /// queued are not included: [`RedisStore::flush`] first to read one's
    /// own writes.
    pub async fn ledger(&self, from_day: &str, to_day: &str) -> Result<Vec<LedgerRow>, RedisStoreError> {
        let from = parse_day(from_day).ok_or_else(|| RedisStoreError::Day(from_day.to_owned()))?;
        let to = parse_day(to_day).ok_or_else(|| RedisStoreError::Day(to_day.to_owned()))?;
        let earliest = to
            .checked_sub(jiff::Span::new().days(i64::from(LEDGER_RETENTION_DAYS)))
            .unwrap_or(from);
        let mut day = from.max(earliest);
        let mut days = Vec::new();
        while day <= to {
            days.push(day.to_string());
            match day.tomorrow() {
                Ok(next) => day = next,
                Err(_) => break,
            }
        }
        if days.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for day in &days {
            pipe.cmd("HGETALL").arg(self.shared().key("ledger", day));
        }
        let mut conn = self.shared().conn.clone();
        self.shared().round_trips.fetch_add(1, Ordering::Relaxed);
        let totals: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        let mut rows = Vec::new();
        for (day, fields) in days.iter().zip(totals) {
            let mut by_who: HashMap<(String, String, String), LedgerUsage> = HashMap::new();
            for (field, value) in &fields {
                let Some((principal, tenant, model, metric)) = parse_ledger_field(field) else {
                    continue;
                };
                let value: u64 = value.parse().unwrap_or(0);
                let usage = by_who
                    .entry((principal.to_owned(), tenant.to_owned(), model.to_owned()))
                    .or_default();
                if !usage.set(metric, value) {
                    return Err(RedisStoreError::Reply(format!("ledger field {field:?}")));
                }
            }
            rows.extend(by_who.into_iter().map(|((principal, tenant, model), usage)| LedgerRow {
                day: day.clone(),
                principal,
                tenant,
                model,
                usage,
            }));
        }
        sort_rows(&mut rows);
        Ok(rows)
    }

    /// Commands sent to Redis by this store (and its clones) so far: one
    /// per check, flush or ledger read, plus one when Redis had lost the
    /// script, plus the script load in [`RedisStore::connect`]. Settlements
    /// carried by a check add nothing.
    pub fn round_trips(&self) -> u64 {
        self.shared().round_trips.load(Ordering::Relaxed)
    }

    /// Settlements dropped so far: beyond [`MAX_QUEUED`] while Redis failed,
    /// or failing on their own.
    pub fn dropped_settlements(&self) -> u64 {
        self.shared().dropped.load(Ordering::Relaxed)
    }

    /// Settlements queued now, not yet sent.
    pub fn queued_settlements(&self) -> usize {
        self.shared().lock().len()
    }

    fn queue(&self, now: Option<u64>, hold_id: &str, settlements: &[Settlement<'_>], ledger: Option<LedgerEntry<'_>>) {
        let shared = self.shared();
        let ledger = ledger.and_then(|entry| {
            let Some(date) = parse_day(entry.day) else {
                tracing::warn!(day = entry.day, "ledger entry dropped: the day is not YYYY-MM-DD");
                return None;
            };
            Some(QueuedLedger {
                key: shared.key("ledger", entry.day),
                expire_at: ledger_expiry(date),
                field: ledger_field(entry.principal, entry.tenant, entry.model),
                usage: entry.usage,
            })
        });
        if settlements.is_empty() && ledger.is_none() {
            return;
        }
        shared.enqueue(Queued {
            seq: shared.next_seq.fetch_add(1, Ordering::Relaxed),
            now,
            hold_id: hold_id.to_owned(),
            settlements: settlements.iter().map(OwnedSettlement::from).collect(),
            ledger,
            queued_at: Instant::now(),
        });
    }

    async fn run_check(
        &self,
        now: Option<u64>,
        hold_id: &str,
        charges: &[Charge<'_>],
    ) -> Result<Vec<Outcome>, RedisStoreError> {
        if charges.is_empty() {
            return Ok(Vec::new());
        }
        let shared = self.shared();
        let batch = shared.take(Take::Carry);
        let mut call = Call::default();
        shared.push_settlements(&mut call, &batch);
        call.arg(charges.len())
            .arg(now.map(|n| n.to_string()).unwrap_or_default())
            .arg(hold_id);
        for c in charges {
            match c.limit {
                Limit::Rate(rate) => {
                    call.arg("r")
                        .key(shared.key("rate", c.key))
                        .arg(rate.interval_ns())
                        .arg(rate.burst())
                        .arg(c.cost);
                }
                Limit::Window { limit, window_end_ns } => {
                    call.arg("w")
                        .key(shared.key("window", c.key))
                        .arg(limit.min(MAX_UNITS))
                        .arg(window_end_ns)
                        .arg(c.cost.min(MAX_UNITS + 1));
                }
                Limit::Concurrency { max, lease } => {
                    call.arg("c")
                        .key(shared.key("conc", c.key))
                        .arg(max.min(MAX_UNITS))
                        .arg(lease_us(lease));
                }
            }
        }
        let reply = match shared.eval(&call).await {
            Ok(reply) => {
                batch.sent();
                reply
            }
            Err(e) => {
                batch.failed(&e, false);
                return Err(e.into());
            }
        };
        let reply: Vec<i64> = redis::from_redis_value(reply).map_err(|e| RedisStoreError::Reply(e.to_string()))?;
        if reply.len() != charges.len() * 4 {
            return Err(RedisStoreError::Reply(format!(
                "{} integers for {} rules",
                reply.len(),
                charges.len()
            )));
        }
        reply.chunks_exact(4).map(outcome).collect()
    }
}

/// When a ledger day's hash expires: [`LEDGER_RETENTION_DAYS`] after the
/// day began (UTC), in Unix seconds.
fn ledger_expiry(day: jiff::civil::Date) -> i64 {
    day.checked_add(jiff::Span::new().days(i64::from(LEDGER_RETENTION_DAYS)))
        .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC))
        .map(|z| z.timestamp().as_second())
        // Only beyond the year 9999: keep it as long as Redis can.
        .unwrap_or(i64::MAX / 1000)
}

/// One rule's four integers from the script.
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
    use crate::limits::gcra::Rate;
    use crate::limits::store::CONCURRENCY_RETRY_AFTER;

    const REDIS: &str = "redis://127.0.0.1:6379";
    const SEC: u64 = 1_000_000_000;

    /// A store on a fresh key prefix, or `None` when Redis is not running
    /// here and this is not CI (where it must run, so the test fails).
    async fn fresh() -> Option<(RedisStore, String)> {
        let prefix = format!("warden_unit_{}", uuid::Uuid::now_v7().simple());
        match RedisStore::connect(REDIS, &prefix).await {
            Ok(store) => Some((store, prefix)),
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipped: Redis not reachable at 127.0.0.1:6379 ({e}); CI runs this test");
                None
            }
            Err(e) => panic!("Redis must be running for CI: {e}"),
        }
    }

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

    fn window(limit: u64, end: u64) -> Limit {
        Limit::Window {
            limit,
            window_end_ns: end,
        }
    }

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

    #[test]
    fn ledger_days_expire_after_the_retention() {
        let day: jiff::civil::Date = "2026-01-01".parse().unwrap();
        // 2027-02-05 00:00:00 UTC.
        assert_eq!(ledger_expiry(day), 1_801_785_600);
    }

    #[tokio::test]
    async fn a_braced_prefix_is_refused() {
        for prefix in ["a{b", "a}b", ""] {
            let err = RedisStore::connect(REDIS, prefix).await.err().unwrap();
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

    #[tokio::test]
    async fn window_refuses_at_the_limit_refunds_and_keeps_debt() {
        let Some((store, prefix)) = fresh().await else {
            return;
        };
        let mut conn = raw().await;
        let now = redis_now(&mut conn).await;
        let w = window(10, now + 3600 * SEC);
        let out = store.check_all("a", &[charge("day", w, 4)]).await.unwrap();
        assert!(out[0].allowed);
        assert_eq!(out[0].remaining, 6);
        assert!(out[0].reset_after <= Duration::from_secs(3600));
        assert!(out[0].reset_after > Duration::from_secs(3590));
        let out = store.check_all("b", &[charge("day", w, 7)]).await.unwrap();
        assert!(!out[0].allowed);
        assert_eq!(out[0].remaining, 6);
        assert_eq!(out[0].retry_after, Some(out[0].reset_after));
        assert!(store.check_all("b", &[charge("day", w, 6)]).await.unwrap()[0].allowed);
        let out = store.check_all("c", &[charge("day", w, 11)]).await.unwrap();
        assert_eq!(out[0].retry_after, None, "more than the window: never");
        // The key expires at the window's end plus the grace.
        let key = format!("{{{prefix}}}:window:day");
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
        assert!((3_650_000..=3_660_001).contains(&ttl), "PTTL {ttl}");
        // A refund: used 1 of the 6 reserved.
        store.settle("b", &[settlement("day", w, 6, 1)], None);
        let out = store.check_all("d", &[charge("day", w, 0)]).await.unwrap();
        assert_eq!(out[0].remaining, 5);
        // Debt: 4 reserved, 20 used; the window is 9 over its limit.
        store.settle("a", &[settlement("day", w, 4, 20)], None);
        let out = store.check_all("e", &[charge("day", w, 0)]).await.unwrap();
        assert!(!out[0].allowed);
        assert_eq!(out[0].remaining, 0);
        let used: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
        assert_eq!(used, "21");
        // Refunds stop at zero, and an unused window needs no key.
        store.settle("a", &[settlement("day", w, 500, 0)], None);
        store.flush().await.unwrap();
        let exists: i64 = redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await.unwrap();
        assert_eq!(exists, 0);
    }

    #[tokio::test]
    async fn window_end_resets() {
        let Some((store, _)) = fresh().await else {
            return;
        };
        let t0 = 1_800_000_000 * SEC;
        let hour = 3600 * SEC;
        let w1 = window(5, t0 + hour);
        assert!(store.check_all_at(t0, "a", &[charge("h:0", w1, 5)]).await.unwrap()[0].allowed);
        assert!(!store.check_all_at(t0, "b", &[charge("h:0", w1, 1)]).await.unwrap()[0].allowed);
        // Within the grace after the end the old window still counts.
        let late = t0 + hour + SEC;
        let out = store.check_all_at(late, "c", &[charge("h:0", w1, 1)]).await.unwrap();
        assert!(!out[0].allowed);
        assert_eq!(out[0].retry_after, Some(Duration::ZERO));
        // The next window, a new key, starts empty.
        let w2 = window(5, t0 + 2 * hour);
        let out = store.check_all_at(late, "c", &[charge("h:1", w2, 1)]).await.unwrap();
        assert!(out[0].allowed);
        assert_eq!(out[0].remaining, 4);
        // Past the grace, the old window is over.
        let over = t0 + hour + 60 * SEC;
        assert!(store.check_all_at(over, "d", &[charge("h:0", w1, 5)]).await.unwrap()[0].allowed);
    }

    #[tokio::test]
    async fn concurrency_holds_release_and_leases_expire() {
        let Some((store, prefix)) = fresh().await else {
            return;
        };
        let c = Limit::Concurrency {
            max: 2,
            lease: Duration::from_millis(200),
        };
        let out = store.check_all("r1", &[charge("conc", c, 50)]).await.unwrap();
        assert!(out[0].allowed);
        assert_eq!(out[0].remaining, 1);
        assert!(store.check_all("r2", &[charge("conc", c, 1)]).await.unwrap()[0].allowed);
        let out = store.check_all("r3", &[charge("conc", c, 1)]).await.unwrap();
        assert!(!out[0].allowed);
        assert_eq!(out[0].retry_after, Some(CONCURRENCY_RETRY_AFTER));
        assert_eq!(out[0].reset_after, Duration::ZERO);
        // r2 again: no second hold.
        assert!(store.check_all("r2", &[charge("conc", c, 1)]).await.unwrap()[0].allowed);
        // Releasing r1 makes room, with the very next check.
        store.settle("r1", &[settlement("conc", c, 1, 0)], None);
        let out = store.check_all("r3", &[charge("conc", c, 1)]).await.unwrap();
        assert!(out[0].allowed);
        assert_eq!(out[0].remaining, 0);
        let mut conn = raw().await;
        let key = format!("{{{prefix}}}:conc:conc");
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(members, ["r2", "r3"]);
        // r2 and r3 crash: their leases end and the slots come back.
        assert!(!store.check_all("r4", &[charge("conc", c, 1)]).await.unwrap()[0].allowed);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let out = store.check_all("r4", &[charge("conc", c, 1)]).await.unwrap();
        assert!(out[0].allowed);
        assert_eq!(out[0].remaining, 1, "both expired holds were pruned");
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
        assert!((60_000..=60_200).contains(&ttl), "PTTL {ttl}");
    }

    #[tokio::test]
    async fn all_or_nothing_across_kinds() {
        let Some((store, _)) = fresh().await else {
            return;
        };
        let t0 = 1_800_000_000 * SEC;
        let r = Limit::Rate(Rate::new(10, Duration::from_secs(1), 10).unwrap());
        let w = window(100, t0 + 60 * SEC);
        let c = Limit::Concurrency {
            max: 1,
            lease: Duration::from_secs(60),
        };
        let rules = |cost| [charge("k", r, 1), charge("k", w, cost), charge("k", c, 1)];
        let allowed = |out: &[Outcome]| out.iter().map(|o| o.allowed).collect::<Vec<_>>();
        let out = store.check_all_at(t0, "r1", &rules(10)).await.unwrap();
        assert_eq!(allowed(&out), [true, true, true]);
        let out = store.check_all_at(t0, "r2", &rules(10)).await.unwrap();
        assert_eq!(allowed(&out), [true, true, false]);
        assert_eq!((out[0].remaining, out[1].remaining), (9, 90), "uncharged");
        store.settle_at(t0, "r1", &[settlement("k", c, 1, 0)], None);
        let out = store.check_all_at(t0, "r3", &rules(91)).await.unwrap();
        assert_eq!(allowed(&out), [true, false, true]);
        assert_eq!(out[2].remaining, 1, "no hold taken");
        let out = store.check_all_at(t0, "r4", &rules(90)).await.unwrap();
        assert_eq!(allowed(&out), [true, true, true]);
        assert_eq!(out.iter().map(|o| o.remaining).collect::<Vec<_>>(), [8, 0, 0]);
    }

    #[tokio::test]
    async fn ledger_totals() {
        let Some((store, prefix)) = fresh().await else {
            return;
        };
        let usage = |requests, dollars| LedgerUsage {
            requests,
            input_tokens: 10 * requests,
            output_tokens: 5,
            compute_ns: 1_000,
            micro_dollars: dollars,
        };
        // Names with the separators of a naive encoding in them.
        let entry = |day, principal, usage| LedgerEntry {
            day,
            principal,
            tenant: "acme:1",
            model: "gpt\u{1f}4",
            usage,
        };
        store.settle("a", &[], Some(entry("2026-03-01", "alice", usage(1, 100))));
        store.settle("b", &[], Some(entry("2026-03-01", "alice", usage(2, 250))));
        store.settle("c", &[], Some(entry("2026-03-01", "5:bob", usage(1, 0))));
        store.settle("d", &[], Some(entry("2026-03-02", "alice", usage(1, 1))));
        store.settle("e", &[], Some(entry("2026-3-3", "alice", usage(1, 1))));
        assert_eq!(store.queued_settlements(), 4, "the malformed day is dropped");
        store.flush().await.unwrap();
        let rows = store.ledger("2026-03-01", "2026-03-01").await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].principal.as_str(), rows[1].principal.as_str()),
            ("5:bob", "alice")
        );
        assert_eq!(
            (rows[1].tenant.as_str(), rows[1].model.as_str()),
            ("acme:1", "gpt\u{1f}4")
        );
        assert_eq!(
            rows[1].usage,
            LedgerUsage {
                requests: 3,
                input_tokens: 30,
                output_tokens: 10,
                compute_ns: 2_000,
                micro_dollars: 350
            }
        );
        assert_eq!(rows[0].usage.micro_dollars, 0);
        assert_eq!(store.ledger("2026-02-01", "2026-12-31").await.unwrap().len(), 3);
        assert!(store.ledger("2026-03-02", "2026-03-01").await.unwrap().is_empty());
        assert!(matches!(
            store.ledger("2026-3-1", "2026-03-01").await,
            Err(RedisStoreError::Day(_))
        ));
        // Days expire after the retention.
        let mut conn = raw().await;
        let at: i64 = redis::cmd("EXPIRETIME")
            .arg(format!("{{{prefix}}}:ledger:2026-03-01"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(at, ledger_expiry("2026-03-01".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_retried_settlement_is_applied_once() {
        let Some((store, _)) = fresh().await else {
            return;
        };
        let t0 = 1_800_000_000 * SEC;
        let w = window(100, t0 + 60 * SEC);
        assert!(store.check_all_at(t0, "a", &[charge("w", w, 50)]).await.unwrap()[0].allowed);
        store.settle_at(t0, "a", &[settlement("w", w, 50, 10)], None);
        // Send the settlement, then pretend the reply was lost: the same
        // batch, with the same sequence number, is queued again.
        let batch = store.shared().take(Take::Carry);
        let copy = batch.items.clone();
        let mut call = Call::default();
        store.shared().push_settlements(&mut call, &batch);
        call.arg(0);
        store.shared().eval(&call).await.unwrap();
        drop(batch);
        assert_eq!(store.queued_settlements(), 1, "a dropped batch is requeued");
        assert_eq!(copy[0].seq, store.shared().lock().items[0].seq);
        let out = store.check_all_at(t0, "b", &[charge("w", w, 0)]).await.unwrap();
        assert_eq!(out[0].remaining, 90, "refunded once, not twice");
    }

    #[tokio::test]
    async fn a_poisonous_settlement_is_set_aside_then_dropped() {
        let Some((store, prefix)) = fresh().await else {
            return;
        };
        let mut conn = raw().await;
        let t0 = 1_800_000_000 * SEC;
        let w = window(100, t0 + 60 * SEC);
        // Something else wrote a hash where the window lives.
        let _: () = redis::cmd("HSET")
            .arg(format!("{{{prefix}}}:window:w"))
            .arg("x")
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
        store.settle_at(t0, "a", &[settlement("w", w, 50, 10)], None);
        let r = Limit::Rate(Rate::new(10, Duration::from_secs(1), 10).unwrap());
        assert!(store.check_all_at(t0, "b", &[charge("r", r, 1)]).await.is_err());
        // The next check does not carry it again: it works.
        assert!(store.check_all_at(t0, "c", &[charge("r", r, 1)]).await.unwrap()[0].allowed);
        // Sent alone (by flush or by the background task, whichever comes
        // first), it fails again and is dropped.
        let _ = store.flush().await;
        for _ in 0..100 {
            if store.dropped_settlements() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.queued_settlements(), 0);
        assert_eq!(store.dropped_settlements(), 1);
    }

    #[tokio::test]
    async fn the_background_task_ends_with_the_last_store() {
        let Some((store, prefix)) = fresh().await else {
            return;
        };
        let weak = Arc::downgrade(&store.handle.shared);
        let clone = store.clone();
        drop(store);
        let t0 = 1_800_000_000 * SEC;
        let w = window(100, t0 + 3600 * SEC);
        assert!(clone.check_all_at(t0, "a", &[charge("w", w, 50)]).await.unwrap()[0].allowed);
        clone.settle_at(t0, "a", &[settlement("w", w, 50, 20)], None);
        drop(clone);
        // Its last act is to send what was queued.
        for _ in 0..100 {
            if weak.strong_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(weak.strong_count(), 0, "the task ended and released the connection");
        let mut conn = raw().await;
        let used: String = redis::cmd("GET")
            .arg(format!("{{{prefix}}}:window:w"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(used, "20");
    }

    #[tokio::test]
    async fn the_queue_is_bounded() {
        let Some((store, _)) = fresh().await else {
            return;
        };
        let w = window(100, 1);
        for i in 0..(MAX_QUEUED + 5) {
            store.settle_at(0, &format!("h{i}"), &[settlement("w", w, 1, 0)], None);
        }
        assert_eq!(store.queued_settlements(), MAX_QUEUED);
        assert_eq!(store.dropped_settlements(), 5);
        let first = store.shared().lock().items[0].hold_id.clone();
        assert_eq!(first, "h5", "the oldest went");
        assert_eq!(store.shared().lock().unresolved.len(), MAX_QUEUED);
    }
}
