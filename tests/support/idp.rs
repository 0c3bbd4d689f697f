//! A real IdP for tests: tests/idp/provider.mjs (node `oidc-provider`, pinned in
//! tests/idp/package.json and installed by scripts/install-test-deps.sh) on 127.0.0.1 over HTTPS,
//! as a child process. It prints one JSON line per event on stdout (ready, each request, each
//! token endpoint answer with its grant_type, key reloads) and rotates its keys on SIGHUP.
//! With `--cli-client-id` / `--portal-client-*` people (alice, bob) can sign in through its
//! development login and consent pages (see provider.mjs).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube_sim::issuer::{DevIssuer, KeyAlg};
use kube_sim::pki::TestCa;
use rustls::pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The confidential client-credentials client every provider has.
pub const CLIENT_ID: &str = "kube-relay-ci";
pub const CLIENT_SECRET: &str = "ci-secret-5f1c";
/// Resource indicators (token audiences) every provider started here serves.
pub const AUDIENCE: &str = "api://kube-relay";
pub const OTHER_AUDIENCE: &str = "api://something-else";
/// Every wait on the provider is bounded by this.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn idp_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/idp")
}

/// A fresh RSA signing key: (kid, PKCS#8 PEM).
pub fn rsa_key() -> (String, String) {
    let k = DevIssuer::generate("https://key.generator.invalid", KeyAlg::Rs256).unwrap();
    (k.kid(), k.signing_key_pem())
}

/// The provider's `--keys` file: the first key signs, all are published.
pub fn write_keys(path: &Path, keys: &[&(String, String)]) {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(kid, pem)| serde_json::json!({"kid": kid, "pem": pem}))
        .collect();
    std::fs::write(path, serde_json::json!({ "keys": keys }).to_string()).unwrap();
}

/// tests/idp/provider.mjs as a child process; killed (and reaped) on drop.
pub struct Idp {
    child: Child,
    /// The JSON lines it printed, in order.
    events: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
    /// `https://127.0.0.1:<port>`.
    pub issuer: String,
    pub addr: std::net::SocketAddr,
    pub ca: Vec<CertificateDer<'static>>,
    /// The PEM of the CA behind its serving certificate, also written to `<dir>/idp-ca.crt`.
    pub ca_pem: String,
    pub ca_file: PathBuf,
    keys_file: PathBuf,
}

