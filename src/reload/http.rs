//! Reloading by an HTTP call (`POST` unless configured): success is a 2xx
//! answer within the timeout. Plain HTTP to a local endpoint, as reload
//! hooks are (`/-/reload`).
//!
//! A URL's user and password go out as HTTP Basic authorization, a
//! `bearer_token_file`'s content as a Bearer token, read afresh for each
//! call (a rotated token is used at once). Neither is ever put in an error
//! or a log line (guarantee 14): URLs are shown through [`redact`].

use std::path::Path;
use std::time::Duration;

use base64::Engine;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Absent, Failure};

pub use super::spec::redact;

/// Calls `url` with `method`; returns the status on 2xx.
pub async fn call(
    method: &str,
    url: &str,
    bearer_token_file: Option<&Path>,
    timeout: Duration,
) -> Result<u16, Failure> {
    let shown = redact(url);
    let authorization = match bearer_token_file {
        Some(file) => Some(bearer(file, &shown)?),
        None => basic(url),
    };
    match tokio::time::timeout(timeout, call_inner(method, url, authorization)).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Failed(format!(
            "{method} {shown}: no answer within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

/// The `Authorization` value for a URL's `user:password@`, if it has one.
fn basic(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let credentials = [
        percent_decode(user),
        b":".to_vec(),
        percent_decode(password),
    ]
    .concat();
    Some(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    ))
}

/// The `Authorization` value from a token file, read now.
fn bearer(file: &Path, shown: &str) -> Result<String, Failure> {
    let token = crate::source::read_bounded(file, file)
        .map_err(|e| Failure::Failed(format!("{shown}: bearer token: {e}")))?
        .ok_or_else(|| {
            Failure::Failed(format!(
                "{shown}: bearer token: {}: no such file",
                file.display()
            ))
        })?;
    let token = String::from_utf8_lossy(&token).trim().to_owned();
    if token.is_empty() || token.chars().any(|c| c.is_control()) {
        return Err(Failure::Failed(format!(
            "{shown}: bearer token: {}: empty, or not one line of text",
            file.display()
        )));
    }
    Ok(format!("Bearer {token}"))
}

/// `%XX` escapes of a URL's userinfo, decoded.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

async fn call_inner(
    method: &str,
    url: &str,
    authorization: Option<String>,
) -> Result<u16, Failure> {
    let shown = redact(url);
    let fail = |what: String| Failure::Failed(format!("{method} {shown}: {what}"));
    // Parsed without its credentials: they travel only in the header.
    let uri: Uri = without_userinfo(url)
        .parse()
        .map_err(|_| fail("bad URL".into()))?;
    let host = uri.host().ok_or_else(|| fail("no host".into()))?;
    let port = uri.port_u16().unwrap_or(80);
    let method: Method = method.parse().map_err(|_| fail("bad method".into()))?;
    let stream = TcpStream::connect((host, port)).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Failure::Absent(Absent::Refused {
                address: shown.clone(),
            })
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
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority)
        .header(
            hyper::header::USER_AGENT,
            concat!("anchorage/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(value) = authorization {
        request = request.header(hyper::header::AUTHORIZATION, value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|_| fail("cannot build the request".into()))?;
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

/// `url` with its `user:password@` taken out.
fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_becomes_basic_authorization() {
        assert_eq!(
            basic("http://alice:pw@127.0.0.1:9/reload").as_deref(),
            Some("Basic YWxpY2U6cHc=")
        );
        // Escapes are decoded before encoding: "p@ss:w" is the password.
        assert_eq!(
            basic("http://bob:p%40ss%3Aw@h/x").as_deref(),
            Some("Basic Ym9iOnBAc3M6dw==")
        );
        assert_eq!(basic("http://127.0.0.1:9/reload?a=b@c"), None);
        assert_eq!(
            without_userinfo("http://alice:pw@127.0.0.1:9/reload?x=1"),
            "http://127.0.0.1:9/reload?x=1"
        );
    }

    #[test]
    fn bearer_token_is_read_and_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cr3t\n").expect("write");
        assert_eq!(bearer(&file, "u").expect("token"), "Bearer s3cr3t");
        std::fs::write(&file, "two\nlines").expect("write");
        let err = bearer(&file, "u").expect_err("two lines");
        assert!(!err.to_string().contains("two"), "{err}");
        let err = bearer(&dir.path().join("none"), "u").expect_err("missing");
        assert!(err.to_string().contains("no such file"), "{err}");
    }
}
