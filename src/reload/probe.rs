//! Proving a reload (guarantee 6): after a key pair's reload, connect to the
//! app with TLS until it serves the new certificate; after a bundle's
//! reload, an HTTP probe must answer 2xx. Retried until `probe_timeout`.
//!
//! The TLS probe does not judge trust (the app's certificate may chain to a
//! CA anchorage does not hold): it only compares the certificate served
//! with the one expected, byte for byte.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

use super::{Absent, Failure};

const RETRY_EVERY: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Records the certificate the server presents, and accepts it.
#[derive(Debug)]
struct Capture {
    served: Mutex<Option<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
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
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
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
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| Failure::Failed(format!("{addr}: TLS handshake: {e}")))?;
    }
    // Close politely; the answer does not matter.
    conn.send_close_notify();
    let _ = conn.complete_io(&mut tcp);
    let _ = tcp.flush();
    let _ = tcp.read(&mut [0u8; 1]);
    capture
        .served
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| Failure::Failed(format!("{addr}: no certificate presented")))
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
