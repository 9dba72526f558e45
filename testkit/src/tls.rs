//! Certificates for clusters started with [`ClusterBuilder::tls`](crate::ClusterBuilder::tls):
//! a fresh CA per cluster and a server certificate it signs, shared by every node.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::bins::RunAs;
use crate::Error;

/// Names and addresses the server certificate holds: what a client on this machine may
/// connect to with `sslmode=verify-full`.
pub const SERVER_CERT_NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// The files of a TLS cluster, under `<cluster dir>/tls/`.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    /// The CA certificate (PEM): what clients trust (`sslrootcert`).
    pub(crate) ca_cert: PathBuf,
    /// The server certificate (PEM), for `ssl_cert_file`.
    pub(crate) server_cert: PathBuf,
    /// The server's private key (PEM, mode 0600, owned by the server's OS user), for
    /// `ssl_key_file`.
    pub(crate) server_key: PathBuf,
}

impl TlsFiles {
    /// The `postgresql.conf` settings that turn TLS on with these files.
    pub(crate) fn settings(&self) -> [(&'static str, String); 3] {
        [
            ("ssl", "on".to_owned()),
            (
                "ssl_cert_file",
                self.server_cert.to_string_lossy().into_owned(),
            ),
            (
                "ssl_key_file",
                self.server_key.to_string_lossy().into_owned(),
            ),
        ]
    }
}

/// Generates a CA and a server certificate for [`SERVER_CERT_NAMES`] into `dir/tls/`.
/// The key is readable by the server's OS user only (PostgreSQL refuses a key file that
/// others can read).
pub(crate) fn generate(dir: &Path, run_as: Option<RunAs>) -> Result<TlsFiles, Error> {
    let tls_dir = dir.join("tls");
    std::fs::create_dir(&tls_dir)
        .map_err(|e| Error::io(format!("creating {}", tls_dir.display()), e))?;
    let bad = |what: &str, e: rcgen::Error| Error::Tls(format!("{what}: {e}"));

    let ca_key = rcgen::KeyPair::generate().map_err(|e| bad("CA key", e))?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).map_err(|e| bad("CA", e))?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pgfleet-testkit CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(|e| bad("CA certificate", e))?;

    let key = rcgen::KeyPair::generate().map_err(|e| bad("server key", e))?;
    let names: Vec<String> = SERVER_CERT_NAMES.iter().map(|n| (*n).to_owned()).collect();
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| bad("server", e))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(|e| bad("server certificate", e))?;

    let files = TlsFiles {
        ca_cert: tls_dir.join("ca.crt"),
        server_cert: tls_dir.join("server.crt"),
        server_key: tls_dir.join("server.key"),
    };
    write(&files.ca_cert, &ca.pem(), 0o644, run_as)?;
    write(&files.server_cert, &cert.pem(), 0o644, run_as)?;
    write(&files.server_key, &key.serialize_pem(), 0o600, run_as)?;
    if let Some(u) = run_as {
        u.chown(&tls_dir)?;
    }
    Ok(files)
}

/// Writes `text` to `path` with `mode`, owned by `run_as` when given.
fn write(path: &Path, text: &str, mode: u32, run_as: Option<RunAs>) -> Result<(), Error> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    // Before the key goes in: never readable by others, not even for a moment.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("chmod {mode:o} {}", path.display()), e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    if let Some(u) = run_as {
        u.chown(path)?;
    }
    Ok(())
}
