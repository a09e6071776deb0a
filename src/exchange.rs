//! The exchange: what one request has become as it passes the stages — who
//! called, which model, what was decided — and the response body that ends
//! it. When the last byte has been sent, or the client has gone away, the
//! exchange is finished exactly once: its audit record is written and its
//! metrics recorded, whatever path the request took.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body::{Body, Frame, SizeHint};
use sha2::{Digest, Sha256};

use crate::admin::metrics::Metrics;
use crate::audit::{AuditLog, AuditRecord, RECORD_VERSION, Sha256Digest, Usage};
use crate::authn::Identity;
use crate::config::Protocol;
use crate::limits::admit::{Admission, Observed, RuleOutcome};
use crate::reject::Reject;
use crate::upstream::sse::{StreamMeter, UsageScanner, error_event};

/// Everything the stages learn about one request.
#[derive(Debug)]
pub struct Exchange {
    /// `x-request-id`.
    pub request_id: HeaderValue,
    /// Arrival, for latency.
    pub started: Instant,
    /// Arrival, for the record.
    pub time: jiff::Timestamp,
    /// TCP peer.
    pub peer: SocketAddr,
    /// The client: the peer, or what a trusted proxy says the client is.
    pub client_ip: std::net::IpAddr,
    /// `User-Agent`.
    pub user_agent: Option<String>,
    /// HTTP method.
    pub method: http::Method,
    /// Request path.
    pub path: String,
    /// Error format and protocol of the route.
    pub protocol: Protocol,
    /// The authenticated caller.
    pub identity: Option<Identity>,
    /// Model endpoint name.
    pub model: Option<String>,
    /// Upstream name.
    pub upstream: Option<String>,
    /// Whether a streamed response was asked for.
    pub stream: bool,
    /// SHA-256 of the request body.
    pub request_sha256: Option<Sha256Digest>,
    /// Request body length.
    pub request_bytes: u64,
    /// Upstream response status.
    pub upstream_status: Option<u16>,
    /// Time from sending upstream to its response head.
    pub upstream_latency: Option<Duration>,
    /// Why the request was refused or failed, if it was.
    pub reject: Option<Reject>,
    /// The tenants (data partitions) the request touches.
    pub tenants: Vec<String>,
    /// Every policy decision taken.
    pub decisions: Vec<crate::authz::Decision>,
    /// The request's limit reservation, settled when the exchange finishes.
    pub admission: Option<Admission>,
    /// Every limit rule's verdict on a refused request (an admitted one's
    /// are in its admission).
    pub refused_limits: Vec<RuleOutcome>,
    /// A slot of the model's capacity, held until the exchange finishes.
    pub slot: Option<crate::limits::fair::Slot>,
    /// When the request was sent upstream.
    pub forwarded_at: Option<Instant>,
    /// Every input validation check's verdict.
    pub validation: Vec<crate::validate::stage::Verdict>,
    /// The prompt's tokens, once counted (by validation or limits).
    pub prompt_tokens: Option<u64>,
    /// What the output content policy found in the answer.
    pub output: Vec<crate::output::inspect::OutputFinding>,
    /// Usage the upstream reported in an answer that was then refused
    /// (blocked output): still charged and recorded.
    pub refused_answer_usage: Option<Usage>,
}

/// Largest client-supplied `x-request-id` kept; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

impl Exchange {
    /// Starts an exchange for a request that just arrived.
    pub fn begin<B>(req: &Request<B>, peer: SocketAddr) -> Exchange {
        let request_id = req
            .headers()
            .get("x-request-id")
            .filter(|v| {
                !v.is_empty() && v.len() <= MAX_REQUEST_ID_LEN && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
            })
            .cloned()
            .unwrap_or_else(new_request_id);
        Exchange {
            request_id,
            started: Instant::now(),
            time: jiff::Timestamp::now(),
            peer,
            client_ip: peer.ip(),
            user_agent: req
                .headers()
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            protocol: crate::route::protocol_of_path(req.uri().path()),
            identity: None,
            model: None,
            upstream: None,
            stream: false,
            request_sha256: None,
            request_bytes: 0,
            upstream_status: None,
            upstream_latency: None,
            reject: None,
            decisions: Vec::new(),
            tenants: Vec::new(),
            admission: None,
            refused_limits: Vec::new(),
            slot: None,
            forwarded_at: None,
            validation: Vec::new(),
            prompt_tokens: None,
            output: Vec::new(),
            refused_answer_usage: None,
        }
    }

