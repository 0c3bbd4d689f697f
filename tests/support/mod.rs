//! Test harness: the dev environment in-process, real kubectl binaries, raw TLS clients with a
//! chosen SNI, and scriptable fake upstreams. Every wait is bounded.

pub mod idp;
pub mod real;
pub mod storage;
pub mod tenant;
pub mod yaml;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube_relay::dev::{DevEnv, DevOptions};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a simulated cluster received from users, without the relay's health probes.
pub trait Traffic {
    fn traffic(&self) -> Vec<kube_sim::record::RecordedRequest>;
}

impl Traffic for kube_sim::record::Record {
    fn traffic(&self) -> Vec<kube_sim::record::RecordedRequest> {
        self.all()
            .into_iter()
            .filter(|r| {
                r.header("user-agent") != Some(kube_relay::upstream::health::PROBE_USER_AGENT)
            })
            .collect()
    }
}

/// A dev environment in a temporary directory, on ephemeral ports.
pub struct Env {
    pub dev: DevEnv,
    pub tmp: tempfile::TempDir,
    pub home: PathBuf,
}

pub async fn dev_env() -> Env {
    kube_relay::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dev = kube_relay::dev::start(DevOptions {
        dir: tmp.path().join("dev"),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        exe: PathBuf::from(env!("CARGO_BIN_EXE_kube-relay")),
        add_contexts: Vec::new(),
        contexts_from: None,
    })
    .await
    .expect("dev environment starts");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    wait_ready(dev.admin_addr.unwrap()).await;
    Env { dev, tmp, home }
}

/// Waits (bounded) until the relay's /readyz answers 200.
/// The suite's one bounded wait: polls `check` every 20 ms until it returns `Ok`, for at most
/// `limit`, and fails the test naming `what` and the last error otherwise. Wait for an event
/// with this, never with a fixed sleep.
pub async fn eventually<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not reached within {limit:?} (last: {e:?})"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually`] for a plain condition.
pub async fn eventually_true(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    eventually(what, limit, || {
        let ok = cond();
        async move {
            if ok {
                Ok(())
            } else {
                Err("false")
            }
        }
    })
    .await
}

/// [`eventually`] for tests without a runtime (they drive processes from plain threads).
pub fn eventually_blocking<T, E: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    pause: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not reached within {limit:?} (last: {e:?})"
            ),
        }
        std::thread::sleep(pause);
    }
}

