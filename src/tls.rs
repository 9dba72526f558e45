//! TLS to the servers (feature `tls`): rustls with the ring provider, certificate checks
//! by `sslmode`, and the layering under the protocol sniffer.
//!
//! Layering: `conn` opens the socket and, unless `sslnegotiation=direct`, sends the
//! `SSLRequest` itself ([`request_tls`]) and reads the one-byte answer, so "this server
//! has no TLS" is told apart from a failed handshake. It then hands the socket to
//! tokio-postgres with direct negotiation and our [`Handshake`] as its `TlsConnect`,
//! which runs the rustls handshake and wraps the result in the
//! [`SniffStream`]: the sniffer reads the plaintext protocol above TLS, exactly as it
//! does on a plain socket. The stream gives the driver the `tls-server-end-point`
//! channel binding, so SCRAM authentication uses `SCRAM-SHA-256-PLUS`, which a
//! man in the middle cannot relay even under `sslmode=require`.
//!
//! Why not tokio-postgres-rustls: its stream type is its own, below any wrapper we could
//! add through `MakeTlsConnect`, and its errors are plain `io::Error`s; the few lines
//! here put the sniffer in the right place and turn rustls errors into [`TlsError`]s.
//!
//! Verification, as libpq does it: `verify-full` checks the chain against `sslrootcert`
//! and the host name; `verify-ca` the chain only; `require` and `prefer` check the chain
//! only when a `sslrootcert` is given, and otherwise accept any certificate (the
//! handshake signature is still checked, so the server holds the certificate's key).

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

use crate::config::{ConfigError, ServerTls, TlsMode};
use crate::conn::{ConnState, SniffStream, Socket};
use crate::error::{ConnectError, TlsError};

/// Tracing target of this module.
const TARGET: &str = "pgfleet::tls";

/// The `SSLRequest` message: length 8, request code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Reads the CA certificates of a PEM file.
///
/// # Errors
///
/// Why the file cannot serve as `sslrootcert`: unreadable, not PEM, no certificate in
/// it, or a certificate rustls cannot use as a trust anchor.
pub(crate) fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("not a PEM file: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("a certificate in it cannot be a trust anchor: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned());
    }
    Ok(roots)
}

/// One server's rustls client configuration and the name its certificate must hold.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    /// Shared by every connection to the server.
    config: Arc<ClientConfig>,
    /// For SNI and, under `verify-full`, the certificate check.
    name: ServerName<'static>,
    /// The same name as text, for errors.
    host: String,
}

impl Connector {
    /// Builds the client configuration for `tls` (reads its CA file).
    ///
    /// # Errors
    ///
    /// [`ConfigError::CaFile`] if the CA file cannot be used; [`ConfigError::Invalid`] if
    /// the host cannot be a TLS server name.
    pub(crate) fn new(tls: &ServerTls) -> Result<Self, ConfigError> {
        let roots = match &tls.root_cert {
            Some(path) => Some(Arc::new(read_roots(path).map_err(|reason| {
                ConfigError::CaFile {
                    key: tls.root_cert_key.clone(),
                    path: path.clone(),
                    reason,
                }
            })?)),
            None => None,
        };
        let name = server_name(&tls.url_key, &tls.server_name)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(Verifier {
            roots,
            check_name: tls.mode == TlsMode::VerifyFull,
            algorithms: provider.signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::Invalid {
                key: "fleet.tls".to_owned(),
                message: format!("TLS setup: {e}"),
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // PostgreSQL 17 requires this ALPN under direct negotiation; older servers
        // ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Connector {
            config: Arc::new(config),
            name,
            host: tls.server_name.clone(),
        })
    }

    /// The `TlsConnect` for one connection; its stream reports to `state`.
    pub(crate) fn handshake(&self, state: Arc<ConnState>) -> Handshake {
        Handshake {
            connector: self.clone(),
            state,
        }
    }
}

/// Sends the `SSLRequest` and reads the server's one-byte answer: whether it accepts
/// TLS. Reads exactly one byte, so nothing sent in plaintext after it can be mistaken
/// for part of the TLS stream.
///
/// # Errors
///
/// [`ConnectError::Socket`] if the socket fails, or [`ConnectError::Startup`] if the
/// answer is neither yes nor no (not a PostgreSQL server, or one that sent an error).
pub(crate) async fn request_tls(socket: &mut Socket) -> Result<bool, ConnectError> {
    let io = |e: io::Error| ConnectError::Socket(format!("TLS request: {e}"));
    socket.write_all(&SSL_REQUEST).await.map_err(io)?;
    socket.flush().await.map_err(io)?;
    let mut answer = [0u8; 1];
    socket.read_exact(&mut answer).await.map_err(io)?;
    match answer[0] {
        b'S' => Ok(true),
        b'N' => Ok(false),
        other => Err(ConnectError::Startup(format!(
            "unexpected answer {other:#04x} to the TLS request (is this a PostgreSQL server?)"
        ))),
    }
}

/// The TLS handshake of one connection, as tokio-postgres' `TlsConnect`.
#[derive(Debug)]
pub(crate) struct Handshake {
    /// The server's client configuration and name.
    connector: Connector,
    /// What the sniffer above TLS reports to.
    state: Arc<ConnState>,
}

/// A TLS connection with the sniffer on its plaintext side.
pub(crate) type TlsConn = SniffStream<tokio_rustls::client::TlsStream<Socket>>;

impl TlsConnect<Socket> for Handshake {
    type Stream = TlsConn;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsConn, TlsError>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            let Connector { config, name, host } = self.connector;
            match tokio_rustls::TlsConnector::from(config)
                .connect(name, socket)
                .await
            {
                Ok(stream) => {
                    tracing::trace!(target: TARGET, host = %host, "TLS established");
                    Ok(SniffStream::new(stream, self.state))
                }
                Err(e) => Err(classify(&e, &host)),
            }
        })
    }
}

