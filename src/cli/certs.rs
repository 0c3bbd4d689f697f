//! `kube-relay certs dev`: a throwaway CA and a serving certificate for trials.
//!
//! The certificate covers what the relay must answer for (docs/architecture.md "Configuration"):
//! the public host and
//! `*.<host_suffix>` (SNI routing), plus `localhost` and `127.0.0.1` so a trial on one machine
//! works. Production certificates come from Key Vault, cert-manager or ACME instead
//! (certs/README.md); nothing written here belongs in git (the repository's .gitignore keeps
//! `*.key` and the usual output directories out).
//!
//! The CA's private key is never written: it exists only in this process, so a leaked trial
//! directory cannot be used to mint more certificates that clients trusting `ca.crt` accept.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Options for [`dev`].
pub struct DevCertOptions {
    pub dir: PathBuf,
    /// `<cluster>.<host_suffix>` names a cluster by SNI.
    pub host_suffix: String,
    /// The relay's public host (`public_url`'s host).
    pub public_host: String,
    /// Replace an existing `relay.key`.
    pub force: bool,
}

/// What [`dev`] wrote.
pub struct DevCerts {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub names: Vec<String>,
}

/// Writes `ca.crt`, `relay.crt` and `relay.key` (mode 0600) into `opts.dir`.
pub fn dev(opts: &DevCertOptions) -> anyhow::Result<DevCerts> {
    let suffix = opts.host_suffix.trim_matches('.').to_ascii_lowercase();
    let public = opts.public_host.trim_matches('.').to_ascii_lowercase();
    anyhow::ensure!(!suffix.is_empty(), "--host-suffix must not be empty");
    anyhow::ensure!(!public.is_empty(), "--public-host must not be empty");
    let dir = &opts.dir;
    let key_path = dir.join("relay.key");
    if key_path.exists() && !opts.force {
        anyhow::bail!(
            "{} exists; pass --force to replace it (clients trusting the old ca.crt will stop \
             trusting the new certificate)",
            key_path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    // Order kept (the first name becomes the CN), duplicates dropped.
    let mut names: Vec<String> = Vec::new();
    for n in [
        public.clone(),
        format!("*.{suffix}"),
        suffix.clone(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ] {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let (ca_pem, cert_pem, key_pem) = trial_pair(&names)
        .with_context(|| format!("cannot issue a certificate for {}", names.join(", ")))?;

    let ca_cert = dir.join("ca.crt");
    let cert = dir.join("relay.crt");
    std::fs::write(&ca_cert, ca_pem)
        .with_context(|| format!("cannot write {}", ca_cert.display()))?;
    std::fs::write(&cert, cert_pem).with_context(|| format!("cannot write {}", cert.display()))?;
    write_private(&key_path, &key_pem)?;
    Ok(DevCerts {
        ca_cert,
        cert,
        key: key_path,
        names,
    })
}

/// A fresh CA and a server certificate it signs for `names` (the first is the common name):
/// (CA certificate PEM, leaf certificate PEM, leaf key PEM). The CA's key is dropped here.
fn trial_pair(names: &[String]) -> anyhow::Result<(String, String, String)> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(
        DnType::CommonName,
        "kube-relay trial CA (not for production)",
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("localhost", String::as_str),
    );
    for name in names {
        leaf.subject_alt_names
            .push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into()?),
            });
    }
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let cert_pem = leaf.signed_by(&key, &issuer)?.pem();
    Ok((ca_pem, cert_pem, key.serialize_pem()))
}

/// What `kube-relay certs dev` prints.
pub fn summary(out: &DevCerts) -> String {
    format!(
        "wrote a trial CA and serving certificate (never use them in production):\n\
         \x20 CA (give to clients):  {ca}\n\
         \x20 certificate:           {cert}\n\
         \x20 private key (0600):    {key}\n\
         \x20 names:                 {names}\n\n\
         relay.yaml:\n\
         \x20 tls:\n\
         \x20   cert_file: {cert}\n\
         \x20   key_file: {key}\n\n\
         kubeconfig cluster entries: certificate-authority: {ca}\n",
        ca = out.ca_cert.display(),
        cert = out.cert.display(),
        key = out.key.display(),
        names = out.names.join(", "),
    )
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    crate::private_file::replace(path, contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_pair_the_relay_accepts_and_refuses_to_overwrite() {
        crate::install_crypto_provider();
        let tmp = tempfile::tempdir().expect("tempdir");
        let opts = DevCertOptions {
            dir: tmp.path().join("certs"),
            host_suffix: "relay.test".into(),
            public_host: "relay.test".into(),
            force: false,
        };
        let out = dev(&opts).expect("certs written");
        assert_eq!(
            out.names,
            ["relay.test", "*.relay.test", "localhost", "127.0.0.1"],
            "public host first, no duplicates"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&out.key)
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The pair loads with the relay's own loader, as two files and as one combined PEM
        // (chain + key, what the Key Vault VM extension writes; docs/deploy-hub.md relies on it).
        let combined = tmp.path().join("combined.pem");
        let cert_pem = std::fs::read_to_string(&out.cert).expect("cert");
        let key_pem = std::fs::read_to_string(&out.key).expect("key");
        std::fs::write(&combined, format!("{cert_pem}{key_pem}")).expect("combined");
        for (cert, key) in [(&out.cert, &out.key), (&combined, &combined)] {
            let yaml = format!(
                "listen: 127.0.0.1:0\npublic_url: https://relay.test\n\
                 tls: {{cert_file: {}, key_file: {}}}\nrouting: {{host_suffix: relay.test}}\n\
                 identity: {{issuers: [{{name: dev, kind: oidc, issuer: \"https://127.0.0.1:1\", audiences: [kube-relay]}}]}}\n\
                 clusters: [{{name: a, server: \"https://a.test:443\", ca_file: {}, upstream_auth: {{mode: passthrough}}}}]\n",
                cert.display(),
                key.display(),
                out.ca_cert.display()
            );
            match crate::config::parse(&yaml, tmp.path()) {
                Ok(cfg) => {
                    crate::tls::server_config(&cfg.tls).expect("pair is usable");
                }
                Err(e) => panic!("config with the trial pair: {e}"),
            }
        }
        let again = dev(&opts);
        assert!(
            again.is_err(),
            "an existing key is not replaced without --force"
        );
        dev(&DevCertOptions {
            force: true,
            ..opts
        })
        .expect("--force replaces");
    }
}