    /// Every limit rule's verdict, admitted or refused.
    pub fn limit_outcomes(&self) -> &[RuleOutcome] {
        match &self.admission {
            Some(a) => &a.outcomes,
            None => &self.refused_limits,
        }
    }

    /// Records the request body's digest and length.
    pub fn record_request_body(&mut self, body: &[u8]) {
        self.request_sha256 = Some(Sha256Digest::of(body));
        self.request_bytes = body.len() as u64;
    }
}

fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
    let id = uuid::Uuid::now_v7().simple().encode_lower(&mut buf);
    // A simple UUID is 32 hex digits, always a valid header value.
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// How the response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every byte was sent.
    Completed,
    /// The client went away before the end.
    ClientDisconnected,
    /// The upstream failed mid-body; the client got an error event.
    UpstreamError,
    /// The upstream went silent mid-body; the client got an error event.
    UpstreamIdleTimeout,
    /// The stream outgrew the output tokens reserved for it and was cut
    /// off with an error event.
    OutputLimitExceeded,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::ClientDisconnected => "client_disconnected",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamIdleTimeout => "upstream_idle_timeout",
            Outcome::OutputLimitExceeded => "output_limit_exceeded",
        }
    }
}

/// Writes an exchange's audit record and metrics, once.
#[derive(Debug)]
pub struct Finisher {
    exchange: Exchange,
    status: u16,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
}

impl Finisher {
    /// Prepares to finish `exchange`, whose response has `status`.
    pub fn new(exchange: Exchange, status: u16, audit: Arc<AuditLog>, metrics: Arc<Metrics>) -> Finisher {
        Finisher {
            exchange,
            status,
            audit,
            metrics,
        }
    }

