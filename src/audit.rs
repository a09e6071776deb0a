//! The inference audit log: one JSON line per request, allowed and rejected
//! alike, appended to a file. Records are handed to a single writer thread
//! through an unbounded channel so that no request ever waits on the disk and
//! no record is dropped; the writer flushes whenever it has drained the queue,
//! and [`AuditLog::sync`] waits until everything queued is on disk (used at
//! shutdown).
//!
//! Why a thread of its own and not a task: a task on the runtime writes the
//! file through tokio's blocking pool, so every batch wakes a runtime thread,
//! hands the bytes to a pool thread and wakes the runtime again when the write
//! is done. Under load that was several thousand futex, eventfd and
//! `epoll_wait` calls a second, on the two cores that serve requests. The
//! thread sleeps between batches and writes with plain blocking calls; a
//! request's only cost is the channel send, which wakes the thread only when
//! it has gone idle.
//!
//! The record never holds a credential: only the key id, and SHA-256 digests
//! of the request and response bodies as they were sent.

use std::io;
use std::path::{Path, PathBuf};

use std::io::Write as _;
use std::sync::mpsc;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::reject::Fault;

/// Record format version, bumped on any incompatible change.
pub const RECORD_VERSION: u32 = 1;

/// One request's audit record.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// Record format version.
    pub v: u32,
    /// When the request arrived, RFC 3339 UTC.
    pub time: jiff::Timestamp,
    /// `x-request-id`, accepted from the client or generated.
    pub request_id: &'a str,
    /// Authenticated principal, absent when authentication failed.
    pub principal: Option<&'a str>,
    /// `user`, `service` or `key`.
    pub principal_kind: Option<&'a str>,
    /// How the caller authenticated (`api_key`, `jwt`, `oauth_introspection`,
    /// `mtls`, `aws_iam`, `anonymous`), absent when authentication failed.
    pub auth_method: Option<&'a str>,
    /// Id of the credential used: never the credential itself.
    pub key_id: Option<&'a str>,
    /// Tenant the caller acts for.
    pub tenant: Option<&'a str>,
    /// The known mTLS client on the connection, if any.
    pub client_cert: Option<&'a str>,
    /// Address of the TCP peer.
    pub client_ip: std::net::IpAddr,
    /// `User-Agent`, as sent.
    pub user_agent: Option<&'a str>,
    /// HTTP method.
    pub method: &'a str,
    /// Request path (no query string).
    pub path: &'a str,
    /// Model endpoint name, once known.
    pub model: Option<&'a str>,
    /// Upstream name, once routed.
    pub upstream: Option<&'a str>,
    /// `openai` or `oip_v2`.
    pub protocol: &'a str,
    /// Whether the client asked for a streamed response.
    pub stream: bool,
    /// HTTP status sent to the client.
    pub status: u16,
    /// How the response ended: `completed`, `client_disconnected`,
    /// `upstream_error` or `upstream_idle_timeout`.
    pub outcome: &'a str,
    /// Machine-readable reason when Warden refused or failed the request.
    pub reject_reason: Option<&'a str>,
    /// Finer reason for the rejection, for the audit log only (e.g. why a
    /// token was refused).
    pub reject_detail: Option<String>,
    /// Who caused the failure, when there was one.
    pub fault: Option<Fault>,
    /// Status the upstream answered with.
    pub upstream_status: Option<u16>,
    /// From arrival to the last byte sent, in milliseconds.
    pub latency_ms: f64,
    /// From sending upstream to the response head, in milliseconds.
    pub upstream_latency_ms: Option<f64>,
    /// Lowercase hex SHA-256 of the request body as received.
    pub request_sha256: Option<Sha256Digest>,
    /// Request body length.
    pub request_bytes: u64,
    /// Lowercase hex SHA-256 of the response body bytes sent to the client.
    pub response_sha256: Sha256Digest,
    /// Response body length sent.
    pub response_bytes: u64,
    /// The tenants (data partitions) the request touched, from its payload.
    pub data_tenants: &'a [String],
    /// Every policy decision: level, result, engine, policy version and
    /// the determining policies.
    pub decisions: &'a [crate::authz::Decision],
    /// Every input validation check's verdict: check, result, score, reason.
    pub validation: &'a [crate::validate::stage::Verdict],
    /// Every limit rule's verdict: rule, unit, kind, allowed, cost,
    /// remaining, and `fallback: local` when Redis was unreachable.
    pub limits: &'a [crate::limits::admit::RuleOutcome],
    /// What the output content policy found in the answer: detector,
    /// action and count of each.
    pub output: &'a [crate::output::inspect::OutputFinding],
    /// Token usage reported by the upstream, when present.
    pub usage: Option<Usage>,
}

