//! Proving a reload (guarantee 6): after a key pair's reload, connect to the
//! app with TLS until it serves the new certificate; after a bundle's
//! reload, an HTTP probe must answer 2xx. Retried until `probe_timeout`.
//!
//! The TLS probe does not judge trust (the app's certificate may chain to a
//! CA anchorage does not hold): it only compares the certificate served
//! with the one expected, byte for byte. Two kinds of server are read:
//! one that waits for the client's hello (nginx, most), and one that greets
//! first with a plain-text line and then upgrades the same connection
//! (NATS's `INFO {...}`, unless `handshake_first`): the greeting is skipped
//! ([`Greeting`]). A server that asks for a client certificate and refuses
//! the probe's empty one has still shown its own.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

use super::{Absent, Failure};

const RETRY_EVERY: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest plain-text greeting skipped: NATS's INFO holds the cluster's
/// URLs, a few KiB.
const MAX_GREETING: usize = 64 * 1024;

/// TLS record types a server may send first: a handshake or an alert.
const TLS_HANDSHAKE: u8 = 0x16;
const TLS_ALERT: u8 = 0x15;

/// The connection as rustls reads it: a first line of plain text before the
/// server's first TLS record (NATS's INFO) is dropped. A TLS record starts
/// with its type byte (0x14-0x17), never with a printable letter, so one
/// byte tells which kind of server this is, whenever the greeting comes
/// (before or after the client's hello: NATS reads the hello after it).
struct Greeting<'a> {
    tcp: &'a mut TcpStream,
    state: GreetingState,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum GreetingState {
    /// Nothing read yet.
    First,
    /// Inside the greeting line, this many bytes of it seen.
    Line(usize),
    /// TLS from here on.
    Tls,
}

impl<'a> Greeting<'a> {
    fn new(tcp: &'a mut TcpStream) -> Self {
        Self {
            tcp,
            state: GreetingState::First,
        }
    }
}

impl std::io::Read for Greeting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.tcp.read(buf)?;
            if n == 0 || self.state == GreetingState::Tls {
                return Ok(n);
            }
            let mut start = 0;
            if self.state == GreetingState::First {
                self.state = match buf[0] {
                    TLS_HANDSHAKE | TLS_ALERT => GreetingState::Tls,
                    _ => GreetingState::Line(0),
                };
            }
            if let GreetingState::Line(seen) = self.state {
                match buf[..n].iter().position(|&b| b == b'\n') {
                    Some(end) => {
                        self.state = GreetingState::Tls;
                        start = end + 1;
                    }
                    None if seen + n > MAX_GREETING => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "the server sent more than 64 KiB of plain text, not TLS",
                        ));
                    }
                    None => {
                        self.state = GreetingState::Line(seen + n);
                        continue;
                    }
                }
            }
            if start < n {
                buf.copy_within(start..n, 0);
                return Ok(n - start);
            }
        }
    }
}

impl std::io::Write for Greeting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// Records the certificate the server presents, and accepts it.
#[derive(Debug)]
struct Capture {
    served: Mutex<Option<Vec<u8>>>,
    /// The server signed the handshake with that certificate's key (TLS 1.2's
    /// key exchange, TLS 1.3's CertificateVerify): it serves that pair,
    /// whatever it does next with the probe.
    signed: AtomicBool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Capture {
    fn proven(
        &self,
        valid: Result<HandshakeSignatureValid, rustls::Error>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if valid.is_ok() {
            self.signed.store(true, Ordering::Relaxed);
        }
        valid
    }
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.served.lock().unwrap_or_else(|e| e.into_inner()) = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.proven(rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.proven(rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        ))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The end-entity certificate `addr` (HOST:PORT) serves now.
pub fn served_certificate(addr: &str) -> Result<Vec<u8>, Failure> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_matches(['[', ']']);
    let name = ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("localhost").expect("a valid name"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let capture = Arc::new(Capture {
        served: Mutex::new(None),
        signed: AtomicBool::new(false),
        provider: provider.clone(),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Failed(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let socket = addr
        .to_socket_addrs()
        .map_err(|e| Failure::Failed(format!("{addr}: {e}")))?
        .next()
        .ok_or_else(|| Failure::Failed(format!("{addr}: no address")))?;
    let mut tcp = TcpStream::connect_timeout(&socket, CONNECT_TIMEOUT).map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Failure::Absent(Absent::Refused {
                address: addr.to_string(),
            })
        } else {
            Failure::Failed(format!("{addr}: {e}"))
        }
    })?;
    tcp.set_read_timeout(Some(CONNECT_TIMEOUT)).ok();
    tcp.set_write_timeout(Some(CONNECT_TIMEOUT)).ok();
    let mut conn = ClientConnection::new(Arc::new(config), name)
        .map_err(|e| Failure::Failed(format!("TLS: {e}")))?;
    let mut stream = Greeting::new(&mut tcp);
    let mut refused = None;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut stream) {
            refused = Some(e);
            break;
        }
    }
    if refused.is_none() {
        // Close politely; the answer does not matter.
        conn.send_close_notify();
        let _ = conn.complete_io(&mut stream);
        let _ = stream.flush();
        let _ = stream.read(&mut [0u8; 1]);
    }
    let served = capture
        .served
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let signed = capture.signed.load(Ordering::Relaxed);
    match (served, refused) {
        (Some(served), None) => Ok(served),
        // The server showed its certificate and signed with its key, then
        // refused the probe's missing one (mutual TLS, `verify: true`): an
        // alert, or a closed connection under the probe's next write.
        (Some(served), Some(_)) if signed => Ok(served),
        (_, Some(e)) => Err(Failure::Failed(format!("{addr}: TLS handshake: {e}"))),
        (None, None) => Err(Failure::Failed(format!("{addr}: no certificate presented"))),
    }
}

