//! Listeners: accepting connections, TLS with ALPN (h2, http/1.1), plain
//! HTTP/1.1 with h2c, the limits every connection is held to, and graceful
//! shutdown.
//!
//! One accept loop per listener hands each connection to one of its worker
//! threads, round robin. Each worker runs a single-threaded runtime and
//! serves its connections start to finish, upstream calls included, so a
//! request never changes threads: on the multi-threaded scheduler the
//! cross-thread wake-ups cost more than the whole pipeline at high request
//! rates (measured: a quarter of the gateway's CPU).
//!
//! Limits enforced here: open connections (`max_connections`; beyond it new
//! connections wait in the kernel's accept queue), request head size and
//! header count (431 from hyper), and the time to send the request head:
//! hyper closes a connection whose head is late, and the first request head,
//! TLS handshake included, must arrive within the same time. Body size and
//! body time are enforced where the body is read (`request`).
//!
//! On shutdown the accept loop stops, every connection is told to finish
//! (HTTP/1.1 closes after the response in flight, HTTP/2 sends GOAWAY), and
//! in-flight requests and streams get until the deadline.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::admin::metrics::Metrics;
use crate::authn::mtls::ClientCert;
use crate::config::ListenLimits;

/// The number of request headers hyper allows when not told otherwise.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// How one listener serves its connections.
#[derive(Clone, Debug)]
pub struct ListenerOptions {
    /// Serve TLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connection limits.
    pub limits: ListenLimits,
    /// On shutdown, how long connections may take to finish.
    pub shutdown_grace: Duration,
    /// Worker threads serving the connections.
    pub workers: usize,
}

/// A shutdown signal shared by every listener: flips to `true` once.
pub type ShutdownSignal = watch::Receiver<bool>;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker thread this code runs on (0 elsewhere).
/// Per-worker state, such as upstream connection pools, is picked with it.
pub fn worker_index() -> usize {
    WORKER.with(Cell::get)
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The TCP peer address.
    pub addr: SocketAddr,
    /// The client certificate, verified during the TLS handshake.
    pub client_cert: Option<ClientCert>,
}

/// An accepted connection on its way to a worker; the permit holds its
/// place under `max_connections` until the connection closes.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
}

/// Serves `listener` until `shutdown` flips, then drains connections for at
/// most the grace period. `handle` answers each request. Resolves when every
/// worker has drained.
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    options: ListenerOptions,
    metrics: Option<Arc<Metrics>>,
    handle: H,
    mut shutdown: ShutdownSignal,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>, Arc<Peer>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut workers = Vec::new();
    let mut drained = Vec::new();
    for index in 0..options.workers.max(1) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let (done, wait) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let worker = run_worker(
            receiver,
            options.clone(),
            metrics.clone(),
            handle.clone(),
            shutdown.clone(),
        );
        std::thread::Builder::new()
            .name(format!("warden-worker-{index}"))
            .spawn(move || {
                WORKER.with(|w| w.set(index));
                runtime.block_on(worker);
                let _ = done.send(());
            })?;
        workers.push(sender);
        drained.push(wait);
    }

    let connections = Arc::new(Semaphore::new(options.limits.max_connections));
    let mut next = 0;
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stopped(&mut shutdown) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepted connection could not be handed to a worker");
                continue;
            }
        };
        if let Some(worker) = workers.get(next % workers.len()) {
            let _ = worker.send(Accepted { stream, peer, permit });
        }
        next = next.wrapping_add(1);
    }
    drop(listener);
    drop(workers);
    for wait in drained {
        let _ = wait.await;
    }
    Ok(())
}