impl AuditRecord<'_> {
    /// Writes the record as one JSON object, byte for byte what
    /// `serde_json::to_vec` makes of the derived `Serialize` (a test holds
    /// the two together), but faster: every request pays for this line, and
    /// the derived path spends most of its time escaping the field names
    /// and the hex digests, which never need it. Only the values that can
    /// hold arbitrary text go through serde_json's escaping.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        fn value<T: Serialize + ?Sized>(out: &mut Vec<u8>, key: &str, v: &T) -> serde_json::Result<()> {
            out.extend_from_slice(key.as_bytes());
            serde_json::to_writer(&mut *out, v)
        }
        // Most text values need no escaping (serde_json escapes only
        // control characters, `"` and `\`): those are copied as they are.
        fn text(out: &mut Vec<u8>, key: &str, v: Option<&str>) -> serde_json::Result<()> {
            out.extend_from_slice(key.as_bytes());
            match v {
                None => out.extend_from_slice(b"null"),
                Some(s) if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') => {
                    out.push(b'"');
                    out.extend_from_slice(s.as_bytes());
                    out.push(b'"');
                }
                Some(s) => serde_json::to_writer(&mut *out, s)?,
            }
            Ok(())
        }
        fn digest(out: &mut Vec<u8>, key: &str, d: Option<&Sha256Digest>) {
            out.extend_from_slice(key.as_bytes());
            match d {
                Some(d) => {
                    let mut text = [0u8; 64];
                    // Fixed lengths on both sides: this cannot fail.
                    if hex::encode_to_slice(d.0, &mut text).is_ok() {
                        out.push(b'"');
                        out.extend_from_slice(&text);
                        out.push(b'"');
                    }
                }
                None => out.extend_from_slice(b"null"),
            }
        }
        value(out, "{\"v\":", &self.v)?;
        // RFC 3339 and an IP address never need escaping.
        write!(out, ",\"time\":\"{}\"", self.time).map_err(serde_json::Error::io)?;
        text(out, ",\"request_id\":", Some(self.request_id))?;
        text(out, ",\"principal\":", self.principal)?;
        text(out, ",\"principal_kind\":", self.principal_kind)?;
        text(out, ",\"auth_method\":", self.auth_method)?;
        text(out, ",\"key_id\":", self.key_id)?;
        text(out, ",\"tenant\":", self.tenant)?;
        text(out, ",\"client_cert\":", self.client_cert)?;
        out.extend_from_slice(b",\"client_ip\":\"");
        match self.client_ip {
            // Display goes through the formatting machinery, several times
            // the cost of the four numbers.
            std::net::IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    if octet >= 100 {
                        out.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        out.push(b'0' + octet / 10 % 10);
                    }
                    out.push(b'0' + octet % 10);
                }
            }
            std::net::IpAddr::V6(v6) => write!(out, "{v6}").map_err(serde_json::Error::io)?,
        }
        out.push(b'"');
        text(out, ",\"user_agent\":", self.user_agent)?;
        text(out, ",\"method\":", Some(self.method))?;
        text(out, ",\"path\":", Some(self.path))?;
        text(out, ",\"model\":", self.model)?;
        text(out, ",\"upstream\":", self.upstream)?;
        text(out, ",\"protocol\":", Some(self.protocol))?;
        value(out, ",\"stream\":", &self.stream)?;
        value(out, ",\"status\":", &self.status)?;
        text(out, ",\"outcome\":", Some(self.outcome))?;
        text(out, ",\"reject_reason\":", self.reject_reason)?;
        value(out, ",\"reject_detail\":", &self.reject_detail)?;
        value(out, ",\"fault\":", &self.fault)?;
        value(out, ",\"upstream_status\":", &self.upstream_status)?;
        value(out, ",\"latency_ms\":", &self.latency_ms)?;
        value(out, ",\"upstream_latency_ms\":", &self.upstream_latency_ms)?;
        digest(out, ",\"request_sha256\":", self.request_sha256.as_ref());
        value(out, ",\"request_bytes\":", &self.request_bytes)?;
        digest(out, ",\"response_sha256\":", Some(&self.response_sha256));
        value(out, ",\"response_bytes\":", &self.response_bytes)?;
        value(out, ",\"data_tenants\":", self.data_tenants)?;
        value(out, ",\"decisions\":", self.decisions)?;
        value(out, ",\"validation\":", self.validation)?;
        value(out, ",\"limits\":", self.limits)?;
        if self.output.is_empty() {
            out.extend_from_slice(b",\"output\":[]");
        } else {
            value(out, ",\"output\":", self.output)?;
        }
        match &self.usage {
            // The derived form, field by field: the derive's struct
            // machinery cost more than the numbers.
            Some(u) => {
                value(out, ",\"usage\":{\"prompt_tokens\":", &u.prompt_tokens)?;
                value(out, ",\"completion_tokens\":", &u.completion_tokens)?;
                value(out, ",\"total_tokens\":", &u.total_tokens)?;
                if let Some(cached) = u.cached_tokens {
                    value(out, ",\"prompt_tokens_details\":{\"cached_tokens\":", &cached)?;
                    out.push(b'}');
                }
                out.push(b'}');
            }
            None => out.extend_from_slice(b",\"usage\":null"),
        }
        out.push(b'}');
        Ok(())
    }
}