/// The local port a `kubectl port-forward ... :PORT` child (stdout piped) listens on, from the
/// first line it prints (bounded wait). Its stdout keeps being drained afterwards: kubectl dies
/// of SIGPIPE if that pipe closes while it logs "Handling connection for ...".
pub fn forwarded_port(child: &mut std::process::Child) -> u16 {
    use std::io::BufRead as _;
    let mut reader = std::io::BufReader::new(child.stdout.take().expect("stdout is piped"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("port-forward prints its port");
    line.split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

pub async fn wait_ready(admin: std::net::SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay not ready within 20s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Path of `kubectl.<version>`: beside the `kubectl` on PATH (google-cloud-sdk ships them there).
pub fn kubectl(version: &str) -> PathBuf {
    let name = format!("kubectl.{version}");
    if let Ok(p) = which(&name) {
        return p;
    }
    let base = which("kubectl").expect("kubectl on PATH");
    let real = std::fs::canonicalize(&base).unwrap_or(base);
    let p = real.parent().unwrap().join(&name);
    assert!(p.exists(), "{name} not found beside {}", real.display());
    p
}

fn which(name: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(())
}

impl Env {
    pub fn kubeconfig(&self) -> &Path {
        &self.dev.kubeconfig
    }

    /// A kubectl command for a version and context, with caches in this test's HOME.
    pub fn kubectl(&self, version: &str, context: &str) -> Command {
        let mut c = Command::new(kubectl(version));
        c.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--context")
            .arg(context)
            .arg("--request-timeout=30s")
            .env("HOME", &self.home)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        c
    }

    pub fn relay_ca(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.dev.relay_ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }
}

/// Reads a child's stdout line by line until `pred` holds, within `limit`; kills it after.
pub fn read_until(
    mut child: std::process::Child,
    limit: Duration,
    mut pred: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = tokio::time::Instant::now() + limit;
    let mut lines = Vec::new();
    let mut done = false;
    while let Some(left) = deadline.checked_duration_since(tokio::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = pred(&l);
                lines.push(l);
                if hit {
                    done = true;
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let _ = child.wait();
    assert!(
        done,
        "condition not met within {limit:?}; got {lines:?}; stderr: {err}"
    );
    lines
}

/// Runs a command to completion with a deadline, feeding `stdin`. Kills it on timeout.
pub fn run(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn");
    if let Some(input) = stdin {
        let mut si = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = si.write_all(&input);
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("command timed out after {timeout:?}: {cmd:?}");
        }
    }
}

pub fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TLS client to the relay with a chosen SNI and ALPN.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &[CertificateDer<'static>],
    sni: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots.add(c.clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Sends raw bytes over TLS (SNI `sni`, ALPN http/1.1) and reads until the server closes or
/// `limit` passes.
pub async fn tls_exchange(
    addr: SocketAddr,
    ca: &[CertificateDer<'static>],
    sni: &str,
    request: &[u8],
    limit: Duration,
) -> String {
    let mut s = tls_connect(addr, ca, sni, &[b"http/1.1"]).await;
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Sends raw bytes over TLS and reads until the server closes (or 10 s pass).
pub async fn raw_exchange(env: &Env, sni: &str, request: &[u8]) -> String {
    tls_exchange(
        env.dev.relay_addr,
        &env.relay_ca(),
        sni,
        request,
        Duration::from_secs(10),
    )
    .await
}

/// One HTTP/1.1 request to the relay for `host` (the SNI and `Host`) with a bearer token and
/// `Connection: close` (and `Content-Length: 0` unless a GET); waits at most 20 s for the
/// answer. Returns (status, headers, body).
pub async fn bearer_request(
    relay: SocketAddr,
    ca: &[CertificateDer<'static>],
    host: &str,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, String, String) {
    let length = if method == "GET" {
        ""
    } else {
        "Content-Length: 0\r\n"
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n{length}Connection: close\r\n\r\n"
    );
    let raw = tls_exchange(relay, ca, host, req.as_bytes(), Duration::from_secs(20)).await;
    parse_response(&raw)
}

/// A plain-HTTP GET of `path` on an admin listener (`/metrics`, `/readyz`): the whole response
/// as text (status line, headers and body; see [`parse_response`]), read for at most 20 s.
pub async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let mut c = TcpStream::connect(admin).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, headers, body).
pub async fn request(
    env: &Env,
    sni: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let raw = raw_exchange(env, sni, req.as_bytes()).await;
    parse_response(&raw)
}

pub fn parse_response(raw: &str) -> (u16, String, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    (code, head.to_owned(), body.to_owned())
}

/// A TLS server that records every byte it receives and answers each connection with a canned
/// response, keeping the connection open for more bytes afterwards.
pub struct FakeUpstream {
    pub addr: std::net::SocketAddr,
    pub ca_pem: String,
    pub received: Arc<Mutex<Vec<u8>>>,
    pub connections: Arc<Mutex<usize>>,
}

impl FakeUpstream {
    /// Names a cluster served elsewhere (`addr`, on a CA whose certificate is `ca_pem`), for a
    /// relay configuration; nothing is recorded.
    pub fn describing(addr: std::net::SocketAddr, ca_pem: &str) -> Self {
        Self {
            addr,
            ca_pem: ca_pem.to_owned(),
            received: Arc::default(),
            connections: Arc::default(),
        }
    }

    pub async fn start(response: &'static [u8]) -> Self {
        let ca = kube_sim::pki::TestCa::new("fake upstream CA").unwrap();
        let leaf = ca.issue(&["fake.upstream.test", "127.0.0.1"]).unwrap();
        let tls = kube_sim::server::tls_config(&leaf).unwrap();
        let mut cfg = (*tls).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (rec, conns) = (received.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let (rec, conns) = (rec.clone(), conns.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    // The relay's health probes get a plain 200 and are neither recorded nor
                    // counted: tests count the connections user requests arrived on.
                    let mut mine = Vec::new();
                    let mut state = 0u8; // 0 reading headers, 1 user connection, 2 probe
                    let mut buf = [0u8; 4096];
                    loop {
                        match tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await
                        {
                            Ok(Ok(n)) if n > 0 => {
                                if state == 1 {
                                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                                    continue;
                                }
                                mine.extend_from_slice(&buf[..n]);
                                if state == 0 && mine.windows(4).any(|w| w == b"\r\n\r\n") {
                                    let text = String::from_utf8_lossy(&mine).into_owned();
                                    if text.contains(kube_relay::upstream::health::PROBE_USER_AGENT)
                                    {
                                        state = 2;
                                        let _ = s
                                            .write_all(
                                                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                                            )
                                            .await;
                                    } else {
                                        state = 1;
                                        *conns.lock().unwrap() += 1;
                                        rec.lock().unwrap().extend_from_slice(&mine);
                                        let _ = s.write_all(response).await;
                                        let _ = s.flush().await;
                                    }
                                }
                            }
                            _ => return,
                        }
                    }
                });
            }
        });
        Self {
            addr,
            ca_pem: ca.cert_pem().to_owned(),
            received,
            connections,
        }
    }

    pub fn received_text(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }
}

/// A relay (no simulators) in front of fake upstreams, with the dev issuer for tokens.
pub struct CustomRelay {
    pub addr: std::net::SocketAddr,
    /// The admin listener (metrics, readiness).
    pub admin: std::net::SocketAddr,
    pub ca: Vec<CertificateDer<'static>>,
    pub issuer: kube_sim::issuer::DevIssuer,
    _issuer_handle: kube_sim::issuer::IssuerHandle,
    _dir: tempfile::TempDir,
    shutdown: tokio_util::sync::CancellationToken,
}

impl CustomRelay {
    /// `clusters`: (name, fake upstream) pairs, each in passthrough mode, open to dev/alice.
    pub async fn start(clusters: &[(&str, &FakeUpstream)]) -> Self {
        Self::start_with(clusters, "").await
    }

    /// Like [`CustomRelay::start`], with `extra_yaml` (top-level keys the base config does not
    /// set, such as `timeouts:` or `limits:`) appended to the configuration.
    pub async fn start_with(clusters: &[(&str, &FakeUpstream)], extra_yaml: &str) -> Self {
        Self::start_audited(clusters, "audit: {path: audit.jsonl}", extra_yaml).await
    }

    /// Like [`CustomRelay::start_with`], with `audit_yaml` as the `audit:` section.
    pub async fn start_audited(
        clusters: &[(&str, &FakeUpstream)],
        audit_yaml: &str,
        extra_yaml: &str,
    ) -> Self {
        kube_relay::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = kube_sim::pki::TestCa::new("relay test CA").unwrap();
        let leaf = ca
            .issue(&["localhost", "*.relay.test", "127.0.0.1"])
            .unwrap();
        std::fs::write(dir.path().join("relay.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.path().join("relay.key"), &leaf.key_pem).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        let il = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer_url = format!("https://127.0.0.1:{}", il.local_addr().unwrap().port());
        let issuer =
            kube_sim::issuer::DevIssuer::generate(&issuer_url, kube_sim::issuer::KeyAlg::Rs256)
                .unwrap();
        let handle = kube_sim::issuer::serve(
            il,
            Some(kube_sim::server::tls_config(&ca.issue(&["127.0.0.1"]).unwrap()).unwrap()),
            issuer.clone(),
        )
        .await
        .unwrap();
        // Bound first so public_url can carry the real port (kubeconfigs the relay generates
        // point at it).
        let relay_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_port = relay_listener.local_addr().unwrap().port();
        let mut yaml = yaml::RelayYaml::new(&format!("https://localhost:{relay_port}"))
            .top(audit_yaml)
            .top("routing: {host_suffix: relay.test}")
            .issuer(format!(
                "{{name: dev, kind: oidc, issuer: \"{issuer_url}\", audiences: [kube-relay], ca_file: ca.crt}}"
            ));
        for (name, up) in clusters {
            std::fs::write(dir.path().join(format!("{name}-ca.crt")), &up.ca_pem).unwrap();
            yaml = yaml.cluster(format!(
                "{{name: {name}, server: \"https://fake.upstream.test:{port}\", connect: \"127.0.0.1:{port}\", ca_file: {name}-ca.crt, upstream_auth: {{mode: passthrough}}, access: [{{users: [dev/alice]}}]}}",
                port = up.addr.port()
            ));
        }
        // Appended after the cluster list, which the built text ends with: `extra_yaml` may add
        // clusters (`  - ...`) before its top-level keys.
        let mut yaml = yaml.build();
        yaml.push_str(extra_yaml);
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, yaml).unwrap();
        let cfg = kube_relay::config::load(&path).unwrap();
        // An admin listener only to wait for readiness (issuer keys loaded): a first request
        // racing the key fetch could otherwise be refused on a slow machine.
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let app =
            kube_relay::server::App::with_listeners(cfg, relay_listener, Some(admin)).unwrap();
        let addr = app.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(app.run(shutdown.clone()));
        wait_ready(admin_addr).await;
        let ca = CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        Self {
            addr,
            admin: admin_addr,
            ca,
            issuer,
            _issuer_handle: handle,
            _dir: dir,
            shutdown,
        }
    }

    /// Starts the relay's shutdown: it drains as on SIGTERM.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// The relay's audit log (`audit.jsonl` in its directory, unless `start_audited` said
    /// otherwise).
    pub fn audit_path(&self) -> PathBuf {
        self._dir.path().join("audit.jsonl")
    }

    pub fn token(&self, user: &str) -> String {
        self.issuer
            .mint(serde_json::json!({"sub": user, "aud": "kube-relay"}))
    }

    pub async fn exchange(&self, sni: &str, request: &[u8]) -> String {
        tls_exchange(self.addr, &self.ca, sni, request, Duration::from_secs(10)).await
    }
}

impl Drop for CustomRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A portal session for `token` until `expires_at`, sealed with `key` as the relay would: the
/// `Cookie` header value (chunked when large) and the session (for its CSRF token).
pub fn portal_session_cookie(
    key: &kube_relay::config::CookieKey,
    token: String,
    expires_at: u64,
) -> (String, kube_relay::portal::web::session::Session) {
    use kube_relay::portal::web::session;
    let s = session::Session::new(token, tenant::now(), expires_at).unwrap();
    let sealed = s.seal(key).unwrap();
    let line = session::set_session_cookies(&sealed, 600)
        .unwrap()
        .iter()
        .filter_map(|c| c.split(';').next())
        .filter(|pair| !pair.ends_with('='))
        .collect::<Vec<_>>()
        .join("; ");
    (line, s)
}

/// `sh -c cmdline` under a pseudo-terminal, for `kubectl exec -it`. Python's pty module copies
/// everything the command printed until the terminal closes before it returns (`script` could
/// exit with a short command's output still unread when its own stdin was at EOF).
pub fn under_pty(cmdline: &str) -> Command {
    let mut c = Command::new("python3");
    c.args([
        "-c",
        "import os, pty, sys; sys.exit(os.waitstatus_to_exitcode(pty.spawn(['sh', '-c', sys.argv[1]])))",
        cmdline,
    ]);
    c
}