/// Waits until `addr` serves `expect` (or, without one, completes a TLS
/// handshake), for at most `timeout`.
pub async fn tls(addr: &str, expect: Option<&[u8]>, timeout: Duration) -> Result<(), Failure> {
    let addr = addr.to_owned();
    let expect = expect.map(<[u8]>::to_vec);
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + timeout;
        loop {
            let outcome = served_certificate(&addr).and_then(|served| match &expect {
                Some(want) if *want != served => Err(Failure::Failed(format!(
                    "{addr} still serves another certificate (sha256 {})",
                    crate::bundle::fingerprint(&served)
                ))),
                _ => Ok(()),
            });
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() + RETRY_EVERY >= deadline => return Err(e),
                Err(_) => std::thread::sleep(RETRY_EVERY),
            }
        }
    })
    .await
    .map_err(|e| Failure::Failed(format!("probe task: {e}")))?
}

/// Waits until `url` answers 2xx to a GET, for at most `timeout`.
pub async fn http(url: &str, timeout: Duration) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match super::http::call("GET", url, None, left.max(Duration::from_millis(100))).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() + RETRY_EVERY >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(RETRY_EVERY).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    use rustls::pki_types::PrivateKeyDer;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{RootCertStore, ServerConfig, ServerConnection};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A self-signed "localhost" certificate and its key.
    fn identity() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        (
            cert.der().clone(),
            PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
    }

    /// One connection served: `greeting` written in `pieces` writes first
    /// (as NATS writes INFO), then the TLS handshake, then close.
    fn serve_once(config: ServerConfig, greeting: &'static [u8], pieces: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().expect("accept");
            for part in greeting.chunks(greeting.len().div_ceil(pieces.max(1)).max(1)) {
                tcp.write_all(part).expect("greeting");
                tcp.flush().expect("flush");
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut conn = ServerConnection::new(Arc::new(config)).expect("server");
            while conn.is_handshaking() {
                if conn.complete_io(&mut tcp).is_err() {
                    break;
                }
            }
            let _ = conn.complete_io(&mut tcp);
        });
        addr
    }

    fn server(cert: &CertificateDer<'static>, key: &PrivateKeyDer<'static>) -> ServerConfig {
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key.clone_key())
            .expect("server cert")
    }

    #[test]
    fn a_server_that_waits_for_the_hello_is_read() {
        let (cert, key) = identity();
        let addr = serve_once(server(&cert, &key), b"", 0);
        assert_eq!(served_certificate(&addr).expect("served"), cert.to_vec());
    }

    /// NATS without `handshake_first`: INFO in plain text, then TLS on the
    /// same connection; the line may come in several reads.
    #[test]
    fn a_plain_text_greeting_before_tls_is_skipped() {
        let (cert, key) = identity();
        let info: &'static [u8] =
            b"INFO {\"server_id\":\"N\",\"tls_required\":true,\"max_payload\":1048576}\r\n";
        for pieces in [1, 3] {
            let addr = serve_once(server(&cert, &key), info, pieces);
            assert_eq!(
                served_certificate(&addr).expect("served after INFO"),
                cert.to_vec(),
                "INFO in {pieces} writes"
            );
        }
    }

    /// Mutual TLS 1.2 (`verify: true`): the server refuses the probe's empty
    /// certificate with an alert after it showed its own.
    #[test]
    fn a_server_that_refuses_the_probe_without_a_certificate_has_shown_its_own() {
        let (cert, key) = identity();
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).expect("root");
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .expect("verifier");
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.clone()], key.clone_key())
            .expect("server cert");
        let addr = serve_once(config, b"INFO {}\r\n", 1);
        assert_eq!(served_certificate(&addr).expect("served"), cert.to_vec());
    }

    #[test]
    fn plain_text_that_never_ends_is_no_tls_server() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().expect("accept");
            let chunk = [b'x'; 4096];
            while tcp.write_all(&chunk).is_ok() {}
        });
        match served_certificate(&addr) {
            Err(Failure::Failed(e)) => assert!(e.contains("plain text"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