/// A SHA-256 digest, serialized as lowercase hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Sha256Digest {
        use sha2::Digest;
        Sha256Digest(sha2::Sha256::digest(bytes).into())
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut text = [0u8; 64];
        // Both lengths are fixed, so encoding cannot fail.
        hex::encode_to_slice(self.0, &mut text).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(std::str::from_utf8(&text).map_err(serde::ser::Error::custom)?)
    }
}

/// Token usage as the upstream reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Usage {
    /// Input tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Output tokens.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Both.
    #[serde(default)]
    pub total_tokens: u64,
    /// Input tokens served from the upstream's prompt cache
    /// (`prompt_tokens_details.cached_tokens`), when reported.
    #[serde(
        default,
        rename = "prompt_tokens_details",
        deserialize_with = "cached_tokens",
        serialize_with = "serialize_cached_tokens",
        skip_serializing_if = "Option::is_none"
    )]
    pub cached_tokens: Option<u64>,
}

/// Reads `prompt_tokens_details.cached_tokens`.
fn cached_tokens<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(serde::Deserialize)]
    struct Details {
        #[serde(default)]
        cached_tokens: Option<u64>,
    }
    Ok(<Option<Details> as serde::Deserialize>::deserialize(d)?.and_then(|d| d.cached_tokens))
}

/// Writes `prompt_tokens_details: {cached_tokens}`.
fn serialize_cached_tokens<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Details {
        cached_tokens: Option<u64>,
    }
    Details { cached_tokens: *v }.serialize(s)
}

