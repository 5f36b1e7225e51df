//! A throw-away PKI for TLS tests (rcgen): one CA, server certificates for 127.0.0.1, FE and
//! operator client certificates, all written as PEM files into a temp dir the value owns.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// PEM text and the file it was written to.
#[derive(Debug, Clone)]
pub struct PemFile {
    pub pem: String,
    pub path: PathBuf,
}

/// A certificate and its key.
#[derive(Debug, Clone)]
pub struct CertKey {
    pub cert: PemFile,
    pub key: PemFile,
}

/// A test CA that issues certificates into its own temp dir.
pub struct Pki {
    pub ca: PemFile,
    issuer: Issuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let ca = write(&dir, &format!("{name}-ca.pem"), cert.pem());
        Pki { ca, issuer: Issuer::new(params, key), dir }
    }

    /// A server certificate valid for 127.0.0.1 and localhost.
    pub fn server(&self, name: &str) -> CertKey {
        self.issue(name, &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with these DNS names (CN = `name`).
    pub fn client(&self, name: &str, dns_names: &[&str]) -> CertKey {
        self.issue(name, dns_names, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// The client certificate of FE `fe_id` (DNS name `<fe_id>.fe.victor`).
    pub fn fe(&self, fe_id: &str) -> CertKey {
        self.client(fe_id, &[&format!("{fe_id}.fe.victor")])
    }

    /// A certificate with these subject alternative names (DNS names or IPs) for `usage`.
    pub fn issue(&self, name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> CertKey {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        CertKey {
            cert: write(&self.dir, &format!("{name}.pem"), cert.pem()),
            key: write(&self.dir, &format!("{name}-key.pem"), key.serialize_pem()),
        }
    }

    /// The temp dir holding every file.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

fn write(dir: &tempfile::TempDir, name: &str, pem: String) -> PemFile {
    let path = dir.path().join(name);
    std::fs::write(&path, &pem).unwrap();
    PemFile { pem, path }
}
