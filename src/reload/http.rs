//! Reloading by an HTTP call (`POST` unless configured): success is a 2xx
//! answer within the timeout. Plain HTTP to a local endpoint, as reload
//! hooks are (`/-/reload`).

use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Failure;

/// Calls `url` with `method`; returns the status on 2xx.
pub async fn call(method: &str, url: &str, timeout: Duration) -> Result<u16, Failure> {
    match tokio::time::timeout(timeout, call_inner(method, url)).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Failed(format!(
            "{method} {url}: no answer within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

async fn call_inner(method: &str, url: &str) -> Result<u16, Failure> {
    let fail = |what: String| Failure::Failed(format!("{method} {url}: {what}"));
    let uri: Uri = url.parse().map_err(|e| fail(format!("bad URL: {e}")))?;
    let host = uri.host().ok_or_else(|| fail("no host".into()))?;
    let port = uri.port_u16().unwrap_or(80);
    let method: Method = method.parse().map_err(|_| fail("bad method".into()))?;
    let stream = TcpStream::connect((host, port)).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Failure::Absent(format!("{url}: connection refused"))
        } else {
            fail(format!("connect: {e}"))
        }
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(format!("handshake: {e}")))?;
    tokio::spawn(connection);
    let authority = uri
        .authority()
        .map(|a| a.as_str())
        .unwrap_or(host)
        .to_owned();
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority)
        .header(
            hyper::header::USER_AGENT,
            concat!("anchorage/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(format!("request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| fail(format!("request: {e}")))?;
    let status = response.status();
    if status.is_success() {
        Ok(status.as_u16())
    } else {
        Err(fail(format!("answered {status}")))
    }
}