impl Usage {
    /// Reads `usage` from an OpenAI-style response object (or stream
    /// event), if present at its top level. Only `usage` is decoded: the
    /// rest is scanned for structure, never built into values.
    pub fn from_json(bytes: &[u8]) -> Option<Usage> {
        let raw = crate::json_scan::top_level_member(bytes, "usage")?;
        serde_json::from_slice::<Option<Usage>>(raw).ok().flatten()
    }
}

/// How long the writer lets records gather between batches.
const GATHER: std::time::Duration = std::time::Duration::from_millis(2);

/// Appends audit records to a file through one writer thread.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    sender: mpsc::Sender<Message>,
}

#[derive(Debug)]
enum Message {
    Record(Vec<u8>),
    /// Flush and fsync everything queued before this, then answer.
    Sync(oneshot::Sender<io::Result<()>>),
}

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open audit log `{path}`: {source}")]
pub struct AuditOpenError {
    path: String,
    source: io::Error,
}

impl AuditLog {
    /// Opens (creating if needed) the file and starts the writer thread.
    pub async fn open(path: &Path) -> Result<AuditLog, AuditOpenError> {
        let failed = |source| AuditOpenError {
            path: path.display().to_string(),
            source,
        };
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(failed)?
            .into_std()
            .await;
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("warden-audit".to_owned())
            .spawn(move || write_records(file, &receiver))
            .map_err(failed)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            sender,
        })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one record. Never blocks on the disk.
    pub fn write(&self, record: &AuditRecord<'_>) {
        let mut line = Vec::with_capacity(1024);
        if let Err(e) = record.write_json(&mut line) {
            tracing::error!(error = %e, "audit record could not be serialized");
            return;
        }
        line.push(b'\n');
        if self.sender.send(Message::Record(line)).is_err() {
            tracing::error!(request_id = record.request_id, "audit writer has stopped: record lost");
        }
    }

    /// Waits until every record queued so far is written and fsynced.
    pub async fn sync(&self) -> io::Result<()> {
        let (done, wait) = oneshot::channel();
        self.sender
            .send(Message::Sync(done))
            .map_err(|_| io::Error::other("audit writer has stopped"))?;
        wait.await.map_err(|_| io::Error::other("audit writer has stopped"))?
    }
}

/// The writer thread: blocks until a record arrives, then, as long as
/// records keep coming, lets them gather for [`GATHER`] and writes each
/// batch with one flush. It ends when the log is dropped.
fn write_records(file: std::fs::File, receiver: &mpsc::Receiver<Message>) {
    let mut out = io::BufWriter::with_capacity(256 * 1024, file);
    while let Ok(first) = receiver.recv() {
        let mut message = Some(first);
        loop {
            let mut handled = 0usize;
            for m in message.take().into_iter().chain(receiver.try_iter()) {
                handle(&mut out, m);
                handled += 1;
            }
            // Flush as soon as the queue is empty: records reach the file
            // within one batch of being queued, however light the traffic.
            if let Err(e) = out.flush() {
                tracing::error!(error = %e, "audit log flush failed");
            }
            if handled == 0 {
                // Nothing came during the pause: wait for the next record.
                break;
            }
            // Let records gather before looking again: without this pause
            // every record would wake this thread from another core, which
            // at high request rates costs more than writing the record.
            std::thread::sleep(GATHER);
        }
    }
    if let Err(e) = out.flush() {
        tracing::error!(error = %e, "audit log flush failed");
    }
}

