//! Certificates for TLS tests, made fresh by each test with `rcgen`: a CA,
//! a server certificate for `localhost` and 127.0.0.1, an expired one, a
//! client certificate, and an unrelated CA.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// PEM files in a temp directory readable by Mosquitto (which drops to its
/// own user): `ca.pem`, `server.pem`/`server.key`, `expired.pem`/
/// `expired.key`, `client.pem`/`client.key`, `other-ca.pem`.
pub struct Pki {
    dir: TempDir,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(p, KeyPair::generate().expect("CA key")).expect("self-signed CA")
}

impl Pki {
    /// Makes every file.
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new().prefix("steadfast-pki-").tempdir().expect("temp dir");
        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write PEM");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod PEM");
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod pki dir");

        let issuer = ca("steadfast test CA");
        write("ca.pem", issuer.pem());
        write("other-ca.pem", ca("someone else's CA").pem());
        let leaf = |name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose, expired: bool| {
            let mut p = CertificateParams::new(sans).expect("leaf params");
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![usage];
            if expired {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let key = KeyPair::generate().expect("leaf key");
            let cert = p.signed_by(&key, &issuer).expect("sign leaf");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        };
        let names = || vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        leaf("server", names(), ExtendedKeyUsagePurpose::ServerAuth, false);
        leaf("expired", names(), ExtendedKeyUsagePurpose::ServerAuth, true);
        leaf("client", vec![], ExtendedKeyUsagePurpose::ClientAuth, false);
        Pki { dir }
    }

    /// The path of one of the files.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `mosquitto.conf` lines for a TLS listener presenting `server` (`server`
    /// or `expired`); with `require_client`, clients need a certificate
    /// signed by the CA (mutual TLS).
    pub fn mosquitto_lines(&self, server: &str, require_client: bool) -> Vec<String> {
        let mut lines = vec![
            format!("certfile {}", self.path(&format!("{server}.pem")).display()),
            format!("keyfile {}", self.path(&format!("{server}.key")).display()),
        ];
        if require_client {
            lines.push(format!("cafile {}", self.path("ca.pem").display()));
            lines.push("require_certificate true".into());
        }
        lines
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