    fn finish(
        mut self,
        outcome: Outcome,
        response_sha256: Sha256Digest,
        response_bytes: u64,
        usage: Option<Usage>,
        counted_output_tokens: Option<u64>,
    ) {
        let admission = self.exchange.admission.take();
        // Admitted or refused on this instance's share, Redis being away.
        let decided_locally = admission.as_ref().is_some_and(Admission::decided_locally)
            || self.exchange.refused_limits.iter().any(|o| o.fallback.is_some());
        let ex = &self.exchange;
        let limits = admission.as_ref().map_or(&ex.refused_limits[..], |a| &a.outcomes[..]);
        let latency = ex.started.elapsed();
        let identity = ex.identity.as_ref();
        let reject = ex.reject.as_ref();
        self.audit.write(&AuditRecord {
            v: RECORD_VERSION,
            time: ex.time,
            request_id: ex.request_id.to_str().unwrap_or("invalid"),
            principal: identity.map(Identity::principal),
            principal_kind: identity.and_then(|i| i.key.as_deref()).map(|k| k.kind.as_str()),
            auth_method: identity.map(|i| i.method.as_str()),
            key_id: identity.and_then(Identity::credential_id),
            tenant: identity.and_then(Identity::tenant),
            client_cert: identity
                .and_then(|i| i.client_cert.as_deref())
                .map(|c| c.principal.as_str()),
            client_ip: ex.client_ip,
            user_agent: ex.user_agent.as_deref(),
            method: ex.method.as_str(),
            path: &ex.path,
            model: ex.model.as_deref(),
            upstream: ex.upstream.as_deref(),
            protocol: ex.protocol.as_str(),
            stream: ex.stream,
            status: self.status,
            outcome: outcome.as_str(),
            reject_reason: reject.map(Reject::code),
            reject_detail: reject.and_then(Reject::detail),
            fault: reject.map(Reject::fault),
            upstream_status: ex.upstream_status,
            latency_ms: millis(latency),
            upstream_latency_ms: ex.upstream_latency.map(millis),
            request_sha256: ex.request_sha256,
            request_bytes: ex.request_bytes,
            response_sha256,
            response_bytes,
            data_tenants: &ex.tenants,
            decisions: &ex.decisions,
            validation: &ex.validation,
            limits,
            output: &ex.output,
            usage,
        });
        // Settled after the record is written (it holds the verdicts), and
        // on every path: completed, failed upstream, or client gone.
        if let Some(admission) = admission {
            let answered = ex.upstream_status.is_some_and(|s| (200..300).contains(&s));
            // A stream cut at its reservation is charged what the client
            // was let have: the event that crossed the limit never reached
            // it, so concurrent streams never jointly overrun a budget.
            let counted_output_tokens = match outcome {
                Outcome::OutputLimitExceeded => counted_output_tokens.map(|n| n.min(admission.reserved.output_tokens)),
                _ => counted_output_tokens,
            };
            admission.settle(&Observed {
                upstream_answered: answered,
                prompt_tokens: usage.map(|u| u.prompt_tokens),
                cached_tokens: usage.and_then(|u| u.cached_tokens),
                completion_tokens: usage.map(|u| u.completion_tokens),
                counted_output_tokens,
                compute: ex.forwarded_at.map(|t| t.elapsed()),
            });
        }
        match reject {
            Some(r @ (Reject::RateLimited(o) | Reject::QuotaExceeded(o))) => {
                self.metrics.limit_refusal(&o.rule, r.code())
            }
            Some(r @ Reject::LimitsUnavailable(rule)) => {
                self.metrics.limit_refusal(rule, r.code());
                self.metrics.limit_fallback("deny");
            }
            Some(r @ Reject::AtCapacity { model, .. }) => self.metrics.limit_refusal(model, r.code()),
            _ => {}
        }
        if decided_locally {
            self.metrics.limit_fallback("local");
        }
        for decision in ex.decisions.iter().filter(|d| d.shadow_disagrees()) {
            self.metrics.shadow_disagreement(decision.level);
        }
        self.metrics.finish_request(
            ex.model.as_deref(),
            self.status,
            reject.map(Reject::code).unwrap_or(""),
            latency,
            ex.upstream_latency,
        );
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Where the response bytes come from.
pub enum Source {
    /// A body already in memory: a rejection, a Warden answer, or a collected
    /// upstream response.
    Full(Option<Bytes>),
    /// A server-sent-events stream relayed from the upstream as it arrives.
    Sse(Box<SseSource>),
}

/// A relayed SSE stream and its idle timer.
pub struct SseSource {
    body: hyper::body::Incoming,
    /// Declared after `body`, so dropped after it: the connection goes back
    /// to the pool only once its body is done with.
    _connection: crate::upstream::Lease,
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
    usage: UsageScanner,
    /// Counts output tokens and cuts the stream at its reservation, when
    /// limits count them; otherwise `usage` only looks for the report.
    meter: Option<Box<StreamMeter>>,
    protocol: Protocol,
    /// The output tokens the meter cuts at, for the error event.
    output_limit: u64,
    /// The error event still to send after the last bytes that fit.
    tail: Option<Bytes>,
}

impl SseSource {
    /// Relays `body`, ending it with an error event if the upstream is silent
    /// for longer than `idle_timeout`.
    pub fn new(
        body: hyper::body::Incoming,
        idle_timeout: Duration,
        connection: crate::upstream::Lease,
        protocol: Protocol,
        meter: Option<(StreamMeter, u64)>,
    ) -> SseSource {
        let (meter, output_limit) = match meter {
            Some((meter, limit)) => (Some(Box::new(meter)), limit),
            None => (None, 0),
        };
        SseSource {
            body,
            _connection: connection,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            idle_timeout,
            usage: UsageScanner::default(),
            meter,
            protocol,
            output_limit,
            tail: None,
        }
    }

    /// The usage the upstream reported.
    fn reported_usage(&self) -> Option<Usage> {
        match &self.meter {
            Some(meter) => meter.usage(),
            None => self.usage.usage(),
        }
    }
}

/// The response body sent to the client. It hashes what it sends and finishes
/// the exchange when it ends or is dropped.
pub struct ResponseBody {
    source: Source,
    hasher: Sha256,
    sent: u64,
    usage: Option<Usage>,
    outcome: Outcome,
    finished: bool,
    finisher: Option<Finisher>,
}

impl ResponseBody {
    /// A body that finishes `finisher` when it is done. `usage` is what a
    /// collected response reported; a stream's is read as it passes.
    pub fn new(source: Source, usage: Option<Usage>, finisher: Finisher) -> ResponseBody {
        ResponseBody {
            source,
            hasher: Sha256::new(),
            sent: 0,
            usage,
            outcome: Outcome::Completed,
            finished: false,
            finisher: Some(finisher),
        }
    }

    fn pass(&mut self, data: &Bytes) {
        self.hasher.update(data);
        self.sent += data.len() as u64;
    }

    /// Finishes the exchange; `complete` tells whether every byte was sent.
    fn finish(&mut self, complete: bool) {
        let Some(finisher) = self.finisher.take() else { return };
        if !complete && self.outcome == Outcome::Completed {
            self.outcome = Outcome::ClientDisconnected;
        }
        let mut counted = None;
        if let Source::Sse(sse) = &mut self.source {
            self.usage = sse.reported_usage().or(self.usage);
            counted = sse.meter.as_ref().map(|m| m.counted_output_tokens());
        }
        let digest = Sha256Digest(std::mem::take(&mut self.hasher).finalize().into());
        finisher.finish(self.outcome, digest, self.sent, self.usage, counted);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        let next = match &mut this.source {
            Source::Full(bytes) => bytes.take(),
            // After an error event the stream is over, whatever the upstream does.
            Source::Sse(_) if this.outcome != Outcome::Completed => None,
            Source::Sse(sse) => ready!(poll_sse(sse, &mut this.outcome, cx)),
        };
        match next {
            Some(data) => {
                this.pass(&data);
                if this.is_end_stream() {
                    this.finished = true;
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            None => {
                this.finished = true;
                this.finish(true);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || matches!(&self.source, Source::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Full(Some(b)) if !self.finished => SizeHint::with_exact(b.len() as u64),
            Source::Full(_) => SizeHint::with_exact(0),
            Source::Sse(_) => SizeHint::default(),
        }
    }
}

/// The next chunk of a relayed stream: data as it arrives, or a final error
/// event when the upstream fails or goes silent, then the end.
fn poll_sse(sse: &mut SseSource, outcome: &mut Outcome, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
    if let Some(tail) = sse.tail.take() {
        return Poll::Ready(Some(tail));
    }
    loop {
        match Pin::new(&mut sse.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                sse.idle.as_mut().reset(tokio::time::Instant::now() + sse.idle_timeout);
                let Ok(data) = frame.into_data() else {
                    // Trailers are not part of an SSE stream; skip them.
                    continue;
                };
                let Some(meter) = &mut sse.meter else {
                    sse.usage.scan(&data);
                    return Poll::Ready(Some(data));
                };
                let metered = meter.feed(data);
                if metered.exceeded {
                    *outcome = Outcome::OutputLimitExceeded;
                    let cut = error_event(sse.protocol, &Reject::OutputLimitExceeded(sse.output_limit));
                    // What fit is sent first, then the error event.
                    if metered.pass.is_empty() {
                        return Poll::Ready(Some(cut));
                    }
                    sse.tail = Some(cut);
                    return Poll::Ready(Some(metered.pass));
                }
                if metered.pass.is_empty() {
                    // All held back, mid-event: read on.
                    continue;
                }
                return Poll::Ready(Some(metered.pass));
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(error = %e, "upstream stream failed");
                *outcome = Outcome::UpstreamError;
                return Poll::Ready(Some(error_event(sse.protocol, &Reject::UpstreamUnreachable)));
            }
            Poll::Ready(None) => {
                // An event left unfinished at the end is released, or cut;
                // a second call finds nothing left, so the stream then ends.
                let Some(meter) = &mut sse.meter else {
                    return Poll::Ready(None);
                };
                let rest = meter.finish();
                if rest.exceeded {
                    *outcome = Outcome::OutputLimitExceeded;
                    return Poll::Ready(Some(error_event(
                        sse.protocol,
                        &Reject::OutputLimitExceeded(sse.output_limit),
                    )));
                }
                return Poll::Ready((!rest.pass.is_empty()).then_some(rest.pass));
            }
            Poll::Pending => {
                ready!(sse.idle.as_mut().poll(cx));
                *outcome = Outcome::UpstreamIdleTimeout;
                return Poll::Ready(Some(error_event(sse.protocol, &Reject::UpstreamTimeout)));
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // The client went away (or hyper stopped polling after the last
        // frame, in which case `is_end_stream` already said so).
        let complete = self.is_end_stream();
        self.finish(complete);
    }
}
