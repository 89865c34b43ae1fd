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

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, oneshot};
use tracing::{debug, info, warn};

use super::metrics::{self, Metrics};
use super::status::Status;

/// A render or check running longer than this is reported stuck by
/// `/readyz`.
const STUCK_AFTER: Duration = Duration::from_secs(5);

/// How long `/healthz` waits for the event loop to answer a ping. A healthy
/// loop answers in microseconds; a second tolerates a slow render.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// Connections served at once; more are closed at accept. Scrapers and
/// probes need a handful.
const MAX_CONNECTIONS: usize = 64;

/// A client that sends no complete request head in this time is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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
    let listener = std::net::TcpListener::bind(addr).map_err(|e| bind_error(addr, e))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
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
    listener: std::net::TcpListener,
    endpoints: Endpoints,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            warn!(error = %e, "cannot serve /metrics, /healthz and /readyz");
            return;
        }
    };
    let endpoints = Arc::new(endpoints);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!("too many connections; closing a new one");
            continue;
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let endpoints = endpoints.clone();
                async move { Ok::<_, Infallible>(endpoints.respond(&request).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!(error = %e, "metrics connection ended");
            }
            drop(slot);
        });
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
                let mut response = text(StatusCode::OK, self.metrics.encode());
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(metrics::CONTENT_TYPE),
                );
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
}