/// One worker: serves the connections it is handed until shutdown, then
/// drains them within the grace period.
async fn run_worker<H, Fut, B>(
    mut incoming: mpsc::UnboundedReceiver<Accepted>,
    options: ListenerOptions,
    metrics: Option<Arc<Metrics>>,
    handle: H,
    mut shutdown: ShutdownSignal,
) where
    H: Fn(Request<Incoming>, Arc<Peer>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = &options.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    // hyper's own limit is 100 headers. Set explicitly, even to 100, hyper
    // builds its header index arrays on the heap for every request head;
    // left unset, they live on the stack (callgrind: ~1,700 instructions a
    // request). The limit enforced is the same either way.
    if limits.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        builder.http1().max_headers(limits.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30));
    let connection = Connection {
        builder: Arc::new(builder),
        tls: options.tls.clone().map(tokio_rustls::TlsAcceptor::from),
        head_timeout: limits.header_read_timeout,
        metrics,
    };
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = incoming.recv() => match accepted {
                Some(accepted) => {
                    let task = connection.clone().serve(accepted, handle.clone(), graceful.watcher());
                    tokio::spawn(task);
                }
                None => break,
            },
            () = stopped(&mut shutdown) => break,
        }
    }
    let grace = options.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            ?grace,
            "shutdown deadline passed with connections still open; closing them"
        );
    }
}

/// What a worker needs to serve one connection.
#[derive(Clone)]
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    head_timeout: Duration,
    metrics: Option<Arc<Metrics>>,
}

impl Connection {
    async fn serve<H, Fut, B>(self, accepted: Accepted, handle: H, watcher: Watcher)
    where
        H: Fn(Request<Incoming>, Arc<Peer>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Accepted { stream, peer, permit } = accepted;
        let _permit = permit;
        let _open = self.metrics.as_ref().map(|m| OpenConnection::new(Arc::clone(m)));
        let stream = match TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "connection could not be registered");
                return;
            }
        };
        let started = Arc::new(AtomicBool::new(false));
        let service = |peer: Arc<Peer>| {
            let seen = Arc::clone(&started);
            hyper::service::service_fn(move |req| {
                seen.store(true, Ordering::Relaxed);
                let (handle, peer) = (handle.clone(), Arc::clone(&peer));
                async move { Ok::<_, Infallible>(handle(req, peer).await) }
            })
        };
        // hyper's header timeout starts only once HTTP/1 is detected: a
        // client that sends nothing (or half an HTTP/2 preface) would hold
        // its connection slot forever. The whole first request head must
        // arrive within the head timeout, TLS handshake included.
        let deadline = tokio::time::Instant::now() + self.head_timeout;
        let result = match &self.tls {
            None => {
                let svc = service(Arc::new(Peer {
                    addr: peer,
                    client_cert: None,
                }));
                let conn = watcher.watch(self.builder.serve_connection(TokioIo::new(stream), svc));
                first_request_within(conn, deadline, &started).await
            }
            Some(acceptor) => {
                let tls_stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                // Only a certificate rustls verified against the client CAs
                // is ever read; its identity is parsed once per connection.
                let client_cert = tls_stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| ClientCert::from_der(leaf));
                let svc = service(Arc::new(Peer {
                    addr: peer,
                    client_cert,
                }));
                let conn = watcher.watch(self.builder.serve_connection(TokioIo::new(tls_stream), svc));
                first_request_within(conn, deadline, &started).await
            }
        };
        match result {
            Some(Err(e)) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
            None => tracing::debug!(%peer, "no request within the header read timeout; closed"),
            Some(Ok(())) => {}
        }
    }
}

/// Drives `conn`, dropping it (which closes the connection) if no request
/// has started by `deadline`. `None` means it was dropped. Once a request
/// has started the deadline no longer matters, and its timer is no longer
/// polled: every wake-up of a busy connection would otherwise poll it too.
async fn first_request_within<C: Future>(
    conn: C,
    deadline: tokio::time::Instant,
    started: &AtomicBool,
) -> Option<C::Output> {
    tokio::pin!(conn);
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if started.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// Resolves once the shutdown signal has flipped (or its sender is gone).
async fn stopped(signal: &mut ShutdownSignal) {
    // The guard `wait_for` returns is not `Send`: drop it here.
    let _ = signal.wait_for(|stop| *stop).await.map(|_| ());
}

/// Counts an open connection for as long as it lives.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn new(metrics: Arc<Metrics>) -> OpenConnection {
        metrics.connection(1);
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connection(-1);
    }
}
