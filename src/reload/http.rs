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

/// `url` as logs may show it: credentials and the query (which may carry a
/// token) are left out.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split_once('?').map_or(rest, |(before, _)| before);
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let query = if url.contains('?') { "?…" } else { "" };
    let slash = if rest.contains('/') { "/" } else { "" };
    format!("{scheme}://{host}{slash}{path}{query}")
}

/// Calls `url` with `method`; returns the status on 2xx.
pub async fn call(method: &str, url: &str, timeout: Duration) -> Result<u16, Failure> {
    let shown = redact(url);
    match tokio::time::timeout(timeout, call_inner(method, url)).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Failed(format!(
            "{method} {shown}: no answer within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

async fn call_inner(method: &str, url: &str) -> Result<u16, Failure> {
    let shown = redact(url);
    let fail = |what: String| Failure::Failed(format!("{method} {shown}: {what}"));
    let uri: Uri = url.parse().map_err(|e| fail(format!("bad URL: {e}")))?;
    let host = uri.host().ok_or_else(|| fail("no host".into()))?;
    let port = uri.port_u16().unwrap_or(80);
    let method: Method = method.parse().map_err(|_| fail("bad method".into()))?;
    let stream = TcpStream::connect((host, port)).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Failure::Absent(format!("{shown}: connection refused"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials_and_query() {
        assert_eq!(
            redact("http://u:p@127.0.0.1:8080/-/reload?token=x"),
            "http://127.0.0.1:8080/-/reload?…"
        );
        assert_eq!(
            redact("http://127.0.0.1:8080/-/reload"),
            "http://127.0.0.1:8080/-/reload"
        );
        assert_eq!(redact("http://host"), "http://host");
    }
}