impl TlsStream for TlsConn {
    /// `tls-server-end-point` (RFC 5929): a hash of the server's certificate, with the
    /// hash of its signature algorithm (SHA-256 for MD5 and SHA-1).
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.get_ref().get_ref();
        let Some(cert) = session.peer_certificates().and_then(|c| c.first()) else {
            return ChannelBinding::none();
        };
        match signature_digest(cert) {
            Some(alg) => ChannelBinding::tls_server_end_point(
                ring::digest::digest(alg, cert).as_ref().to_vec(),
            ),
            // Unknown algorithm: no binding; SCRAM then runs without it.
            None => ChannelBinding::none(),
        }
    }
}

/// The digest RFC 5929 pairs with a certificate's signature algorithm, if known.
fn signature_digest(cert: &[u8]) -> Option<&'static ring::digest::Algorithm> {
    use ring::digest::{SHA256, SHA384, SHA512};
    // DER OID bodies: PKCS#1 RSA (1.2.840.113549.1.1.x) and ECDSA (1.2.840.10045.4.x).
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    let oid = signature_algorithm_oid(cert)?;
    if let Some(last) = oid.strip_prefix(RSA) {
        return match last {
            [0x04 | 0x05 | 0x0b] => Some(&SHA256),
            [0x0c] => Some(&SHA384),
            [0x0d] => Some(&SHA512),
            _ => None,
        };
    }
    if oid == ECDSA_SHA1 {
        return Some(&SHA256);
    }
    match oid.strip_prefix(ECDSA_SHA2)? {
        [0x02] => Some(&SHA256),
        [0x03] => Some(&SHA384),
        [0x04] => Some(&SHA512),
        _ => None,
    }
}