impl Idp {
    /// Starts the provider with `keys` (first one signs) and waits for its ready line. `extra`
    /// are more provider.mjs flags (`--cli-client-id`, `--access-token-ttl`, ...). Writes
    /// idp.crt, idp.key, idp-ca.crt and idp-keys.json into `dir`.
    pub async fn start(dir: &Path, keys: &[&(String, String)], extra: &[&str]) -> Self {
        assert!(
            idp_dir().join("node_modules/oidc-provider").exists(),
            "tests/idp/node_modules missing: run scripts/install-test-deps.sh (scripts/test does)"
        );
        let ca = TestCa::new("test IdP CA").unwrap();
        let leaf = ca.issue(&["127.0.0.1"]).unwrap();
        std::fs::write(dir.join("idp.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.join("idp.key"), &leaf.key_pem).unwrap();
        let ca_file = dir.join("idp-ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let keys_file = dir.join("idp-keys.json");
        write_keys(&keys_file, keys);

        let mut cmd = Command::new("node");
        cmd.arg(idp_dir().join("provider.mjs"))
            .arg("--cert")
            .arg(dir.join("idp.crt"))
            .arg("--key")
            .arg(dir.join("idp.key"))
            .arg("--keys")
            .arg(&keys_file)
            .args(["--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET])
            .args(["--resource", AUDIENCE, "--resource", OTHER_AUDIENCE])
            .arg("--parent-stdin")
            .args(extra)
            .current_dir(idp_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn node (is node on PATH?)");
        let events = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let ev = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                // oidc-provider prints a few notices of its own: only JSON lines are events.
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    ev.lock().unwrap().push(v);
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let se = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    return;
                }
                se.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let ca_pem = ca.cert_pem().to_owned();
        let ca = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let mut idp = Self {
            child,
            events,
            stderr,
            issuer: String::new(),
            addr: "127.0.0.1:0".parse().unwrap(),
            ca,
            ca_pem,
            ca_file,
            keys_file,
        };
        let ready = idp.wait_event(|e| e["event"] == "listening").await;
        idp.issuer = ready["issuer"].as_str().unwrap().to_owned();
        idp.addr.set_port(ready["port"].as_u64().unwrap() as u16);
        assert_eq!(idp.issuer, format!("https://{}", idp.addr));
        idp
    }

    /// Waits (bounded) for an event matching `pred` and returns it.
    pub async fn wait_event(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(e) = self.events.lock().unwrap().iter().find(|e| pred(e)) {
                return e.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "provider.mjs exited ({status}) early; stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "provider.mjs: no matching event within {WAIT:?}; events: {:?}; stderr:\n{}",
                self.events.lock().unwrap(),
                self.stderr.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the provider printed on stderr so far (for failure messages).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Returns once every event of the requests answered so far has been read: the provider
    /// prints a request's events before (or, for `token`, just as) it answers, but they travel
    /// through a pipe and a reader thread. A marker request goes last; its event coming back
    /// means all earlier lines are in. Call it before counting requests or grants.
    pub async fn sync(&self) {
        let marker = format!("/__sync/{}", uuid::Uuid::new_v4().simple());
        let _ = self.request("GET", &marker, &[], "").await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.hits(&marker) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "provider.mjs: the event of {marker} did not come within {WAIT:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many requests for `path` the provider has served.
    pub fn hits(&self, path: &str) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "request" && e["path"] == path)
            .count()
    }

    /// The token endpoint's answers so far (`{"event":"token","grant_type",...}`), in order.
    pub fn token_events(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "token")
            .cloned()
            .collect()
    }

    /// How many token requests with `grant_type` the provider answered (any outcome).
    pub fn grants(&self, grant_type: &str) -> usize {
        self.token_events()
            .iter()
            .filter(|e| e["grant_type"] == grant_type)
            .count()
    }

    /// Rewrites the key file and sends SIGHUP; returns once the provider has reloaded.
    pub async fn rotate(&mut self, keys: &[&(String, String)]) {
        let before = self.reloads();
        write_keys(&self.keys_file, keys);
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -HUP failed");
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.reloads() == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "provider.mjs did not reload its keys; events: {:?}; stderr:\n{}",
                self.events.lock().unwrap(),
                self.stderr.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let last = self
            .events
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|e| e["event"] == "reloaded" || e["event"] == "reload_failed")
            .cloned()
            .unwrap();
        assert_eq!(last["event"], "reloaded", "{last}");
        let want: Vec<&str> = keys.iter().map(|(kid, _)| kid.as_str()).collect();
        assert_eq!(last["kids"], serde_json::json!(want));
    }

    fn reloads(&self) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "reloaded" || e["event"] == "reload_failed")
            .count()
    }

    /// One HTTP/1.1 request to the provider (`Connection: close`); (status, head, body).
    pub async fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, String) {
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        let mut s = super::tls_connect(self.addr, &self.ca, "127.0.0.1", &[b"http/1.1"]).await;
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("the provider answers in time")
            .ok();
        let raw = String::from_utf8_lossy(&buf).into_owned();
        let (code, head, body) = super::parse_response(&raw);
        // oidc-provider answers HTTP/1.1 with chunked bodies at times.
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(&body)
        } else {
            body
        };
        (code, head, body)
    }

    /// A form POST to the provider; (status, JSON body).
    pub async fn post_form(
        &self,
        path: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> (u16, Value) {
        let body = form
            .iter()
            .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let auth = basic.map(|(u, p)| format!("Basic {}", base64_basic(u, p)));
        let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        let (code, _, body) = self.request("POST", path, &headers, &body).await;
        let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        (code, v)
    }

    /// A client-credentials access token for `resource`, from the provider's token endpoint.
    pub async fn token(&self, resource: &str) -> String {
        let (code, v) = self
            .post_form(
                "/token",
                &[("grant_type", "client_credentials"), ("resource", resource)],
                Some((CLIENT_ID, CLIENT_SECRET)),
            )
            .await;
        assert_eq!(code, 200, "token endpoint: {v}");
        assert_eq!(v["token_type"], "Bearer", "{v}");
        v["access_token"].as_str().unwrap().to_owned()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// `application/x-www-form-urlencoded` / query component encoding.
pub fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// The (unverified) JOSE header and payload of a compact JWS.
pub fn jwt_parts(token: &str) -> (Value, Value) {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let mut decode = || {
        let seg = parts.next().unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(seg)
            .unwrap();
        serde_json::from_slice::<Value>(&bytes).unwrap()
    };
    (decode(), decode())
}
