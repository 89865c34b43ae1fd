//! TLS peers for the tests, with rustls: a server that loads its key pair
//! (and, for mutual TLS, the trust bundle) from files, and a client.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("cert file")
        .map(|c| c.expect("cert"))
        .collect()
}

fn key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).expect("key file")
}

fn roots(bundle: &Path) -> Arc<RootCertStore> {
    let mut store = RootCertStore::empty();
    for cert in certs(bundle) {
        store.add(cert).expect("trust anchor");
    }
    Arc::new(store)
}

/// Files a TLS endpoint reads: its chain and key, and the bundle it trusts.
#[derive(Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trust: PathBuf,
}

/// A server config read from the files now (as an app does after a reload).
pub fn server_config(id: &Identity, mutual: bool) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = if mutual {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&id.trust), provider())
            .build()
            .expect("client verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(
        builder
            .with_single_cert(certs(&id.cert), key(&id.key))
            .expect("server cert"),
    )
}

/// A client config read from the files now.
pub fn client_config(id: &Identity) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots(&id.trust));
    Arc::new(
        builder
            .with_client_auth_cert(certs(&id.cert), key(&id.key))
            .expect("client cert"),
    )
}

/// A client holding a new leaf `name` from `ca` (written in `dir`) that
/// trusts `server_ca` and never resumes a session: each attempt is a full
/// handshake, judged against the trust the server holds now.
pub fn fresh_client(
    dir: &Path,
    name: &str,
    ca: &super::pki::Ca,
    server_ca: &Path,
) -> Arc<ClientConfig> {
    let (cert, key) = ca.leaf(name).write(dir, name);
    let config = client_config(&Identity {
        cert,
        key,
        trust: server_ca.to_path_buf(),
    });
    let mut config = (*config).clone();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The PKI of a server with mutual TLS: its own CA, the CA of the clients
/// it trusts (both written in `dir`), and a client of that CA.
pub struct MutualPki {
    pub server_ca: super::pki::Ca,
    pub clients_ca_file: PathBuf,
    pub client: Arc<ClientConfig>,
}

impl MutualPki {
    pub fn new(dir: &Path, app: &str) -> Self {
        let server_ca = super::pki::Ca::new(&format!("{app} Server CA"));
        let clients_ca = super::pki::Ca::new(&format!("{app} Clients CA"));
        let server_ca_file = super::write(dir, "server-ca.pem", server_ca.pem());
        let clients_ca_file = super::write(dir, "clients-ca.pem", clients_ca.pem());
        let client = fresh_client(dir, "client", &clients_ca, &server_ca_file);
        Self {
            server_ca,
            clients_ca_file,
            client,
        }
    }
}

/// A TLS server on 127.0.0.1 whose config can be swapped ("reloaded"). Each
/// connection answers one line with "ok\n" after the handshake.
pub struct Server {
    pub port: u16,
    config: Arc<Mutex<Arc<ServerConfig>>>,
    stop: Arc<AtomicBool>,
    /// Handshakes that failed on the server side.
    pub failures: Arc<Mutex<Vec<String>>>,
}

impl Server {
    pub fn start(config: Arc<ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let config = Arc::new(Mutex::new(config));
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (cfg, halt, failed) = (config.clone(), stop.clone(), failures.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if halt.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let current = cfg.lock().expect("config").clone();
                let failed = failed.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(stream, current) {
                        failed.lock().expect("failures").push(e);
                    }
                });
            }
        });
        Self {
            port,
            config,
            stop,
            failures,
        }
    }

    /// Takes a new config for the next connections (the app reloaded).
    pub fn reload(&self, config: Arc<ServerConfig>) {
        *self.config.lock().expect("config") = config;
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Serves one connection; only a failed handshake is an error (a client
/// that goes away without close_notify is not).
fn serve(mut stream: TcpStream, config: Arc<ServerConfig>) -> Result<(), String> {
    let mut conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        match conn.complete_io(&mut stream) {
            Ok(_) => {}
            // The client gave up (a probe that only wanted the certificate).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("handshake: {e}")),
        }
    }
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut line = [0u8; 64];
    loop {
        match tls.read(&mut line) {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
        if tls.write_all(b"ok\n").and_then(|()| tls.flush()).is_err() {
            return Ok(());
        }
    }
}

/// A TLS client connection that can exchange messages.
pub struct Connection {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl Connection {
    /// Connects to `port` as `name`, handshakes and exchanges one message.
    pub fn open(port: u16, name: &str, config: Arc<ClientConfig>) -> Result<Self, String> {
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        // A server that never answers fails the test instead of hanging it.
        for timeout in [
            stream.set_read_timeout(Some(std::time::Duration::from_secs(15))),
            stream.set_write_timeout(Some(std::time::Duration::from_secs(15))),
        ] {
            timeout.map_err(|e| e.to_string())?;
        }
        let server = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(config, server).map_err(|e| e.to_string())?;
        let mut this = Self {
            tls: rustls::StreamOwned::new(conn, stream),
        };
        this.ping()?;
        Ok(this)
    }

    /// One message and its answer over the established connection.
    pub fn ping(&mut self) -> Result<(), String> {
        self.tls.write_all(b"ping\n").map_err(|e| e.to_string())?;
        self.tls.flush().map_err(|e| e.to_string())?;
        let mut answer = [0u8; 3];
        self.tls
            .read_exact(&mut answer)
            .map_err(|e| e.to_string())?;
        if &answer == b"ok\n" {
            Ok(())
        } else {
            Err("bad answer".into())
        }
    }

    /// The end-entity certificate the server presented (DER).
    pub fn served(&self) -> Vec<u8> {
        self.tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }
}

/// What one HTTPS request saw.
pub struct Response {
    pub status: u16,
    pub body: String,
    /// The end-entity certificate the server presented (DER).
    pub served: Vec<u8>,
}

/// `GET /` over TLS to 127.0.0.1:`port` as `localhost`, on a connection of
/// its own (`Connection: close`). `Err` if TLS failed (a refused client
/// certificate arrives as an alert on the first read) or no HTTP answer
/// came back.
pub fn https_get(port: u16, config: &Arc<ClientConfig>) -> Result<Response, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    for timeout in [
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))),
        tcp.set_write_timeout(Some(std::time::Duration::from_secs(5))),
    ] {
        timeout.map_err(|e| e.to_string())?;
    }
    let name = ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .and_then(|()| stream.flush())
        .map_err(|e| format!("TLS: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let ended = loop {
        match stream.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => break Some(e),
        }
    };
    let served = stream
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok());
    match (status, ended) {
        (Some(status), _) => Ok(Response {
            status,
            body: text
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default(),
            served,
        }),
        (None, Some(e)) => Err(format!("TLS: {e}")),
        (None, None) => Err(format!("no HTTP answer: {text:?}")),
    }
}