fn handle(out: &mut io::BufWriter<std::fs::File>, message: Message) {
    match message {
        Message::Record(line) => {
            if let Err(e) = out.write_all(&line) {
                tracing::error!(error = %e, "audit log write failed");
            }
        }
        Message::Sync(done) => {
            let result = out.flush().and_then(|()| out.get_ref().sync_data());
            let _ = done.send(result);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::authz::{Decision, Shadow};

    const FINDINGS: &[crate::output::inspect::OutputFinding] = &[
        crate::output::inspect::OutputFinding {
            detector: "card",
            action: "redact",
            count: 2,
        },
        crate::output::inspect::OutputFinding {
            detector: "jwt",
            action: "flag",
            count: 1,
        },
    ];

    fn record<'a>(tenants: &'a [String], decisions: &'a [Decision], full: bool) -> AuditRecord<'a> {
        let some = |s: &'a str| full.then_some(s);
        AuditRecord {
            v: RECORD_VERSION,
            time: "2026-12-01T18:28:47.330254807Z".parse().unwrap(),
            request_id: "01a2\"quoted\"\\id",
            principal: some("alice@acme.example"),
            principal_kind: some("key"),
            auth_method: some("api_key"),
            key_id: some("demo-acme"),
            tenant: some("acmé \u{1F600}"),
            client_cert: some("spiffe://acme/svc"),
            client_ip: if full {
                "2001:db8::1".parse().unwrap()
            } else {
                "127.0.0.1".parse().unwrap()
            },
            user_agent: some("curl/8 \u{0007}\t\n<script>"),
            method: "POST",
            path: "/v1/chat/completions",
            model: some("demo-chat"),
            upstream: some("chat-simulator"),
            protocol: "openai",
            stream: full,
            status: if full { 200 } else { 401 },
            outcome: "completed",
            reject_reason: some("invalid_api_key"),
            reject_detail: full.then(|| "token \"exp\" in the past\u{2028}".to_owned()),
            fault: full.then_some(Fault::Client),
            upstream_status: full.then_some(502),
            latency_ms: 5.902,
            upstream_latency_ms: full.then_some(0.001),
            request_sha256: full.then(|| Sha256Digest::of(b"request")),
            request_bytes: 95,
            response_sha256: Sha256Digest::of(b"response"),
            response_bytes: u64::MAX,
            data_tenants: tenants,
            decisions,
            validation: &[],
            limits: &[],
            output: if full { FINDINGS } else { &[] },
            usage: full.then_some(Usage {
                prompt_tokens: 9,
                completion_tokens: 13,
                total_tokens: 22,
                cached_tokens: Some(4),
            }),
        }
    }

    #[test]
    fn ipv4_addresses_and_usage_without_cache_match_the_derived_serialization() {
        for (ip, cached) in [("0.9.10.255", None), ("100.1.99.200", Some(0)), ("10.0.0.1", None)] {
            let mut record = record(&[], &[], false);
            record.client_ip = ip.parse().unwrap();
            record.usage = Some(Usage {
                prompt_tokens: 0,
                completion_tokens: 7,
                total_tokens: u64::MAX,
                cached_tokens: cached,
            });
            let mut fast = Vec::new();
            record.write_json(&mut fast).unwrap();
            assert_eq!(fast, serde_json::to_vec(&record).unwrap(), "{ip}");
            assert!(
                String::from_utf8(fast)
                    .unwrap()
                    .contains(&format!("\"client_ip\":\"{ip}\""))
            );
        }
    }

    #[test]
    fn the_fast_line_is_byte_for_byte_the_derived_serialization() {
        let tenants = ["acme".to_owned(), "glo\"bex".to_owned()];
        let decisions = [Decision {
            shadow: Some(Shadow {
                allowed: false,
                policy_version: "abc".into(),
                policies: vec!["p1".into()],
            }),
            error: Some("pdp timed out".into()),
            ..Decision::allow("cedar", "0123", vec!["chat-for-everyone".into()])
        }];
        for (tenants, decisions, full) in [(&tenants[..], &decisions[..], true), (&[][..], &[][..], false)] {
            let record = record(tenants, decisions, full);
            let mut fast = Vec::new();
            record.write_json(&mut fast).unwrap();
            let derived = serde_json::to_vec(&record).unwrap();
            assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(derived).unwrap());
        }
    }
}
