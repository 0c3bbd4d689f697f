//! Azurite, the Azure Storage emulator (tests/storage, installed by scripts/install-test-deps.sh),
//! as the recording store: its blob service alone, on loopback, over HTTPS with a certificate of
//! a test CA, accepting OAuth bearer tokens (`--oauth basic`: Entra-shaped v1 tokens for
//! `https://storage.azure.com`, which is what the tests' token endpoint mints).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The emulator's built-in account; path-style URLs name it first.
pub const ACCOUNT: &str = "devstoreaccount1";

pub struct Azurite {
    child: Child,
    /// `https://127.0.0.1:<port>/devstoreaccount1`: a recording store's `account_url`.
    pub account_url: String,
    /// Trusts the emulator's certificate (a recording store's `ca_file`).
    pub ca_file: PathBuf,
}

fn storage_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/storage")
}

impl Azurite {
    /// Starts the blob service with its data in `dir`, and waits (bounded) until it accepts
    /// connections.
    pub async fn start(dir: &Path) -> Self {
        let bin = storage_dir().join("node_modules/.bin/azurite-blob");
        assert!(
            bin.exists(),
            "tests/storage/node_modules missing: run scripts/install-test-deps.sh (scripts/test does)"
        );
        let ca = kube_sim::pki::TestCa::new("storage emulator CA").unwrap();
        let leaf = ca.issue(&["127.0.0.1", "localhost"]).unwrap();
        std::fs::write(dir.join("azurite.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.join("azurite.key"), &leaf.key_pem).unwrap();
        let ca_file = dir.join("azurite-ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let data = dir.join("azurite-data");
        std::fs::create_dir_all(&data).unwrap();
        // A port nobody holds now; Azurite binds it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--cert")
            .arg(dir.join("azurite.crt"))
            .arg("--key")
            .arg(dir.join("azurite.key"))
            .args(["--oauth", "basic", "--silent", "--disableTelemetry"])
            .arg("--location")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite-blob (node on PATH?)");
        let me = Self {
            child,
            account_url: format!("https://127.0.0.1:{port}/{ACCOUNT}"),
            ca_file,
        };
        super::eventually(
            "Azurite's blob service accepts connections",
            Duration::from_secs(60),
            || async { tokio::net::TcpStream::connect(("127.0.0.1", port)).await },
        )
        .await;
        me
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
