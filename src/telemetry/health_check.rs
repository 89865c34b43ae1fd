//! `anchorage health`: asks a running daemon's listener for `/readyz` (or
//! `/healthz`) and turns the answer into an exit code, for a container
//! `HEALTHCHECK` in an image with no shell and no curl.
//!
//! It only finds the address and makes one HTTP/1.0 GET with a hard
//! deadline; it never reads sources, writes files or validates more of a
//! config file than its `[daemon] listen`: a daemon still running on its
//! last good configuration is healthy even if the file has since been broken.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// The whole check, from the process's start to its exit, ends within this.
pub const DEADLINE: Duration = Duration::from_secs(2);

/// Of [`DEADLINE`], what is left for the process before `main` (the loader)
/// and after the answer (printing, exit): the request gives up this much
/// sooner, so a listener that never answers is reported within the 2 s.
const EXIT_ROOM: Duration = Duration::from_millis(50);

/// The most of an answer that is read: health answers are one line.
const MAX_ANSWER: u64 = 64 * 1024;

/// Exit codes: 0 for a 200, 1 for anything else. A missing or unusable
/// address is 1 too, not 2: Docker reserves a HEALTHCHECK's exit 2.
/// `started` is when `main` began: reading the config file counts too.
pub fn run(listen: Option<&str>, config: Option<&Path>, live: bool, started: Instant) -> u8 {
    let addr = match address(listen, config) {
        Ok(addr) => addr,
        Err(e) => {
            crate::telemetry::say(&format!("health: {e}"));
            return 1;
        }
    };
    let path = if live { "/healthz" } else { "/readyz" };
    let end = started + DEADLINE.saturating_sub(EXIT_ROOM);
    match get(addr, path, end, DEADLINE) {
        Ok((200, body)) => {
            println!("http://{addr}{path}: 200 {}", first_line(&body));
            0
        }
        Ok((status, body)) => {
            crate::telemetry::say(&format!(
                "health: http://{addr}{path}: {status} {}",
                first_line(&body)
            ));
            1
        }
        Err(e) => {
            crate::telemetry::say(&format!("health: http://{addr}{path}: {e}"));
            1
        }
    }
}

/// The address to ask: `listen` (the flag or `ANCHORAGE_LISTEN`), else the
/// `[daemon] listen` of `config`. An unspecified host (`0.0.0.0`, `[::]`)
/// is where the daemon listens on every interface: ask loopback.
pub fn address(listen: Option<&str>, config: Option<&Path>) -> Result<SocketAddr, String> {
    let addr: SocketAddr = match (listen, config) {
        (Some(text), _) => text
            .trim()
            .parse()
            .map_err(|e| format!("--listen {text:?}: {e} (expected e.g. 127.0.0.1:9102)"))?,
        (None, Some(path)) => config_listen(path)?,
        (None, None) => {
            return Err(
                "no address: give --listen ADDR, ANCHORAGE_LISTEN, or --config FILE with [daemon] listen"
                    .into(),
            );
        }
    };
    Ok(loopback_if_unspecified(addr))
}

fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// `[daemon] listen` of the config file at `path`.
fn config_listen(path: &Path) -> Result<SocketAddr, String> {
    let shown = path.display();
    // Bounded, and never blocking on a FIFO or a device.
    let text = crate::config::read_config(path).map_err(|e| format!("{shown}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        // Where, as the configuration's own errors say it.
        match e.span() {
            Some(span) => {
                let line = text.as_bytes()[..span.start.min(text.len())]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
                    + 1;
                format!("{shown}:{line}: {}", e.message())
            }
            None => format!("{shown}: {}", e.message()),
        }
    })?;
    let listen = table
        .get("daemon")
        .and_then(|d| d.get("listen"))
        .ok_or_else(|| format!("{shown}: no [daemon] listen: the daemon serves no /readyz"))?;
    let text = listen
        .as_str()
        .ok_or_else(|| format!("{shown}: daemon.listen is not a string"))?;
    text.parse()
        .map_err(|e| format!("{shown}: daemon.listen {text:?}: {e}"))
}

/// One `GET path` over HTTP/1.0, all of it done by `end`: the status code
/// and the body. `deadline` is the figure an error names.
pub fn get(
    addr: SocketAddr,
    path: &str,
    end: Instant,
    deadline: Duration,
) -> Result<(u16, String), String> {
    let left = || {
        end.checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer within {}", humantime::format_duration(deadline)))
    };
    let mut stream =
        TcpStream::connect_timeout(&addr, left()?).map_err(|e| format!("cannot connect: {e}"))?;
    stream
        .set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: anchorage-health\r\n\r\n"
    )
    .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut limited = (&mut stream).take(MAX_ANSWER);
    loop {
        limited
            .get_mut()
            .set_read_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        match limited.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "no answer within {}",
                    humantime::format_duration(deadline)
                ));
            }
            Err(e) => return Err(format!("cannot read the answer: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", first_line(status_line)))?;
    Ok((status, body.to_owned()))
}

/// The first line of `text`, trimmed and without control characters.
fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 2 s count from the process's start: what went before the
    /// request (the loader, the config file) is taken from its share.
    #[test]
    fn the_deadline_counts_from_the_start_not_from_the_request() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let listen = listener.local_addr().expect("addr").to_string();
        let started = Instant::now() - Duration::from_millis(1500);
        let asked = Instant::now();
        assert_eq!(run(Some(&listen), None, false, started), 1);
        // 450 ms were left; the request alone used to take the whole 2 s.
        let took = asked.elapsed();
        assert!(took < Duration::from_millis(1500), "{took:?}");
        drop(listener);
    }

    #[test]
    fn an_unspecified_host_means_loopback() {
        assert_eq!(
            address(Some("0.0.0.0:9102"), None),
            Ok("127.0.0.1:9102".parse().expect("addr"))
        );
        assert_eq!(
            address(Some("[::]:9102"), None),
            Ok("[::1]:9102".parse().expect("addr"))
        );
        assert_eq!(
            address(Some("10.1.2.3:80"), None),
            Ok("10.1.2.3:80".parse().expect("addr"))
        );
    }

    #[test]
    fn the_flag_wins_over_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("a.toml");
        std::fs::write(&config, "[daemon]\nlisten = \"0.0.0.0:7000\"\n").expect("write");
        assert_eq!(
            address(None, Some(&config)),
            Ok("127.0.0.1:7000".parse().expect("addr"))
        );
        assert_eq!(
            address(Some("127.0.0.1:8000"), Some(&config)),
            Ok("127.0.0.1:8000".parse().expect("addr"))
        );
    }

    #[test]
    fn no_address_is_said_plainly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("a.toml");
        std::fs::write(&config, "[[bundle]]\nname = \"x\"\n").expect("write");
        let err = address(None, Some(&config)).expect_err("no listen");
        assert!(err.contains("no [daemon] listen"), "{err}");
        assert!(address(None, None).is_err());
        assert!(address(Some("localhost"), None).is_err());
    }

    #[test]
    fn a_config_that_is_no_toml_is_named_with_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("a.toml");
        std::fs::write(&config, "[daemon]\nlisten = \"127.0.0.1:1\"\n[bundle\n").expect("write");
        let err = address(None, Some(&config)).expect_err("no TOML");
        assert!(err.contains(&format!("{}:3: ", config.display())), "{err}");
    }
}
