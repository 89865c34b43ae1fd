//! `--listen ADDR`: `/metrics`, `/healthz` and `/readyz` (PRODUCT.md,
//! Observability).
//!
//! The server runs on a thread of its own with its own small runtime, never
//! on the event loop's: `/healthz` exists to say that the event loop is stuck
//! (a render blocked in a read from a hung NFS mount, say), so it must answer
//! when the event loop cannot. It only reads: [`Metrics`] and [`Status`].
//!
//! The address is bound synchronously by [`start`], before anything is
//! rendered, so a taken port is a configuration error at start (exit 2), not
//! a warning in the middle of a run.
//!
//! Idle and slow clients must never starve a probe (guarantee 13): a client
//! gets [`HEADER_TIMEOUT`] to send each request head (the first one, and the
//! next one on a kept-alive connection), and a new connection is never
//! refused: past [`MAX_CONNECTIONS`] it displaces the oldest one still
//! waiting for a request head.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::metrics::{self, Metrics};
use super::status::Status;

/// A render or check running longer than this is reported stuck by
/// `/readyz`.
const STUCK_AFTER: Duration = Duration::from_secs(5);

/// How long `/healthz` waits for the event loop to answer a ping. A healthy
/// loop answers in microseconds; a second tolerates a slow render.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// Connections kept open at once. Scrapers and probes need a handful; a
/// new connection past this displaces an old one rather than be refused, so
/// the bound costs a prober nothing and keeps file descriptors and memory
/// bounded whatever clients do.
const MAX_CONNECTIONS: usize = 128;

/// A client that sends no complete request head in this time is dropped: a
/// probe or scraper sends its request at once, and an idle kept-alive
/// connection is no use to anyone past a few seconds.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections the kernel queues before they are accepted (the system's
/// `somaxconn` caps it).
const LISTEN_BACKLOG: u32 = 1024;

