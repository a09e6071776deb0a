//! Listeners: accepting connections, TLS with ALPN (h2, http/1.1), plain
//! HTTP/1.1 with h2c, the limits every connection is held to, and graceful
//! shutdown.
//!
//! Limits enforced here: open connections (`max_connections`; beyond it new
//! connections wait in the kernel's accept queue), request head size and
//! header count (431 from hyper), the time to send the request head (the
//! connection is closed; the first request head, TLS handshake included,
//! must arrive within the same time) and the TLS handshake time. Body size and body
//! time are enforced where the body is read (`request`).
//!
//! On shutdown the listener stops accepting, every connection is told to
//! finish (HTTP/1.1 closes after the response in flight, HTTP/2 sends
//! GOAWAY), and in-flight requests and streams get until the deadline.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};

use crate::admin::metrics::Metrics;
use crate::config::ListenLimits;

/// How one listener serves its connections.
#[derive(Clone, Debug)]
pub struct ListenerOptions {
    /// Serve TLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connection limits.
    pub limits: ListenLimits,
    /// On shutdown, how long connections may take to finish.
    pub shutdown_grace: Duration,
}

/// A shutdown signal shared by every listener: flips to `true` once.
pub type ShutdownSignal = watch::Receiver<bool>;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the listener worker thread this code runs on (0 elsewhere).
/// Per-worker state, such as upstream connection pools, is picked with it.
pub fn worker_index() -> usize {
    WORKER.with(Cell::get)
}

/// Serves `address` on `workers` threads, each with its own single-threaded
/// runtime and its own `SO_REUSEPORT` socket, so the kernel spreads
/// connections across them and a request never changes threads: the
/// multi-threaded scheduler's cross-thread wake-ups cost more than the whole
/// pipeline at high request rates (measured: a quarter of the CPU). Returns
/// the bound address and a receiver per worker that resolves when it has
/// drained.
pub async fn serve_on_workers<H, Fut, B>(
    address: SocketAddr,
    workers: usize,
    options: ListenerOptions,
    metrics: Option<Arc<Metrics>>,
    handle: H,
    shutdown: ShutdownSignal,
) -> std::io::Result<(SocketAddr, Vec<oneshot::Receiver<()>>)>
where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let first = reuseport_listener(address)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..workers.max(1) {
        listeners.push(reuseport_listener(bound)?);
    }
    let connections = Arc::new(Semaphore::new(options.limits.max_connections));
    let mut done = Vec::with_capacity(listeners.len());
    for (index, listener) in listeners.into_iter().enumerate() {
        let (finished, wait) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (options, metrics, handle, shutdown) = (options.clone(), metrics.clone(), handle.clone(), shutdown.clone());
        let connections = Arc::clone(&connections);
        std::thread::Builder::new()
            .name(format!("warden-worker-{index}"))
            .spawn(move || {
                WORKER.with(|w| w.set(index));
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, connections, options, metrics, handle, shutdown).await,
                        Err(e) => tracing::error!(error = %e, "worker could not register its listener"),
                    }
                });
                let _ = finished.send(());
            })?;
        done.push(wait);
    }
    Ok((bound, done))
}

fn reuseport_listener(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(address)?;
    let listener = socket.listen(1024)?.into_std()?;
    Ok(listener)
}

/// Serves `listener` until `shutdown` flips, then drains connections for at
/// most the grace period. `handle` answers each request; `connections` caps
/// open connections (shared by every worker of a listener).
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    connections: Arc<Semaphore>,
    options: ListenerOptions,
    metrics: Option<Arc<Metrics>>,
    handle: H,
    mut shutdown: ShutdownSignal,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
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
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30));
    let builder = Arc::new(builder);
    let tls = options.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let head_timeout = limits.header_read_timeout;
    let graceful = GracefulShutdown::new();

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
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let handle = handle.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = metrics.as_ref().map(|m| OpenConnection::new(Arc::clone(m)));
            let started = Arc::new(AtomicBool::new(false));
            let seen = Arc::clone(&started);
            let service = hyper::service::service_fn(move |req| {
                seen.store(true, Ordering::Relaxed);
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(req, peer).await) }
            });
            // hyper's header timeout starts only once HTTP/1 is detected: a
            // client that sends nothing (or half an HTTP/2 preface) would hold
            // its connection slot forever. The whole first request head must
            // arrive within the head timeout, TLS handshake included.
            let deadline = tokio::time::Instant::now() + head_timeout;
            let result = match tls {
                None => {
                    let conn = watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
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
                    let conn = watcher.watch(builder.serve_connection(TokioIo::new(tls_stream), service));
                    first_request_within(conn, deadline, &started).await
                }
            };
            match result {
                Some(Err(e)) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
                None => tracing::debug!(%peer, "no request within the header read timeout; closed"),
                Some(Ok(())) => {}
            }
        });
    }

    drop(listener);
    let grace = options.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            ?grace,
            "shutdown deadline passed with connections still open; closing them"
        );
    }
}

/// Drives `conn`, dropping it (which closes the connection) if no request
/// has started by `deadline`. `None` means it was dropped.
async fn first_request_within<C: Future>(
    conn: C,
    deadline: tokio::time::Instant,
    started: &AtomicBool,
) -> Option<C::Output> {
    tokio::pin!(conn);
    tokio::select! {
        out = &mut conn => Some(out),
        () = tokio::time::sleep_until(deadline) => {
            if started.load(Ordering::Relaxed) {
                Some(conn.await)
            } else {
                None
            }
        }
    }
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