/// The OID of `Certificate.signatureAlgorithm`: the second element of the outer DER
/// SEQUENCE (after `tbsCertificate`).
fn signature_algorithm_oid(cert: &[u8]) -> Option<&[u8]> {
    let (tag, outer, _) = der_element(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, after_tbs) = der_element(outer)?;
    let (tag, alg, _) = der_element(after_tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der_element(alg)?;
    (tag == 0x06).then_some(oid)
}

/// One DER element: (tag, contents, what follows it).
fn der_element(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = data.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// Turns a failed handshake into a [`TlsError`].
fn classify(e: &io::Error, host: &str) -> TlsError {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return TlsError::Handshake {
            reason: e.to_string(),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            presented,
            ..
        }) => TlsError::HostnameMismatch {
            host: host.to_owned(),
            // webpki writes them as `DnsName("db1")`; the name alone reads better.
            presented: presented
                .iter()
                .map(|n| {
                    n.strip_prefix("DnsName(\"")
                        .and_then(|n| n.strip_suffix("\")"))
                        .unwrap_or(n)
                        .to_owned()
                })
                .collect(),
        },
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => {
            TlsError::HostnameMismatch {
                host: host.to_owned(),
                presented: Vec::new(),
            }
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            TlsError::UntrustedCertificate {
                reason: "it is not signed by a CA in sslrootcert".to_owned(),
            }
        }
        rustls::Error::InvalidCertificate(other) => TlsError::UntrustedCertificate {
            reason: rustls::Error::InvalidCertificate(other.clone()).to_string(),
        },
        other => TlsError::Handshake {
            reason: other.to_string(),
        },
    }
}

/// Checks a server certificate as the connection's `sslmode` says (see the module docs).
#[derive(Debug)]
struct Verifier {
    /// The CAs of `sslrootcert`; `None`: the chain is not checked.
    roots: Option<Arc<RootCertStore>>,
    /// Whether the certificate must name the host (`verify-full`).
    check_name: bool,
    /// The provider's signature algorithms.
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        if let Some(roots) = &self.roots {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        if self.check_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `name` (the host of the URL at `key`) as the name a TLS certificate must hold.
///
/// # Errors
///
/// [`ConfigError::Invalid`] naming `key` when no certificate can name it.
pub(crate) fn server_name(key: &str, name: &str) -> Result<ServerName<'static>, ConfigError> {
    ServerName::try_from(name.to_owned()).map_err(|_| ConfigError::Invalid {
        key: key.to_owned(),
        message: format!("`{name}` is not a host name or address a TLS certificate can name"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (rcgen::Certificate, rcgen::KeyPair) {
        let mut params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("key");
        (params.self_signed(&key).expect("CA"), key)
    }

    #[test]
    fn channel_binding_digest_follows_the_signature_algorithm() {
        let (ca, _) = ca();
        // rcgen signs with ECDSA P-256 / SHA-256 by default.
        assert_eq!(
            signature_algorithm_oid(ca.der()),
            Some(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02][..])
        );
        assert!(std::ptr::eq(
            signature_digest(ca.der()).expect("known"),
            &ring::digest::SHA256
        ));
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["h".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert!(std::ptr::eq(
            signature_digest(cert.der()).expect("known"),
            &ring::digest::SHA384
        ));
        // Truncated or foreign input: no binding, no panic.
        for n in 0..ca.der().len() {
            let _ = signature_digest(&ca.der()[..n]);
        }
        assert_eq!(signature_digest(b"\x30\x03\x02\x01\x00"), None);
    }

    /// A server that reads the `SSLRequest` and answers `answer`.
    async fn answering(answer: u8) -> Result<bool, ConnectError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut request = [0u8; 8];
            s.read_exact(&mut request).await.expect("request");
            s.write_all(&[answer, b'X']).await.expect("answer");
            request
        });
        let mut socket = Socket::Tcp(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        let accepted = request_tls(&mut socket).await;
        assert_eq!(server.await.expect("server"), SSL_REQUEST);
        if accepted.is_ok() {
            // Exactly one byte was read: what follows is still in the socket.
            let mut next = [0u8; 1];
            socket.read_exact(&mut next).await.expect("next byte");
            assert_eq!(next, [b'X']);
        }
        accepted
    }

    #[tokio::test]
    async fn tls_request_reads_one_byte_of_answer() {
        assert_eq!(answering(b'S').await, Ok(true));
        assert_eq!(answering(b'N').await, Ok(false));
        match answering(b'E').await {
            Err(ConnectError::Startup(m)) => assert!(m.contains("0x45"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ca_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("pgfleet-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (ca, _) = ca();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca.pem()).expect("write");
        assert_eq!(read_roots(&good).map(|r| r.len()), Ok(1));

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = read_roots(&empty).err().unwrap_or_default();
        assert!(err.contains("no PEM certificate"), "{err}");

        let missing = dir.join("missing.pem");
        let err = read_roots(&missing).err().unwrap_or_default();
        assert!(err.contains("No such file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