/// The running server. Dropping it (or [`Server::stop`]) stops serving and
/// joins its thread.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Binds `addr` now and serves it on a new thread until the returned
/// [`Server`] is stopped or dropped.
///
/// The error names the address (`cannot listen on 127.0.0.1:9102: address
/// already in use`): it is a configuration error.
pub fn start(addr: SocketAddr, metrics: Arc<Metrics>, status: Arc<Status>) -> io::Result<Server> {
    let socket = bind(addr).map_err(|e| bind_error(addr, e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let listening = {
        // The listener belongs to the server's own runtime.
        let _context = runtime.enter();
        socket.listen(LISTEN_BACKLOG)
    };
    let (listener, local) = match listening.and_then(|l| l.local_addr().map(|a| (l, a))) {
        Ok(bound) => bound,
        Err(e) => {
            // Called from within the daemon's runtime, where dropping
            // another one would block.
            runtime.shutdown_background();
            return Err(bind_error(addr, e));
        }
    };
    let (stop, stopped) = oneshot::channel();
    let endpoints = Endpoints { metrics, status };
    let thread = std::thread::Builder::new()
        .name("anchorage-http".into())
        .spawn(move || runtime.block_on(serve(listener, endpoints, stopped)))?;
    info!(addr = %local, "serving /metrics, /healthz and /readyz");
    Ok(Server {
        addr: local,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// The daemon's listener, which a new configuration may move (SIGHUP): the
/// server of the moment, if `[daemon] listen` names one.
pub struct Listener {
    server: Option<Server>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
}

impl Listener {
    /// Serves `addr`, if any, now: a taken address is an error, as at start.
    pub fn start(
        addr: Option<SocketAddr>,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
    ) -> io::Result<Self> {
        let server = addr
            .map(|addr| start(addr, metrics.clone(), status.clone()))
            .transpose()?;
        Ok(Self {
            server,
            metrics,
            status,
        })
    }

    /// Serves `addr` (or nothing) from now on. The new address is bound
    /// before the old one is let go: if it cannot be, the old listener keeps
    /// serving and the error says why.
    pub fn move_to(&mut self, addr: Option<SocketAddr>) -> io::Result<()> {
        let fresh = addr
            .map(|addr| start(addr, self.metrics.clone(), self.status.clone()))
            .transpose()?;
        if let Some(old) = std::mem::replace(&mut self.server, fresh) {
            old.stop();
        }
        Ok(())
    }

    /// The bound address, if serving.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(Server::local_addr)
    }
}

impl Server {
    /// The bound address (the real port when `ADDR` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, drops open connections and joins the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A socket bound to `addr`, to listen on with a backlog deep enough for a
/// burst of hundreds of connections ([`LISTEN_BACKLOG`]; std's is 128):
/// past the backlog the kernel drops a prober's SYN, and its retry comes a
/// second later, too late for a probe.
fn bind(addr: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As std's bind does: a restarted daemon rebinds at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// `ADDR: reason`, without the `(os error N)` noise.
fn bind_error(addr: SocketAddr, e: io::Error) -> io::Error {
    let reason = match e.kind() {
        io::ErrorKind::AddrInUse => "address already in use".to_owned(),
        io::ErrorKind::AddrNotAvailable => "address not available on this host".to_owned(),
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    };
    io::Error::new(e.kind(), format!("cannot listen on {addr}: {reason}"))
}

async fn serve(
    listener: tokio::net::TcpListener,
    endpoints: Endpoints,
    mut stopped: oneshot::Receiver<()>,
) {
    let endpoints = Arc::new(endpoints);
    let mut open = Connections::default();
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        open.make_room();
        let busy = Arc::new(AtomicBool::new(false));
        let endpoints = endpoints.clone();
        let in_request = busy.clone();
        let task = tokio::spawn(async move {
            let service = service_fn(move |request| {
                let endpoints = endpoints.clone();
                let busy = in_request.clone();
                async move {
                    busy.store(true, Ordering::Relaxed);
                    let response = endpoints.respond(&request).await;
                    busy.store(false, Ordering::Relaxed);
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!(error = %e, "metrics connection ended");
            }
        });
        open.push(task.abort_handle(), busy);
        // Let the new connection read a request already sent before more
        // are accepted: a burst of connections must not displace a probe
        // whose request is waiting in its socket.
        tokio::task::yield_now().await;
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Connections {
    open: VecDeque<Connection>,
}

struct Connection {
    task: AbortHandle,
    /// Set while a request is being answered.
    busy: Arc<AtomicBool>,
}

impl Connections {
    /// Forgets finished connections and, at [`MAX_CONNECTIONS`], closes the
    /// oldest one waiting for a request head (or, if every one is in a
    /// request, the oldest: a client that does not read its answer holds
    /// nothing for long either).
    fn make_room(&mut self) {
        self.open.retain(|c| !c.task.is_finished());
        if self.open.len() < MAX_CONNECTIONS {
            return;
        }
        let victim = self
            .open
            .iter()
            .position(|c| !c.busy.load(Ordering::Relaxed))
            .unwrap_or(0);
        if let Some(old) = self.open.remove(victim) {
            debug!("connection limit reached; closing the oldest idle connection");
            old.task.abort();
        }
    }

    fn push(&mut self, task: AbortHandle, busy: Arc<AtomicBool>) {
        self.open.push_back(Connection { task, busy });
    }
}

struct Endpoints {
    metrics: Arc<Metrics>,
    status: Arc<Status>,
}

impl Endpoints {
    async fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
            return text(StatusCode::NOT_FOUND, "not found\n".into());
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match path {
            "/metrics" => {
                // OpenMetrics to a scraper that asks for it (Prometheus),
                // Prometheus's text format to any other.
                let open = request
                    .headers()
                    .get(ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(metrics::wants_openmetrics);
                let (body, kind) = if open {
                    (self.metrics.encode(), metrics::CONTENT_TYPE)
                } else {
                    (self.metrics.encode_text(), metrics::TEXT_CONTENT_TYPE)
                };
                let mut response = text(StatusCode::OK, body);
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
                response
            }
            "/healthz" => {
                if self.status.alive(HEALTH_TIMEOUT).await {
                    text(StatusCode::OK, "ok\n".into())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "event loop not answering (no reply within {})\n",
                            humantime::format_duration(HEALTH_TIMEOUT)
                        ),
                    )
                }
            }
            _ => {
                let stuck = self.status.stuck(STUCK_AFTER);
                if !stuck.is_empty() {
                    // Guarantee 10: the stuck bundle is named, with how long.
                    let names: Vec<String> = stuck
                        .iter()
                        .map(|(name, running)| {
                            format!(
                                "{name}: its render has run for {}s (a source may hang)",
                                running.as_secs()
                            )
                        })
                        .collect();
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: stuck: {}\n", names.join("; ")),
                    )
                } else if self.status.is_ready() {
                    text(StatusCode::OK, "ok\n".into())
                } else {
                    let summary = self.status.subscribe().borrow().summary.clone();
                    let detail = if summary.is_empty() {
                        "nothing rendered yet".to_owned()
                    } else {
                        summary
                    };
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: not every bundle has rendered once ({detail})\n"),
                    )
                }
            }
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Health answers describe this instant; a proxy must not replay them.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_address_is_named() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let (status, _pings) = Status::new();
        let Err(e) = start(addr, Arc::new(Metrics::new()), status) else {
            panic!("bound a taken address");
        };
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            e.to_string(),
            format!("cannot listen on {addr}: address already in use")
        );
    }

    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    fn local_server() -> Server {
        let (status, _pings) = Status::new();
        start(
            "127.0.0.1:0".parse().expect("addr"),
            Arc::new(Metrics::new()),
            status,
        )
        .expect("start")
    }

    /// One GET with `Connection: close`; the whole answer.
    fn get(addr: SocketAddr, path: &str) -> io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// Whether the server has closed `stream`, waiting at most `within`.
    fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut byte = [0u8; 1];
        while Instant::now() < deadline {
            stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            match stream.read(&mut byte) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
    }

    #[test]
    fn new_connections_displace_idle_ones() {
        let server = local_server();
        let addr = server.local_addr();
        let mut idle: Vec<TcpStream> = (0..3 * MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        for _ in 0..5 {
            let answer = get(addr, "/metrics").expect("answered");
            assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        }
        // The oldest idle clients made room; the newest are still served.
        assert!(closed_within(&mut idle[0], Duration::from_secs(2)));
        let newest = idle.last_mut().expect("one");
        assert!(!closed_within(newest, Duration::from_millis(200)));
    }

    #[test]
    fn a_request_head_that_never_ends_is_dropped() {
        let server = local_server();
        let addr = server.local_addr();
        let mut slow = TcpStream::connect(addr).expect("connect");
        slow.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            .expect("write");
        let started = Instant::now();
        // "A few seconds" (guarantee 13), with room for a loaded machine.
        let deadline = Duration::from_secs(8);
        let mut dropped = false;
        while started.elapsed() < deadline {
            // A byte now and then: the head is never finished.
            if slow.write_all(b"x").is_err() || closed_within(&mut slow, Duration::from_millis(500))
            {
                dropped = true;
                break;
            }
        }
        let after = started.elapsed();
        assert!(dropped, "still open after {after:?}");
        assert!(
            after >= HEADER_TIMEOUT - Duration::from_millis(200),
            "dropped after {after:?}"
        );
    }
}
