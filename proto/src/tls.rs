//! Client-side TLS for gRPC channels to the controllers, shared by `victorctl` and the fe-agent:
//! PEM files (CA, optional client certificate and key) → a tonic [`ClientTlsConfig`], and a
//! controller address (`host:port` or a URL) → an [`Endpoint`] with the right scheme.
//!
//! The files are read and checked here, so a wrong path or a key given as a certificate fails
//! at start with the flag and the file named, not later as an opaque handshake error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Where the client's TLS material lives (each `None` = not configured).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA certificate(s) (PEM) that sign the controllers' server certificates. Enables TLS.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented for mutual TLS (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Name to check the server certificates against instead of each address's host.
    pub server_name: Option<String>,
}

/// Why the TLS files or a controller address are unusable.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which option named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// A file does not hold the expected PEM block.
    #[error("{what} {path} holds no PEM {expected} block (-----BEGIN {expected}-----)")]
    NotPem {
        /// Which option named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The PEM label expected.
        expected: &'static str,
    },
    /// The options do not fit together.
    #[error("{0}")]
    Incomplete(String),
    /// A controller address is not `host:port` or a URL.
    #[error("controller address {address:?} is not host:port or http(s)://host:port: {message}")]
    BadAddress {
        /// The address as given.
        address: String,
        /// What is wrong.
        message: String,
    },
}

impl ClientTlsFiles {
    /// Whether TLS is configured at all.
    pub fn enabled(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Reads and checks the files. `Ok(None)` when TLS is not configured.
    pub fn load(&self) -> Result<Option<ClientTlsConfig>, TlsSetupError> {
        if !self.enabled() {
            return Ok(None);
        }
        let ca = self.ca_file.as_deref().ok_or_else(|| {
            TlsSetupError::Incomplete(
                "a client certificate needs the CA of the controllers' server certificates too (--ca-file)".into(),
            )
        })?;
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("CA file", ca, "CERTIFICATE")?));
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let cert = read_pem("certificate file", cert, "CERTIFICATE")?;
                let key = read_pem("key file", key, "PRIVATE KEY")?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(TlsSetupError::Incomplete(
                    "a client certificate needs its private key (--key-file)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(TlsSetupError::Incomplete("a private key needs its certificate (--cert-file)".into()));
            }
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(Some(config))
    }
}

/// Reads a PEM file and checks that it holds a block whose label ends with `label`
/// (`PRIVATE KEY` accepts PKCS#8, RSA and EC keys).
fn read_pem(what: &'static str, path: &Path, label: &'static str) -> Result<Vec<u8>, TlsSetupError> {
    let bytes = std::fs::read(path).map_err(|source| TlsSetupError::Read { what, path: path.to_path_buf(), source })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")))
        .any(|l| l.ends_with(label));
    if !found {
        return Err(TlsSetupError::NotPem { what, path: path.to_path_buf(), expected: label });
    }
    Ok(bytes)
}

/// A channel endpoint for one controller address: `host:port` gets `https://` with TLS and
/// `http://` without; a URL keeps its scheme, which must agree with whether TLS is configured.
pub fn endpoint(
    address: &str,
    tls: Option<&ClientTlsConfig>,
    connect_timeout: Duration,
) -> Result<Endpoint, TlsSetupError> {
    let bad = |message: String| TlsSetupError::BadAddress { address: address.to_owned(), message };
    let address = address.trim();
    let url = match (address.split_once("://"), tls) {
        (None, Some(_)) => format!("https://{address}"),
        (None, None) => format!("http://{address}"),
        (Some(("https", _)), Some(_)) | (Some(("http", _)), None) => address.to_owned(),
        (Some(("https", _)), None) => {
            return Err(bad("https:// needs the CA of the server certificates (--ca-file)".into()));
        }
        (Some(("http", _)), Some(_)) => {
            return Err(bad("TLS is configured (--ca-file) but the address says http://; use https://".into()));
        }
        (Some((scheme, _)), _) => return Err(bad(format!("unknown scheme {scheme:?}; use http or https"))),
    };
    let endpoint = Endpoint::from_shared(url).map_err(|e| bad(e.to_string()))?;
    if endpoint.uri().port_u16().is_none() {
        return Err(bad("the port is missing (e.g. 127.0.0.1:50051)".into()));
    }
    let endpoint = endpoint.connect_timeout(connect_timeout).tcp_nodelay(true);
    match tls {
        Some(tls) => endpoint.tls_config(tls.clone()).map_err(|e| bad(e.to_string())),
        None => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    #[test]
    fn scheme_follows_tls() {
        let tls = ClientTlsConfig::new();
        assert_eq!(endpoint("127.0.0.1:50051", None, T).unwrap().uri().scheme_str(), Some("http"));
        assert_eq!(endpoint("10.0.0.1:1", Some(&tls), T).unwrap().uri().scheme_str(), Some("https"));
        assert!(endpoint("https://c:1", Some(&tls), T).is_ok());
        let err = endpoint("https://c:1", None, T).unwrap_err().to_string();
        assert!(err.contains("--ca-file"), "{err}");
        let err = endpoint("http://c:1", Some(&tls), T).unwrap_err().to_string();
        assert!(err.contains("use https://"), "{err}");
        let err = endpoint("c", None, T).unwrap_err().to_string();
        assert!(err.contains("port is missing"), "{err}");
        let err = endpoint("ftp://c:1", None, T).unwrap_err().to_string();
        assert!(err.contains("unknown scheme"), "{err}");
    }

    #[test]
    fn files_are_checked_up_front() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let cert = dir.join("c.pem");
        let key = dir.join("k.pem");
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n").unwrap();

        assert!(ClientTlsFiles::default().load().unwrap().is_none());
        let ok = ClientTlsFiles {
            ca_file: Some(cert.clone()),
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            server_name: None,
        };
        assert!(ok.load().unwrap().is_some());

        let swapped = ClientTlsFiles { key_file: Some(cert.clone()), ..ok.clone() };
        let err = swapped.load().unwrap_err().to_string();
        assert!(err.contains("key file") && err.contains("PRIVATE KEY"), "{err}");
        let no_ca = ClientTlsFiles { ca_file: None, ..ok.clone() };
        assert!(no_ca.load().unwrap_err().to_string().contains("--ca-file"));
        let no_key = ClientTlsFiles { key_file: None, ..ok.clone() };
        assert!(no_key.load().unwrap_err().to_string().contains("--key-file"));
        let missing = ClientTlsFiles { ca_file: Some(dir.join("nope.pem")), ..ok };
        let err = missing.load().unwrap_err().to_string();
        assert!(err.contains("cannot read CA file") && err.contains("nope.pem"), "{err}");
    }
}
