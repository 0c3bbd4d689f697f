//! exec / attach / cp / port-forward against the simulator with real clients: kubectl 1.27
//! (SPDY/3.1 everywhere) and 1.33 (WebSocket v5 for exec, the SPDY-over-WebSocket tunnel for
//! port-forward), plus a WebSocket client for the channel protocols Python and client-node use
//! (v4 binary and base64, port-forward channels) and raw requests for the negotiation errors.
//!
//! Every wait is bounded; child processes are killed on timeout and on drop.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use kube_sim::pki::TestCa;
use kube_sim::record::UserInfo;
use kube_sim::server::{SimAuth, SimConfig, SimHandle, StaticToken};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "streams-test-token";
const STEP: Duration = Duration::from_secs(60);

// === Harness ===

/// A simulator over TLS and a kubeconfig (certificate-authority-data + token) in a temp dir.
struct Sim {
    handle: SimHandle,
    ca_pem: String,
    dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Sim {
    async fn start() -> Sim {
        kube_sim::install_crypto_provider();
        let ca = TestCa::new("streams test CA").unwrap();
        let leaf = ca.issue(&["127.0.0.1", "localhost"]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = kube_sim::server::start(
            listener,
            Some(kube_sim::server::tls_config(&leaf).unwrap()),
            SimConfig {
                name: "streams".into(),
                git_version: "v1.31.2".into(),
                auth: SimAuth {
                    static_tokens: vec![StaticToken {
                        token: TOKEN.into(),
                        user: UserInfo {
                            username: "tester".into(),
                            groups: vec!["system:masters".into(), "system:authenticated".into()],
                            ..UserInfo::default()
                        },
                        can_impersonate: true,
                    }],
                    jwt: vec![],
                },
            },
        )
        .await
        .unwrap();
        let dir = std::env::temp_dir().join(format!("kube-sim-streams-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("home")).unwrap();
        let ca_pem = ca.cert_pem().to_owned();
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: https://{}\n    certificate-authority-data: {}\nusers:\n- name: tester\n  user:\n    token: {TOKEN}\ncontexts:\n- name: sim\n  context:\n    cluster: sim\n    user: tester\n    namespace: default\ncurrent-context: sim\n",
            handle.addr,
            base64::engine::general_purpose::STANDARD.encode(&ca_pem),
        );
        std::fs::write(dir.join("kubeconfig"), kubeconfig).unwrap();
        Sim {
            handle,
            ca_pem,
            dir: TempDir(dir),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// `kubectl.<version>` with this kubeconfig, an isolated HOME and a bounded request timeout.
    fn kubectl(&self, version: &str) -> Command {
        let mut c = Command::new(kubectl_path(version));
        c.env("KUBECONFIG", self.path("kubeconfig"))
            .env("HOME", self.path("home"))
            .env_remove("KUBECTL_REMOTE_COMMAND_WEBSOCKETS")
            .env_remove("KUBECTL_PORT_FORWARD_WEBSOCKETS")
            .current_dir(&self.dir.0)
            .kill_on_drop(true);
        c
    }

    /// Requests received on a pod subresource (e.g. "exec"), for asserting the protocol used.
    fn requests(&self, subresource: &str) -> Vec<kube_sim::record::RecordedRequest> {
        self.handle.record.matching(&format!(
            "/api/v1/namespaces/default/pods/web-0/{subresource}"
        ))
    }
}

/// `kubectl.<version>` on PATH, or beside the `kubectl` of google-cloud-sdk.
fn kubectl_path(version: &str) -> PathBuf {
    let name = format!("kubectl.{version}");
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from("/usr/lib/google-cloud-sdk/bin"));
    for d in &dirs {
        if d.join(&name).is_file() {
            return d.join(&name);
        }
        if let Ok(real) = std::fs::canonicalize(d.join("kubectl")) {
            if let Some(p) = real.parent().map(|p| p.join(&name)).filter(|p| p.is_file()) {
                return p;
            }
        }
    }
    panic!("{name} not found on PATH or in /usr/lib/google-cloud-sdk/bin");
}

struct Out {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs a command to completion (bounded), feeding `stdin` and then closing it.
async fn run(mut cmd: Command, stdin: &[u8]) -> Out {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = tokio::spawn(async move {
        let _ = input.write_all(&data).await;
        // Dropping closes stdin: EOF for `exec -i`.
    });
    let out = tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?}: {cmd:?}"))
        .expect("wait");
    let _ = writer.await;
    Out {
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(out: &Out, what: &str) -> Vec<u8> {
    assert_eq!(
        out.code,
        Some(0),
        "{what} failed: stderr: {}\nstdout: {}",
        out.stderr,
        String::from_utf8_lossy(&out.stdout)
    );
    out.stdout.clone()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// A process whose output we watch while it runs (port-forward, a TTY session).
struct Running {
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let output = Arc::new(Mutex::new(Vec::new()));
        for mut pipe in [
            Box::new(child.stdout.take().expect("stdout"))
                as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = output.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        Running { child, output }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits (bounded) until the combined output satisfies `f`.
    async fn wait_for<T>(&self, what: &str, f: impl Fn(&str) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(v) = f(&self.text()) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; output so far:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn write(&mut self, data: &[u8]) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(data).await.unwrap();
        stdin.flush().await.unwrap();
    }

    async fn wait(&mut self) -> Option<i32> {
        tokio::time::timeout(STEP, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("process did not exit; output:\n{}", self.text()))
            .unwrap()
            .code()
    }
}

// === exec ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_cat_roundtrips_stdin_spdy_and_websocket() {
    let sim = Sim::start().await;
    // 3 MiB crosses the 64 KiB SPDY window many times: flow control must not stall.
    let input = pattern(3 << 20, 7);
    for (version, protocol) in [("1.27", "SPDY/3.1"), ("1.33", "websocket")] {
        sim.handle.record.clear();
        let mut c = sim.kubectl(version);
        c.args(["exec", "-i", "web-0", "--", "cat"]);
        let out = ok(
            &run(c, &input).await,
            &format!("kubectl {version} exec -i cat"),
        );
        assert!(
            out == input,
            "kubectl {version}: cat returned {} bytes, want {}",
            out.len(),
            input.len()
        );
        let reqs = sim.requests("exec");
        assert!(
            reqs.iter().any(|r| r
                .header("upgrade")
                .is_some_and(|u| u.eq_ignore_ascii_case(protocol))),
            "kubectl {version} should have used {protocol}: {:?}",
            reqs.iter()
                .map(|r| (r.method.clone(), r.header("upgrade").map(str::to_owned)))
                .collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_exit_codes_output_and_errors() {
    let sim = Sim::start().await;
    for version in ["1.27", "1.33"] {
        let mut c = sim.kubectl(version);
        c.args([
            "exec",
            "web-0",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ]);
        let out = run(c, b"").await;
        assert_eq!(out.code, Some(3), "kubectl {version}: {}", out.stderr);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "out\n",
            "kubectl {version}"
        );
        assert!(
            out.stderr.contains("command terminated with exit code 3"),
            "kubectl {version}: {}",
            out.stderr
        );

        let mut c = sim.kubectl(version);
        c.args(["exec", "web-0", "--", "echo", "hello", "world"]);
        assert_eq!(ok(&run(c, b"").await, "echo"), b"hello world\n");

        let mut c = sim.kubectl(version);
        c.args(["exec", "web-0", "--", "env"]);
        let env = String::from_utf8(ok(&run(c, b"").await, "env")).unwrap();
        assert!(env.contains("HOSTNAME=web-0\n"), "{env}");

        let mut c = sim.kubectl(version);
        c.args(["exec", "web-0", "--", "no-such-command"]);
        let out = run(c, b"").await;
        assert_eq!(out.code, Some(127), "kubectl {version}: {}", out.stderr);
        assert!(
            out.stderr.contains("no-such-command: not found"),
            "{}",
            out.stderr
        );

        // 20 MiB of output, checked byte for byte.
        let mut c = sim.kubectl(version);
        c.args(["exec", "web-0", "--", "gen", "20M"]);
        let out = ok(&run(c, b"").await, "gen");
        assert_eq!(out.len(), 20 << 20, "kubectl {version}");
        assert!(out
            .iter()
            .enumerate()
            .all(|(i, b)| *b == kube_sim::stream::GEN_PATTERN[i % 64]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_echoes_stdin() {
    let sim = Sim::start().await;
    for version in ["1.27", "1.33"] {
        let mut c = sim.kubectl(version);
        c.args(["attach", "-i", "web-0"]);
        let out = run(c, b"attached input\n").await;
        assert_eq!(
            out.code,
            Some(0),
            "kubectl {version} attach: {}",
            out.stderr
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("attached input\n"),
            "kubectl {version} attach stdout: {:?} stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            out.stderr
        );
        assert!(!sim.requests("attach").is_empty());
    }
}

/// `exec -it` needs a terminal on kubectl's stdin; util-linux `script` provides one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_tty_through_a_pty() {
    let sim = Sim::start().await;
    for version in ["1.27", "1.33"] {
        sim.handle.record.clear();
        let kubectl = kubectl_path(version);
        let line = format!("{} exec -it web-0 -- cat", kubectl.display());
        let mut c = Command::new("script");
        c.args(["-q", "-e", "-c", &line, "/dev/null"])
            .env("KUBECONFIG", sim.path("kubeconfig"))
            .env("HOME", sim.path("home"))
            .env("TERM", "xterm")
            .kill_on_drop(true);
        let mut p = Running::spawn(c);
        // kubectl puts the terminal in raw mode before it sends the exec request, so once the
        // request arrived our keystrokes reach the pod unchanged.
        let deadline = tokio::time::Instant::now() + STEP;
        while sim.requests("exec").is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no exec request; output:\n{}",
                p.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let req = &sim.requests("exec")[0];
        assert!(
            req.path_and_query.contains("tty=true"),
            "{}",
            req.path_and_query
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.write(b"hello tty\r").await;
        // The simulated terminal turns \r into \n on input and \n into \r\n on output.
        p.wait_for("echoed line", |t| t.contains("hello tty\r\n").then_some(()))
            .await;
        p.write(b"\x04").await; // ^D: end of input, cat exits 0
        assert_eq!(
            p.wait().await,
            Some(0),
            "kubectl {version} -it; output:\n{}",
            p.text()
        );
    }
}

// === cp ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_into_the_pod_and_back() {
    let sim = Sim::start().await;
    for (i, version) in ["1.27", "1.33"].into_iter().enumerate() {
        let data = pattern(300_000 + i, i as u8);
        let src = sim.path(&format!("in-{version}.bin"));
        std::fs::write(&src, &data).unwrap();
        let remote = format!("web-0:/tmp/cp-{version}.bin");

        let mut c = sim.kubectl(version);
        c.arg("cp").arg(&src).arg(&remote);
        ok(&run(c, b"").await, &format!("kubectl {version} cp to pod"));

        let mut c = sim.kubectl(version);
        c.args([
            "exec",
            "web-0",
            "--",
            "cat",
            &format!("/tmp/cp-{version}.bin"),
        ]);
        assert!(ok(&run(c, b"").await, "cat copied file") == data);

        let back = sim.path(&format!("out-{version}.bin"));
        let mut c = sim.kubectl(version);
        c.arg("cp").arg(&remote).arg(&back);
        ok(
            &run(c, b"").await,
            &format!("kubectl {version} cp from pod"),
        );
        assert!(
            std::fs::read(&back).unwrap() == data,
            "kubectl {version}: cp round trip differs"
        );

        // A directory, into an existing directory in the pod.
        let dir = sim.path(&format!("tree-{version}"));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.txt"), b"alpha").unwrap();
        std::fs::write(dir.join("sub/b.txt"), b"beta").unwrap();
        let mut c = sim.kubectl(version);
        c.arg("cp").arg(&dir).arg("web-0:/tmp/");
        ok(&run(c, b"").await, "cp dir");
        let mut c = sim.kubectl(version);
        c.args([
            "exec",
            "web-0",
            "--",
            "cat",
            &format!("/tmp/tree-{version}/sub/b.txt"),
        ]);
        assert_eq!(ok(&run(c, b"").await, "cat from copied dir"), b"beta");
        let back = sim.path(&format!("tree-back-{version}"));
        let mut c = sim.kubectl(version);
        c.arg("cp")
            .arg(format!("web-0:/tmp/tree-{version}"))
            .arg(&back);
        ok(&run(c, b"").await, "cp dir back");
        assert_eq!(std::fs::read(back.join("a.txt")).unwrap(), b"alpha");
        assert_eq!(std::fs::read(back.join("sub/b.txt")).unwrap(), b"beta");
    }
}

// === port-forward ===

async fn echo_check(port: u16, payload: &[u8]) {
    let mut s = tokio::time::timeout(STEP, TcpStream::connect(("127.0.0.1", port)))
        .await
        .expect("connect timed out")
        .expect("connect");
    let (mut r, mut w) = s.split();
    let expected = payload.to_vec();
    let write = async {
        w.write_all(payload).await.unwrap();
    };
    let read = async {
        let mut got = vec![0u8; expected.len()];
        r.read_exact(&mut got).await.unwrap();
        got
    };
    let (_, got) = tokio::time::timeout(STEP, async { tokio::join!(write, read) })
        .await
        .expect("echo timed out");
    assert!(got == expected, "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_spdy_and_websocket_tunnel() {
    let sim = Sim::start().await;
    for (version, protocol) in [("1.27", "SPDY/3.1"), ("1.33", "websocket")] {
        sim.handle.record.clear();
        let mut c = sim.kubectl(version);
        c.args(["port-forward", "pod/web-0", ":8080"]);
        let mut p = Running::spawn(c);
        let port: u16 = p
            .wait_for("Forwarding from", |t| {
                let rest = t.split("Forwarding from 127.0.0.1:").nth(1)?;
                rest.split(' ').next()?.parse().ok()
            })
            .await;
        echo_check(port, b"ping over port-forward\n").await;
        // Several connections at once, one large.
        let big = pattern(1 << 20, 3);
        tokio::join!(
            echo_check(port, &big),
            echo_check(port, b"second"),
            echo_check(port, b"third")
        );
        echo_check(port, b"after").await;
        let reqs = sim.requests("portforward");
        assert!(
            reqs.iter().any(|r| r
                .header("upgrade")
                .is_some_and(|u| u.eq_ignore_ascii_case(protocol))),
            "kubectl {version} should have used {protocol}"
        );
        if protocol == "websocket" {
            assert!(reqs.iter().any(|r| r
                .header("sec-websocket-protocol")
                .is_some_and(|p| p.contains("SPDY/3.1+portforward.k8s.io"))));
        }
        assert!(
            !p.text().contains("error"),
            "kubectl {version} port-forward reported:\n{}",
            p.text()
        );
        p.child.kill().await.unwrap();
    }
}

// === WebSocket channel protocols (Python, client-node) ===

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn tls(sim: &Sim) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(sim.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(sim.handle.addr).await.unwrap();
    connector
        .connect(
            rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// Opens a WebSocket on `path_and_query` offering `protocols`; returns the socket and the
/// subprotocol the server chose.
async fn ws_connect(sim: &Sim, path_and_query: &str, protocols: &str) -> (Ws, Option<String>) {
    let mut req = format!("wss://{}{path_and_query}", sim.handle.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    let stream = tls(sim).await;
    let (ws, resp) = tokio::time::timeout(STEP, tokio_tungstenite::client_async(req, stream))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    let proto = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    (ws, proto)
}

/// Reads messages until the server closes; returns (channel, payload) pairs, decoded.
async fn ws_drain(ws: &mut Ws, base64: bool) -> Vec<(u8, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let msg = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("read timed out");
        match msg {
            Some(Ok(Message::Binary(b))) if !base64 => got.push((b[0], b[1..].to_vec())),
            Some(Ok(Message::Text(t))) if base64 => {
                let t = t.as_str();
                let data = base64::engine::general_purpose::STANDARD
                    .decode(&t[1..])
                    .unwrap();
                got.push((t.as_bytes()[0] - b'0', data));
            }
            Some(Ok(Message::Close(_))) | None => return got,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("unexpected message {other:?}"),
        }
    }
}

fn channel(got: &[(u8, Vec<u8>)], ch: u8) -> Vec<u8> {
    got.iter()
        .filter(|(c, _)| *c == ch)
        .flat_map(|(_, d)| d.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_v4_binary_and_base64_exec() {
    let sim = Sim::start().await;
    let exec = "/api/v1/namespaces/default/pods/web-0/exec?command=sh&command=-c&command=echo%20hi%3B%20exit%205&stdout=true&stderr=true";
    // client-node's offer: the kubelet picks v4 (the first it knows).
    let (mut ws, proto) = ws_connect(
        &sim,
        exec,
        "v4.channel.k8s.io,v3.channel.k8s.io,v2.channel.k8s.io,channel.k8s.io",
    )
    .await;
    assert_eq!(proto.as_deref(), Some("v4.channel.k8s.io"));
    let got = ws_drain(&mut ws, false).await;
    // The first message is the empty "connected" message on stdout.
    assert_eq!(got[0], (1, vec![]));
    assert_eq!(channel(&got, 1), b"hi\n");
    let status: serde_json::Value = serde_json::from_slice(&channel(&got, 3)).unwrap();
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "5");

    let (mut ws, proto) = ws_connect(&sim, exec, "v4.base64.channel.k8s.io").await;
    assert_eq!(proto.as_deref(), Some("v4.base64.channel.k8s.io"));
    let got = ws_drain(&mut ws, true).await;
    assert_eq!(channel(&got, 1), b"hi\n");
    assert!(String::from_utf8_lossy(&channel(&got, 3)).contains("NonZeroExitCode"));

    // stdin over v4 (no CLOSE): `head -c 5` ends on its own after five bytes.
    let (mut ws, _) = ws_connect(
        &sim,
        "/api/v1/namespaces/default/pods/web-0/exec?command=sh&command=-c&command=head%20-c%205&stdin=true&stdout=true",
        "v4.channel.k8s.io",
    )
    .await;
    // Our `head` reads all of stdin first, so end it by closing our side after the data.
    ws.send(Message::Binary(b"\x00hello world".to_vec().into()))
        .await
        .unwrap();
    ws.close(None).await.unwrap();
    let got = ws_drain(&mut ws, false).await;
    assert!(channel(&got, 1).is_empty() || channel(&got, 1) == b"hello");

    // v5: CLOSE on stdin ends `cat`, then success on the error channel.
    let (mut ws, proto) = ws_connect(
        &sim,
        "/api/v1/namespaces/default/pods/web-0/exec?command=cat&stdin=true&stdout=true&stderr=true",
        "v5.channel.k8s.io",
    )
    .await;
    assert_eq!(proto.as_deref(), Some("v5.channel.k8s.io"));
    ws.send(Message::Binary(b"\x00abc".to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Binary(vec![255, 0].into())).await.unwrap();
    let got = ws_drain(&mut ws, false).await;
    assert_eq!(channel(&got, 1), b"abc");
    assert_eq!(channel(&got, 3), br#"{"metadata":{},"status":"Success"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_v4_port_forward_channels() {
    let sim = Sim::start().await;
    let (mut ws, proto) = ws_connect(
        &sim,
        "/api/v1/namespaces/default/pods/web-0/portforward?ports=8080,9090",
        "v4.channel.k8s.io",
    )
    .await;
    assert_eq!(proto.as_deref(), Some("v4.channel.k8s.io"));
    // First message on each channel: the port, little-endian.
    let mut first = Vec::new();
    for _ in 0..4 {
        match tokio::time::timeout(STEP, ws.next()).await.unwrap() {
            Some(Ok(Message::Binary(b))) => first.push(b.to_vec()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        first,
        vec![
            vec![0, 0x90, 0x1f],
            vec![1, 0x90, 0x1f],
            vec![2, 0x82, 0x23],
            vec![3, 0x82, 0x23]
        ]
    );
    ws.send(Message::Binary(b"\x02to 9090".to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Binary(b"\x00to 8080".to_vec().into()))
        .await
        .unwrap();
    let mut echoed = Vec::new();
    while echoed.len() < 2 {
        match tokio::time::timeout(STEP, ws.next()).await.unwrap() {
            Some(Ok(Message::Binary(b))) => echoed.push(b.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        echoed,
        vec![b"\x02to 9090".to_vec(), b"\x00to 8080".to_vec()]
    );
    ws.close(None).await.unwrap();
}

// === Negotiation failures, before any upgrade ===

async fn raw(sim: &Sim, request: String) -> (u16, String) {
    let mut s = tls(sim).await;
    s.write_all(request.as_bytes()).await.unwrap();
    let mut reader = tokio::io::BufReader::new(s);
    let mut status = String::new();
    tokio::time::timeout(STEP, reader.read_line(&mut status))
        .await
        .unwrap()
        .unwrap();
    let code = status
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        tokio::time::timeout(STEP, reader.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    (code, head.to_ascii_lowercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_errors_are_non_101() {
    let sim = Sim::start().await;
    let path = "/api/v1/namespaces/default/pods/web-0/exec?command=true&stdout=true";
    let base = |extra: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n{extra}Content-Length: 0\r\n\r\n")
    };
    // No common SPDY protocol: 403 naming what the server accepts.
    let (code, head) = raw(
        &sim,
        base("X-Stream-Protocol-Version: v9.channel.k8s.io\r\n"),
    )
    .await;
    assert_eq!(code, 403);
    assert!(
        head.contains("x-accepted-stream-protocol-versions: v4.channel.k8s.io"),
        "{head}"
    );
    // No protocol header at all: 400.
    assert_eq!(raw(&sim, base("")).await.0, 400);
    // The kubelet's choice from kubectl ≥1.30's SPDY offer is v4.
    let (code, head) = raw(
        &sim,
        base("X-Stream-Protocol-Version: v5.channel.k8s.io\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"),
    )
    .await;
    assert_eq!(code, 101);
    assert!(
        head.contains("x-stream-protocol-version: v4.channel.k8s.io"),
        "{head}"
    );
    // WebSocket with nothing common: 403; a POST WebSocket: 405; not an upgrade: 400.
    let ws = |method: &str, proto: &str| {
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {proto}\r\nContent-Length: 0\r\n\r\n")
    };
    assert_eq!(raw(&sim, ws("GET", "v9.channel.k8s.io")).await.0, 403);
    assert_eq!(raw(&sim, ws("POST", "v5.channel.k8s.io")).await.0, 405);
    let (code, head) = raw(&sim, ws("GET", "v5.channel.k8s.io")).await;
    assert_eq!(code, 101);
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let plain = format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(raw(&sim, plain).await.0, 400);
    // Exec without a command is refused by the API server before any upgrade.
    let (code, _) = raw(
        &sim,
        base("X-Stream-Protocol-Version: v4.channel.k8s.io\r\n").replace("command=true&", ""),
    )
    .await;
    assert_eq!(code, 400);
}
