//! Signing in with a real browser: Debian's chromium driven by playwright-core
//! (tests/browser/drive.mjs) against a real IdP (node `oidc-provider`, tests/idp/provider.mjs via
//! tests/support/idp.rs), all on loopback.
//!
//! - `idp_sign_in_pages_work_in_a_real_browser`: the infrastructure alone. Authorization code +
//!   PKCE for the CLI's public client with a loopback redirect on a random port, consent denied,
//!   refresh, and the device flow, each page driven in chromium.
//! - `portal_*`: the relay's browser portal (`/`, `/-/login`, `/-/callback`, `/-/kubeconfig`,
//!   `/-/logout`) end to end, and the kubeconfig it hands out used by kubectl.
//! - `kubectl_*`: `kube-relay token` as kubectl's exec credential plugin, in browser and
//!   device-code mode, its on-disk cache, refresh and logout.
//!
//! Needs chromium and tests/browser/node_modules, tests/idp/node_modules
//! (scripts/install-test-deps.sh installs them). Screenshots of every step are saved under
//! target/test-artifacts/browser/<test>/ (each test prints where).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::idp::{form_encode, jwt_parts, rsa_key, Idp, AUDIENCE};
use kube_sim::pki::TestCa;
use kube_sim::record::UserInfo;
use kube_sim::server::{SimAuth, SimConfig, SimHandle, StaticToken};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CLI_CLIENT: &str = "kube-relay-cli";
const PORTAL_CLIENT: &str = "kube-relay-portal";
const PORTAL_SECRET: &str = "portal-secret-7a41";
/// drive.mjs bounds each wait by 20 s and a whole run by 120 s; the test's bound on the process.
const DRIVE_TIMEOUT: Duration = Duration::from_secs(150);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// target/test-artifacts/browser/<test>: screenshots and the driver's JSON results.
fn artifacts(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-artifacts/browser")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    eprintln!("browser screenshots: {}", dir.display());
    dir
}

fn require_browser() {
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium missing: run scripts/install-test-deps.sh (apt-get install chromium)"
    );
    assert!(
        browser_dir().join("node_modules/playwright-core").exists(),
        "tests/browser/node_modules missing: run scripts/install-test-deps.sh (npm ci in tests/browser)"
    );
}

/// Runs `node drive.mjs <args> --artifacts <dir>` (bounded) and returns its JSON result, which
/// must say ok.
fn drive(artifacts: &Path, args: &[&str]) -> Value {
    let v = drive_raw(artifacts, args);
    assert_eq!(
        v["ok"],
        true,
        "drive.mjs {args:?} failed: {}\n(screenshots in {})",
        v["error"].as_str().unwrap_or_default(),
        artifacts.display()
    );
    v
}

fn drive_raw(artifacts: &Path, args: &[&str]) -> Value {
    let mut cmd = Command::new("node");
    cmd.arg(browser_dir().join("drive.mjs"))
        .args(args)
        .arg("--artifacts")
        .arg(artifacts)
        .current_dir(browser_dir());
    let out = crate::support::run(cmd, None, DRIVE_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "drive.mjs {args:?} printed no result ({:?})\nstdout:\n{stdout}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    std::fs::write(
        artifacts.join(format!(
            "result-{}-{}.json",
            args.first().unwrap_or(&"none"),
            std::fs::read_dir(artifacts).map(|d| d.count()).unwrap_or(0)
        )),
        serde_json::to_string_pretty(&v).unwrap(),
    )
    .unwrap();
    v
}

/// Runs drive.mjs on a blocking thread, so the test's own servers keep serving meanwhile.
async fn drive_async(artifacts: &Path, args: &[&str]) -> Value {
    let artifacts = artifacts.to_owned();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        drive(&artifacts, &args)
    })
    .await
    .unwrap()
}

/// A PKCE pair (verifier, S256 challenge).
fn pkce() -> (String, String) {
    use base64::Engine as _;
    let verifier = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref());
    (verifier, challenge)
}

/// Query parameters of a URL or request target, decoded.
fn query(target: &str) -> Vec<(String, String)> {
    let q = target.split_once('?').map_or("", |(_, q)| q);
    url::form_urlencoded::parse(q.as_bytes())
        .into_owned()
        .collect()
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A plain-HTTP loopback listener standing in for a native app's redirect URI: answers every
/// request with a small page and records each request target.
struct Callback {
    port: u16,
    targets: Arc<Mutex<Vec<String>>>,
}

impl Callback {
    async fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let targets = Arc::new(Mutex::new(Vec::new()));
        let t = targets.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let t = t.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 2048];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&buf);
                    let target = head.split(' ').nth(1).unwrap_or("").to_owned();
                    t.lock().unwrap().push(target);
                    let body = "<html><body><h1>Callback received</h1></body></html>";
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                });
            }
        });
        Self { port, targets }
    }

    fn redirect_uri(&self) -> String {
        format!("http://127.0.0.1:{}/callback", self.port)
    }

    fn last(&self) -> String {
        self.targets
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the callback was called")
    }
}

/// The IdP's discovery document.
async fn discovery(idp: &Idp) -> Value {
    let (code, _, body) = idp
        .request("GET", "/.well-known/openid-configuration", &[], "")
        .await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn authorize_url(
    endpoint: &str,
    client_id: &str,
    redirect_uri: &str,
    challenge: &str,
    state: &str,
) -> String {
    format!(
        "{endpoint}?response_type=code&client_id={}&redirect_uri={}&scope={}&resource={}&state={state}&code_challenge={challenge}&code_challenge_method=S256",
        form_encode(client_id),
        form_encode(redirect_uri),
        form_encode("openid offline_access"),
        form_encode(AUDIENCE),
    )
}

/// The access token of a person (alice, bob): an RFC 9068 JWT for the relay's audience with the
/// login name as `sub`, the account's groups and an `nbf`.
fn assert_person_token(token: &str, issuer: &str, user: &str, groups: &[&str]) {
    let (header, claims) = jwt_parts(token);
    assert_eq!(header["alg"], "RS256", "{header}");
    assert_eq!(claims["iss"], issuer, "{claims}");
    assert_eq!(claims["aud"], AUDIENCE, "{claims}");
    assert_eq!(claims["sub"], user, "{claims}");
    assert_eq!(claims["groups"], serde_json::json!(groups), "{claims}");
    assert!(claims["nbf"].is_u64(), "{claims}");
}

/// The IdP and the browser alone, as `kube-relay token` and the portal will use them: the CLI's
/// public client signs alice in with auth code + PKCE on a random loopback port (RFC 8252), gets
/// a refresh token without asking for more, refreshes; a cancelled consent comes back as
/// access_denied; bob signs in with the device flow. Every page is driven in chromium.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_sign_in_pages_work_in_a_real_browser() {
    require_browser();
    let art = artifacts("idp");
    let dir = tempfile::tempdir().unwrap();
    let key = rsa_key();
    let idp = Idp::start(
        dir.path(),
        &[&key],
        &["--cli-client-id", CLI_CLIENT, "--access-token-ttl", "120"],
    )
    .await;
    let meta = discovery(&idp).await;
    let authorization_endpoint = meta["authorization_endpoint"].as_str().unwrap();
    assert!(
        meta["grant_types_supported"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == "urn:ietf:params:oauth:grant-type:device_code"),
        "{meta}"
    );
    assert!(meta["device_authorization_endpoint"].is_string(), "{meta}");
    assert_eq!(
        meta["code_challenge_methods_supported"],
        serde_json::json!(["S256"])
    );

    // (a) Authorization code + PKCE, redirect to a port the client never registered.
    let cb = Callback::start().await;
    let (verifier, challenge) = pkce();
    let url = authorize_url(
        authorization_endpoint,
        CLI_CLIENT,
        &cb.redirect_uri(),
        &challenge,
        "state-a",
    );
    let run = drive_async(
        &art,
        &[
            "signin",
            &url,
            "--user",
            "alice",
            "--until",
            &cb.redirect_uri(),
        ],
    )
    .await;
    assert_eq!(run["final"]["h1"], "Callback received", "{run}");
    let q = query(&cb.last());
    assert_eq!(param(&q, "state"), Some("state-a"), "{q:?}");
    let code = param(&q, "code")
        .unwrap_or_else(|| panic!("no code: {q:?}"))
        .to_owned();
    let (status, tokens) = idp
        .post_form(
            "/token",
            &[
                ("grant_type", "authorization_code"),
                ("client_id", CLI_CLIENT),
                ("code", &code),
                ("redirect_uri", &cb.redirect_uri()),
                ("code_verifier", &verifier),
            ],
            None,
        )
        .await;
    assert_eq!(status, 200, "{tokens}");
    let access = tokens["access_token"].as_str().unwrap();
    assert_person_token(access, &idp.issuer, "alice", &["sre"]);
    let claims = jwt_parts(access).1;
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        120,
        "--access-token-ttl: {claims}"
    );
    let refresh = tokens["refresh_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no refresh token: {tokens}"));
    let id_claims = jwt_parts(tokens["id_token"].as_str().unwrap()).1;
    assert_eq!(id_claims["sub"], "alice", "{id_claims}");
    assert_eq!(
        id_claims["groups"],
        serde_json::json!(["sre"]),
        "{id_claims}"
    );

    // (b) Refresh: a new access token for the same person, counted as a refresh_token grant.
    let (status, refreshed) = idp
        .post_form(
            "/token",
            &[
                ("grant_type", "refresh_token"),
                ("client_id", CLI_CLIENT),
                ("refresh_token", refresh),
            ],
            None,
        )
        .await;
    assert_eq!(status, 200, "{refreshed}");
    assert_person_token(
        refreshed["access_token"].as_str().unwrap(),
        &idp.issuer,
        "alice",
        &["sre"],
    );
    idp.sync().await;
    assert_eq!(idp.grants("refresh_token"), 1, "{:?}", idp.token_events());

    // (c) PKCE is required: an authorization request without a challenge is refused.
    let auth_path = authorization_endpoint
        .strip_prefix(idp.issuer.as_str())
        .unwrap();
    let no_pkce = format!(
        "{auth_path}?response_type=code&client_id={CLI_CLIENT}&redirect_uri={}&scope=openid&state=s",
        form_encode(&cb.redirect_uri())
    );
    let (status, head, _) = idp.request("GET", &no_pkce, &[], "").await;
    assert_eq!(status, 303, "{head}");
    let location = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("location: ")
                .or_else(|| l.strip_prefix("Location: "))
        })
        .unwrap_or_else(|| panic!("no Location: {head}"));
    let q = query(location);
    assert_eq!(param(&q, "error"), Some("invalid_request"), "{location}");
    assert!(
        param(&q, "error_description").is_some_and(|d| d.contains("PKCE")),
        "{location}"
    );

    // (d) Cancel at the consent page: the client gets access_denied.
    let (_, challenge) = pkce();
    let url = authorize_url(
        authorization_endpoint,
        CLI_CLIENT,
        &cb.redirect_uri(),
        &challenge,
        "state-c",
    );
    let run = drive_async(&art, &["deny", &url, "--user", "alice"]).await;
    let q = query(&cb.last());
    assert_eq!(param(&q, "error"), Some("access_denied"), "{q:?} {run}");
    assert_eq!(param(&q, "state"), Some("state-c"), "{q:?}");

    // (e) Device flow for bob.
    let (status, dev) = idp
        .post_form(
            "/device/auth",
            &[
                ("client_id", CLI_CLIENT),
                ("scope", "openid offline_access"),
                ("resource", AUDIENCE),
            ],
            None,
        )
        .await;
    assert_eq!(status, 200, "{dev}");
    let user_code = dev["user_code"].as_str().unwrap();
    let verification_uri = dev["verification_uri"].as_str().unwrap();
    let device_code = dev["device_code"].as_str().unwrap();
    assert!(verification_uri.starts_with(&idp.issuer), "{dev}");
    drive_async(
        &art,
        &[
            "device",
            verification_uri,
            "--code",
            user_code,
            "--user",
            "bob",
        ],
    )
    .await;
    let (status, tokens) = idp
        .post_form(
            "/token",
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("client_id", CLI_CLIENT),
                ("device_code", device_code),
            ],
            None,
        )
        .await;
    assert_eq!(status, 200, "{tokens}");
    assert_person_token(
        tokens["access_token"].as_str().unwrap(),
        &idp.issuer,
        "bob",
        &["dev"],
    );
    assert!(tokens["refresh_token"].is_string(), "{tokens}");
    idp.sync().await;
    assert_eq!(
        idp.grants("urn:ietf:params:oauth:grant-type:device_code"),
        1,
        "{:?}",
        idp.token_events()
    );
}

// === the relay with a login section, its clusters, and kubectl ===

const RELAY_TOKEN: &str = "relay-own-token-41c9";
/// Each kubectl run (sign-in included) is bounded by this.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(120);

/// A simulated cluster trusting the relay's own token, with impersonation rights.
async fn start_cluster(name: &str) -> (SimHandle, String) {
    let ca = TestCa::new(&format!("kube-sim {name} CA")).unwrap();
    let host = format!("{name}.kube-sim.localhost");
    let leaf = ca.issue(&[host.as_str(), "127.0.0.1"]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = kube_sim::server::start(
        listener,
        Some(kube_sim::server::tls_config(&leaf).unwrap()),
        SimConfig {
            auth: SimAuth {
                static_tokens: vec![StaticToken {
                    token: RELAY_TOKEN.to_owned(),
                    user: UserInfo {
                        username: "system:serviceaccount:kube-system:kube-relay".to_owned(),
                        ..UserInfo::default()
                    },
                    can_impersonate: true,
                }],
                jwt: Vec::new(),
            },
            ..SimConfig::new(name)
        },
    )
    .await
    .unwrap();
    (sim, ca.cert_pem().to_owned())
}

/// The three clusters and who may use them: `sre` alpha and beta, `dev` beta, `ops` gamma.
/// (name, the rest of its flow mapping after `access: `): alpha records exec sessions.
const CLUSTERS: &[(&str, &str)] = &[
    ("alpha", "[{groups: [sre]}], recording: required"),
    ("beta", "[{groups: [sre]}, {groups: [dev]}]"),
    ("gamma", "[{groups: [ops]}]"),
];

/// A relay (in process) with `login` + `portal` sections for `idp`, on a listener bound before
/// the IdP started (its port is in the portal client's redirect URI).
struct LoginRelay {
    url: String,
    ca_file: PathBuf,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for LoginRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl LoginRelay {
    async fn start(
        dir: &Path,
        listener: TcpListener,
        idp: &Idp,
        sims: &[(SimHandle, String)],
        cookie_key: &str,
        sign_out_at_provider: bool,
    ) -> Self {
        kube_relay::install_crypto_provider();
        std::fs::create_dir_all(dir).unwrap();
        let port = listener.local_addr().unwrap().port();
        let ca = TestCa::new("relay portal test CA").unwrap();
        let leaf = ca
            .issue(&["localhost", "*.relay.test", "127.0.0.1"])
            .unwrap();
        std::fs::write(dir.join("relay.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.join("relay.key"), &leaf.key_pem).unwrap();
        let ca_file = dir.join("relay-ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        std::fs::write(dir.join("idp-ca.crt"), &idp.ca_pem).unwrap();
        std::fs::write(dir.join("relay-token"), RELAY_TOKEN).unwrap();
        std::fs::write(dir.join("portal-secret"), PORTAL_SECRET).unwrap();
        std::fs::write(dir.join("cookie.key"), cookie_key).unwrap();
        let mut yaml = format!(
            r#"listen: 127.0.0.1:0
public_url: https://localhost:{port}
tls: {{cert_file: relay.crt, key_file: relay.key, ca_file: relay-ca.crt}}
audit: {{path: audit.jsonl}}
routing: {{host_suffix: relay.test, path_prefix: /clusters}}
identity:
  issuers:
    - name: idp
      kind: oidc
      issuer: "{issuer}"
      audiences: ["{AUDIENCE}"]
      username_claim: sub
      groups_claim: groups
      ca_file: idp-ca.crt
login:
  issuer: idp
  client_id: {CLI_CLIENT}
  resource: "{AUDIENCE}"
  portal:
    client_id: {PORTAL_CLIENT}
    client_secret_file: portal-secret
    cookie_key_file: cookie.key
    session_lifetime: 1h
    sign_out_at_provider: {sign_out_at_provider}
    terminal: true
recording:
  store: {{kind: file, dir: recordings}}
  auditors: {{groups: [sre]}}
clusters:
"#,
            issuer = idp.issuer,
        );
        for ((name, access), (sim, sim_ca)) in CLUSTERS.iter().zip(sims) {
            std::fs::write(dir.join(format!("{name}-ca.crt")), sim_ca).unwrap();
            yaml.push_str(&format!(
                "  - {{name: {name}, server: \"https://{name}.kube-sim.localhost:{p}\", connect: \"127.0.0.1:{p}\", ca_file: {name}-ca.crt, upstream_auth: {{mode: impersonate, token_file: relay-token}}, access: {access}}}\n",
                p = sim.addr.port()
            ));
        }
        let path = dir.join("relay.yaml");
        std::fs::write(&path, yaml).unwrap();
        let cfg = kube_relay::config::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let app = kube_relay::server::App::with_listeners(cfg, listener, Some(admin)).unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(app.run(shutdown.clone()));
        crate::support::wait_ready(admin_addr).await;
        Self {
            url: format!("https://localhost:{port}"),
            ca_file,
            shutdown,
        }
    }
}

/// The IdP (with the CLI and portal clients, `idp_extra` flags), three clusters and a relay.
struct LoginEnv {
    idp: Idp,
    relay: LoginRelay,
    sims: Vec<(SimHandle, String)>,
    dir: tempfile::TempDir,
    /// HOME of the kubectl runs.
    home: PathBuf,
}

impl LoginEnv {
    async fn start(idp_extra: &[&str]) -> Self {
        Self::start_with(idp_extra, false).await
    }

    /// Like [`LoginEnv::start`]; `sign_out_at_provider` sets the portal's key of that name.
    async fn start_with(idp_extra: &[&str], sign_out_at_provider: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let redirect = format!("https://localhost:{port}/-/callback");
        let post_logout = format!("https://localhost:{port}/-/signed-out");
        let key = rsa_key();
        let mut flags = vec![
            "--cli-client-id",
            CLI_CLIENT,
            "--portal-client-id",
            PORTAL_CLIENT,
            "--portal-client-secret",
            PORTAL_SECRET,
            "--portal-redirect",
            redirect.as_str(),
            "--portal-post-logout",
            post_logout.as_str(),
        ];
        flags.extend_from_slice(idp_extra);
        let idp = Idp::start(dir.path(), &[&key], &flags).await;
        let mut sims = Vec::new();
        for (name, _) in CLUSTERS {
            sims.push(start_cluster(name).await);
        }
        let relay = LoginRelay::start(
            &dir.path().join("relay"),
            listener,
            &idp,
            &sims,
            "cookie-key-one-0123456789abcdef0123456789abcdef",
            sign_out_at_provider,
        )
        .await;
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        Self {
            idp,
            relay,
            sims,
            dir,
            home,
        }
    }

    /// The sim behind cluster `name`.
    fn sim(&self, name: &str) -> &SimHandle {
        let i = CLUSTERS.iter().position(|(n, _)| *n == name).unwrap();
        &self.sims[i].0
    }
}

impl Drop for LoginEnv {
    fn drop(&mut self) {
        for (sim, _) in &self.sims {
            sim.shutdown();
        }
    }
}

/// A stand-in `$BROWSER` for `kube-relay token --login browser`: appends each URL it is given
/// to `<dir>/browser.log` and hands it to `drive.mjs signin` in the background, in a session of
/// its own (the plugin is never blocked on it, and kubectl's terminal going away does not end
/// it), whose JSON result lands in `<dir>/browser-<n>.json`.
struct FakeBrowser {
    script: PathBuf,
    dir: PathBuf,
}

impl FakeBrowser {
    fn new(dir: &Path, artifacts: &Path, user: &str) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(dir).unwrap();
        let script = dir.join("browser.sh");
        let body = format!(
            r#"#!/bin/sh
# Stand-in browser for kube-relay token (tests/e2e/browser.rs).
echo "$1" >> '{dir}/browser.log'
n=$(wc -l < '{dir}/browser.log' | tr -d ' ')
# A session of its own (setsid): the plugin runs under kubectl's terminal, whose hangup when
# kubectl exits must not reach the browser.
setsid sh -c 'node "$1" signin "$2" --user "$3" --until "http://127.0.0.1:" --artifacts "$4" --label "$5" > "$6.part" 2>&1; mv "$6.part" "$6.json"' \
  sh '{drive}' "$1" '{user}' '{art}' "browser-mode-{user}-$n" '{dir}/browser-'$n </dev/null >/dev/null 2>&1 &
exit 0
"#,
            dir = dir.display(),
            drive = browser_dir().join("drive.mjs").display(),
            art = artifacts.display(),
        );
        std::fs::write(&script, body).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self {
            script,
            dir: dir.to_owned(),
        }
    }

    /// How many times the plugin opened the browser.
    fn opened(&self) -> usize {
        std::fs::read_to_string(self.dir.join("browser.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The driver's result for the n-th opening (1-based), waiting (bounded) for it.
    async fn result(&self, n: usize) -> Value {
        let path = self.dir.join(format!("browser-{n}.json"));
        let deadline = tokio::time::Instant::now() + DRIVE_TIMEOUT;
        while !path.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the browser driver wrote no result for opening {n}; partial output: {}",
                std::fs::read_to_string(self.dir.join(format!("browser-{n}.part")))
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or("");
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

/// `sh -c` quoting.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A process under `script` (a pseudo-terminal: kubectl passes `interactive: true` to exec
/// plugins only when its stdin is a terminal), its combined output collected as it comes.
struct PtyRun {
    child: std::process::Child,
    output: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    what: String,
}

impl PtyRun {
    fn start(argv: &[String], env: &[(&str, String)]) -> Self {
        use std::io::Read as _;
        let line = argv
            .iter()
            .map(|a| sh_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = Command::new("script");
        cmd.args(["-qefc", &line, "/dev/null"])
            .env_remove("KUBECONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn script (util-linux)");
        let output = Arc::new(Mutex::new(String::new()));
        let mut out = child.stdout.take().unwrap();
        let o = output.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    return;
                }
                o.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', ""));
            }
        });
        Self {
            child,
            output,
            reader: Some(reader),
            what: line,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits (bounded) until the output so far satisfies `find`, and returns what it found.
    async fn wait_for<T>(&mut self, what: &str, find: impl Fn(&str) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + KUBECTL_TIMEOUT;
        loop {
            if let Some(v) = find(&self.output()) {
                return v;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Drain what is left before giving up.
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                if let Some(v) = find(&self.output()) {
                    return v;
                }
                panic!(
                    "{} exited ({status}) before {what}; output:\n{}",
                    self.what,
                    self.output()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what} within {KUBECTL_TIMEOUT:?} from {}; output:\n{}",
                self.what,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) for the exit; (success, output).
    async fn finish(mut self) -> (bool, String) {
        let deadline = tokio::time::Instant::now() + KUBECTL_TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not finish within {KUBECTL_TIMEOUT:?}; output:\n{}",
                    self.what,
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        (status.success(), self.output())
    }
}

impl Drop for PtyRun {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `kubectl auth whoami` through `kubeconfig`'s `context`, in a pseudo-terminal, with `env`.
fn whoami(kubeconfig: &Path, context: &str, env: &[(&str, String)]) -> PtyRun {
    let argv: Vec<String> = vec![
        crate::support::kubectl("1.33").display().to_string(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--context".into(),
        context.into(),
        "--request-timeout=60s".into(),
        "auth".into(),
        "whoami".into(),
        "-o".into(),
        "jsonpath=WHOAMI {.status.userInfo.username} {.status.userInfo.groups}{\"\\n\"}".into(),
    ];
    PtyRun::start(&argv, env)
}

/// The `WHOAMI <user> <groups>` line of a [`whoami`] run: (username, groups JSON).
fn whoami_line(output: &str) -> Option<(String, Value)> {
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("WHOAMI "))?;
    let (user, groups) = line.split_once(' ')?;
    Some((user.to_owned(), serde_json::from_str(groups).ok()?))
}

/// Runs a whoami to completion and returns (username, groups), which it must print.
async fn whoami_ok(kubeconfig: &Path, context: &str, env: &[(&str, String)]) -> (String, Value) {
    let (ok, out) = whoami(kubeconfig, context, env).finish().await;
    assert!(ok, "kubectl auth whoami --context {context} failed:\n{out}");
    whoami_line(&out).unwrap_or_else(|| panic!("no WHOAMI line in:\n{out}"))
}

/// The `*.json` entries of a token cache directory.
fn cache_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The environment of a kubectl run whose exec plugin is `kube-relay token`: its HOME, the
/// token cache, the IdP's private CA (KUBE_RELAY_IDP_CA_FILE), `kube-relay` first on PATH (the
/// portal's kubeconfig runs `kube-relay` from PATH) and, when given, the stand-in browser.
fn plugin_env(
    env: &LoginEnv,
    cache: &Path,
    browser: Option<&FakeBrowser>,
) -> Vec<(&'static str, String)> {
    let bin = Path::new(env!("CARGO_BIN_EXE_kube-relay"))
        .parent()
        .unwrap()
        .display()
        .to_string();
    let path = format!("{bin}:{}", std::env::var("PATH").unwrap_or_default());
    let mut v = vec![
        ("HOME", env.home.display().to_string()),
        ("KUBECACHEDIR", cache.display().to_string()),
        (
            "KUBE_RELAY_IDP_CA_FILE",
            env.idp.ca_file.display().to_string(),
        ),
        ("PATH", path),
    ];
    match browser {
        Some(b) => v.push(("BROWSER", b.script.display().to_string())),
        // No browser at all: a plugin that tries to open one fails visibly.
        None => v.push(("BROWSER", "/bin/false".to_owned())),
    }
    v
}

fn yaml_file(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

fn names(doc: &Value, list: &str) -> Vec<String> {
    doc[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {doc}"))
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect()
}

fn cookie<'a>(cookies: &'a Value, name: &str) -> Option<&'a Value> {
    cookies.as_array()?.iter().find(|c| c["name"] == name)
}

const SESSION_COOKIE: &str = "__Host-kube-relay-session";
const LOGIN_COOKIE: &str = "__Host-kube-relay-login";

/// The portal end to end in chromium: alice signs in, sees exactly her clusters, downloads a
/// kubeconfig that kubectl then uses through the relay (its `kube-relay token` signs in with
/// the browser once, then reuses the cached token), signs out; bob sees only his cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_sign_in_kubeconfig_and_sign_out() {
    require_browser();
    let art = artifacts("portal");
    let env = LoginEnv::start(&[]).await;
    let run = portal_journey(&env, &art, "alice", "downloads-alice").await;
    let alice = run.clone();
    // The landing page offers sign-in; alice sees alpha and beta, not gamma.
    assert!(
        run["landing"]["text"].as_str().unwrap().contains("Sign in"),
        "{}",
        run["landing"]
    );
    assert_eq!(
        run["clusters"],
        serde_json::json!(["alpha", "beta"]),
        "{run}"
    );
    assert!(
        run["signed_in"]["text"].as_str().unwrap().contains("alice"),
        "{}",
        run["signed_in"]
    );
    // The session cookie: HttpOnly, Secure, SameSite=Lax; the one-shot login cookie is gone.
    let session = cookie(&run["cookies"], SESSION_COOKIE)
        .unwrap_or_else(|| panic!("no {SESSION_COOKIE}: {}", run["cookies"]));
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["secure"], true, "{session}");
    assert_eq!(session["sameSite"], "Lax", "{session}");
    assert_eq!(session["path"], "/", "{session}");
    assert!(
        cookie(&run["cookies"], LOGIN_COOKIE).is_none(),
        "{}",
        run["cookies"]
    );
    // The kubeconfig names exactly her clusters and runs `kube-relay token` in browser mode.
    let kubeconfig = PathBuf::from(run["kubeconfig"].as_str().unwrap());
    let doc = yaml_file(&kubeconfig);
    assert_eq!(names(&doc, "contexts"), ["alpha", "beta"], "{doc}");
    let exec = &doc["users"][0]["user"]["exec"];
    assert_eq!(exec["command"], "kube-relay", "{doc}");
    let args: Vec<&str> = exec["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args.first(), Some(&"token"), "{args:?}");
    assert!(
        args.windows(2).any(|w| w == ["--login", "browser"]),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--issuer", env.idp.issuer.as_str()]),
        "{args:?}"
    );

    // kubectl with that kubeconfig: the plugin opens the (stand-in) browser once, alice signs
    // in at the IdP, and the relay impersonates her upstream.
    let browser = FakeBrowser::new(&env.dir.path().join("browser-alice"), &art, "alice");
    let cache = env.dir.path().join("cache-alice");
    let penv = plugin_env(&env, &cache, Some(&browser));
    env.idp.sync().await;
    let codes_before = env.idp.grants("authorization_code");
    let (user, groups) = whoami_ok(&kubeconfig, "alpha", &penv).await;
    assert_eq!(user, "alice");
    assert!(
        groups.as_array().unwrap().iter().any(|g| g == "sre"),
        "{groups}"
    );
    assert_eq!(browser.opened(), 1);
    let signin = browser.result(1).await;
    assert_eq!(signin["ok"], true, "{signin}");
    assert_eq!(signin["final"]["h1"], "Signed in", "{signin}");
    env.idp.sync().await;
    assert_eq!(env.idp.grants("authorization_code"), codes_before + 1);
    let seen = env
        .sim("alpha")
        .record
        .matching("/apis/authentication.k8s.io/v1/selfsubjectreviews")
        .last()
        .cloned()
        .expect("alpha saw the whoami");
    assert_eq!(seen.user.expect("authenticated").username, "alice");
    // The other context shares the user and so the cached token: no browser, no IdP request.
    env.idp.sync().await;
    let tokens_before = env.idp.token_events().len();
    let (user, _) = whoami_ok(&kubeconfig, "beta", &penv).await;
    assert_eq!(user, "alice");
    assert_eq!(browser.opened(), 1);
    env.idp.sync().await;
    assert_eq!(env.idp.token_events().len(), tokens_before);

    // bob: beta only.
    let run = portal_journey(&env, &art, "bob", "downloads-bob").await;
    assert_eq!(run["clusters"], serde_json::json!(["beta"]), "{run}");
    let doc = yaml_file(Path::new(run["kubeconfig"].as_str().unwrap()));
    assert_eq!(names(&doc, "contexts"), ["beta"], "{doc}");

    // Both signed out at the end of their journeys.
    assert_keyboard_and_a11y(&alice);
    assert_signed_out(&alice);
    assert_keyboard_and_a11y(&run);
    assert_signed_out(&run);
    // Sign-out is local by default: the page says the provider may still know the browser,
    // and it does (the next "Sign in" asks for no password).
    assert!(
        alice["signed_out"]["text"]
            .as_str()
            .unwrap()
            .contains("You may still be signed in at idp"),
        "{}",
        alice["signed_out"]
    );
    assert!(alice.get("provider_signout").is_none(), "{alice}");
    assert_ne!(alice["sign_in_again"], "login", "{alice}");
}

/// With `login.portal.sign_out_at_provider`, "Sign out" also ends the browser's session at the
/// provider (RP-initiated logout): the relay clears its cookies and sends the browser to the
/// provider's end_session_endpoint, which confirms and returns it to `/-/signed-out`; the next
/// "Sign in" asks for a password again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_sign_out_ends_the_provider_session_too() {
    require_browser();
    let art = artifacts("portal-provider-sign-out");
    let env = LoginEnv::start_with(&[], true).await;
    let run = portal_journey(&env, &art, "alice", "downloads").await;
    assert_eq!(
        run["clusters"],
        serde_json::json!(["alpha", "beta"]),
        "{run}"
    );
    // The provider's own sign-out page came between.
    let at_provider = run["provider_signout"]["url"].as_str().unwrap_or_default();
    assert!(
        at_provider.starts_with(&format!("{}/session/end", env.idp.issuer)),
        "{}",
        run["provider_signout"]
    );
    assert!(
        run["signed_out"]["url"]
            .as_str()
            .unwrap()
            .ends_with("/-/signed-out"),
        "{}",
        run["signed_out"]
    );
    assert!(
        run["signed_out"]["text"]
            .as_str()
            .unwrap()
            .contains("returned from idp's sign-out page"),
        "{}",
        run["signed_out"]
    );
    assert_keyboard_and_a11y(&run);
    assert_signed_out(&run);
    assert_eq!(run["sign_in_again"], "login", "{run}");
}

/// drive.mjs's portal journey for `user` on the env's relay, downloads into `downloads`
/// (under the env's directory).
async fn portal_journey(env: &LoginEnv, art: &Path, user: &str, downloads: &str) -> Value {
    let downloads = env.dir.path().join(downloads);
    drive_async(
        art,
        &[
            "portal",
            "--relay",
            &env.relay.url,
            "--user",
            user,
            "--out",
            downloads.to_str().unwrap(),
        ],
    )
    .await
}

/// What the portal journey recorded after "Sign out": a POST carrying a CSRF field, then a
/// page without clusters, no session cookie, and /-/kubeconfig refused.
/// The journey was done with the keyboard (Tab to the control, Enter) and the pages pass the
/// basic accessibility checks drive.mjs makes.
fn assert_keyboard_and_a11y(run: &Value) {
    let keys: Vec<&str> = run["keyboard"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(keys.contains(&"sign-in"), "{keys:?}");
    assert!(keys.contains(&"sign-out"), "{keys:?}");
    for page in ["landing", "signed_in"] {
        assert_eq!(
            run["a11y"][page],
            serde_json::json!([]),
            "accessibility problems on the {page} page"
        );
    }
}

fn assert_signed_out(run: &Value) {
    assert_eq!(
        run["signout_form"]["method"], "post",
        "{}",
        run["signout_form"]
    );
    assert!(
        run["signout_form"]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "csrf"),
        "{}",
        run["signout_form"]
    );
    assert_ne!(
        run["signed_out"]["h1"], "Sign-out could not be verified",
        "the relay refused the POST of its own Sign out button (a browser sends `Origin: null` \
         on it when the page's Referrer-Policy is no-referrer)"
    );
    assert_eq!(
        run["signed_out"]["has_clusters"], false,
        "{}",
        run["signed_out"]
    );
    assert!(
        cookie(&run["cookies_after_signout"], SESSION_COOKIE).is_none(),
        "{}",
        run["cookies_after_signout"]
    );
    assert_eq!(
        run["after_signout"]["has_clusters"], false,
        "{}",
        run["after_signout"]
    );
    assert_eq!(
        run["after_signout"]["kubeconfig"]["status"], 401,
        "{}",
        run["after_signout"]
    );
}

/// What the portal refuses, as a browser sees it: a cancelled consent, a stale sign-in link, a
/// tampered session cookie, and a session sealed with another key (a key rotation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_refuses_denied_stale_and_tampered_sign_ins() {
    require_browser();
    let art = artifacts("portal-refusals");
    let env = LoginEnv::start(&[]).await;
    let url = format!("{}/", env.relay.url);

    // Cancel at the IdP's consent page.
    let run = drive_async(&art, &["deny", &url, "--user", "alice"]).await;
    assert_eq!(run["final"]["h1"], "Sign-in was denied", "{run}");
    assert_eq!(run["final"]["has_clusters"], false, "{run}");
    assert!(cookie(&run["cookies"], SESSION_COOKIE).is_none(), "{run}");

    // A callback nobody started.
    let stale = format!("{}/-/callback?code=forged&state=forged", env.relay.url);
    let run = drive_async(&art, &["open", &stale, "--label", "stale-link"]).await;
    assert_eq!(
        run["final"]["h1"], "Sign-in link expired or invalid",
        "{run}"
    );

    // A session cookie altered by one character.
    let run = drive_async(
        &art,
        &["tamper", "--relay", &env.relay.url, "--user", "alice"],
    )
    .await;
    assert_eq!(
        run["clusters"],
        serde_json::json!(["alpha", "beta"]),
        "{run}"
    );
    assert_eq!(run["before"]["status"], 200, "{run}");
    assert_eq!(run["after"]["h1"], "Your session has expired", "{run}");
    assert_eq!(run["after"]["has_clusters"], false, "{run}");
    assert_eq!(run["after"]["kubeconfig"]["status"], 401, "{run}");

    // Another relay on the same host name with another cookie key: the browser sends it the
    // first relay's cookie, which it cannot open (as after a key rotation).
    let other = LoginRelay::start(
        &env.dir.path().join("relay-other"),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        &env.idp,
        &env.sims,
        "cookie-key-two-fedcba9876543210fedcba9876543210",
        false,
    )
    .await;
    let run = drive_async(
        &art,
        &[
            "stale",
            "--relay",
            &env.relay.url,
            "--other",
            &other.url,
            "--user",
            "bob",
        ],
    )
    .await;
    assert_eq!(run["clusters"], serde_json::json!(["beta"]), "{run}");
    assert!(cookie(&run["cookies"], SESSION_COOKIE).is_some(), "{run}");
    assert_eq!(run["after"]["h1"], "Your session has expired", "{run}");
    assert_eq!(run["after"]["has_clusters"], false, "{run}");
    assert_eq!(run["after"]["kubeconfig"]["status"], 401, "{run}");
}

/// A kubeconfig whose users run `kube-relay token` (this build) in browser mode (`browser`
/// user, context `alpha`) and device-code mode (`device` user, context `beta`), each with its
/// own cache directory.
fn plugin_kubeconfig(env: &LoginEnv, path: &Path, browser_cache: &Path, device_cache: &Path) {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(&env.relay.ca_file).unwrap());
    let user = |mode: &str, cache: &Path| {
        serde_json::json!({
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": env!("CARGO_BIN_EXE_kube-relay"),
                "args": token_args(env, mode, cache),
                "interactiveMode": "IfAvailable",
            }
        })
    };
    let clusters: Vec<Value> = ["alpha", "beta"]
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c,
                "cluster": {
                    "server": format!("{}/clusters/{c}", env.relay.url),
                    "tls-server-name": format!("{c}.relay.test"),
                    "certificate-authority-data": ca,
                }
            })
        })
        .collect();
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": clusters,
        "users": [
            {"name": "browser", "user": user("browser", browser_cache)},
            {"name": "device", "user": user("devicecode", device_cache)},
        ],
        "contexts": [
            {"name": "alpha", "context": {"cluster": "alpha", "user": "browser"}},
            {"name": "beta", "context": {"cluster": "beta", "user": "device"}},
        ],
    });
    std::fs::write(path, serde_yaml_ng::to_string(&doc).unwrap()).unwrap();
}

fn token_args(env: &LoginEnv, mode: &str, cache: &Path) -> Vec<String> {
    [
        "token",
        "--login",
        mode,
        "--issuer",
        &env.idp.issuer,
        "--client-id",
        CLI_CLIENT,
        "--resource",
        AUDIENCE,
        "--cache-dir",
        cache.to_str().unwrap(),
        "--ca-file",
        env.idp.ca_file.to_str().unwrap(),
        "--timeout",
        "90s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// kubectl runs `kube-relay token` as its exec plugin: browser mode signs in once and the
/// next kubectl process reuses the cached token without a request to the IdP; device-code mode
/// prints a code that a person enters at the IdP; `--logout` removes that cache entry, after
/// which kubectl without a terminal fails at once instead of waiting for a person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_token_plugin_browser_device_cache_and_logout() {
    require_browser();
    let art = artifacts("kubectl-plugin");
    let env = LoginEnv::start(&[]).await;
    let browser_cache = env.dir.path().join("cache-browser");
    let device_cache = env.dir.path().join("cache-device");
    let kubeconfig = env.dir.path().join("kubeconfig");
    plugin_kubeconfig(&env, &kubeconfig, &browser_cache, &device_cache);
    let browser = FakeBrowser::new(&env.dir.path().join("browser-alice"), &art, "alice");

    // Browser mode: one sign-in.
    let penv = plugin_env(&env, &browser_cache, Some(&browser));
    let (user, groups) = whoami_ok(&kubeconfig, "alpha", &penv).await;
    assert_eq!(user, "alice");
    assert!(
        groups.as_array().unwrap().iter().any(|g| g == "sre"),
        "{groups}"
    );
    assert_eq!(browser.opened(), 1);
    let signin = browser.result(1).await;
    assert_eq!(signin["final"]["h1"], "Signed in", "{signin}");
    env.idp.sync().await;
    assert_eq!(
        env.idp.grants("authorization_code"),
        1,
        "{:?}",
        env.idp.token_events()
    );
    assert_eq!(cache_entries(&browser_cache).len(), 1);

    // Another kubectl process: the cached token, no IdP token request, no browser.
    env.idp.sync().await;
    let token_requests = env.idp.hits("/token");
    let (user, _) = whoami_ok(&kubeconfig, "alpha", &penv).await;
    assert_eq!(user, "alice");
    assert_eq!(
        browser.opened(),
        1,
        "signed in again instead of using the cache"
    );
    env.idp.sync().await;
    assert_eq!(
        env.idp.hits("/token"),
        token_requests,
        "{:?}",
        env.idp.token_events()
    );

    // Device code: kubectl shows the code (plugin stderr), a person enters it elsewhere.
    let denv = plugin_env(&env, &device_cache, None);
    let mut run = whoami(&kubeconfig, "beta", &denv);
    let (uri, code) = run
        .wait_for("the device code prompt", |out| {
            // Complete lines only: the prompt may arrive in pieces.
            let complete = &out[..out.rfind('\n')?];
            let line = complete.lines().find(|l| l.contains("enter the code "))?;
            let code = line
                .rsplit("enter the code ")
                .next()?
                .trim()
                .trim_end_matches(')');
            let uri = line.split("(or ").nth(1)?.split(' ').next()?;
            Some((uri.to_owned(), code.to_owned()))
        })
        .await;
    assert!(uri.starts_with(&env.idp.issuer), "{uri}");
    drive_async(&art, &["device", &uri, "--code", &code, "--user", "bob"]).await;
    let (ok, out) = run.finish().await;
    assert!(ok, "device-code kubectl failed:\n{out}");
    let (user, groups) = whoami_line(&out).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(user, "bob");
    assert!(
        groups.as_array().unwrap().iter().any(|g| g == "dev"),
        "{groups}"
    );
    env.idp.sync().await;
    let device_grants: Vec<Value> = env
        .idp
        .token_events()
        .into_iter()
        .filter(|e| e["grant_type"] == "urn:ietf:params:oauth:grant-type:device_code")
        .collect();
    assert_eq!(
        device_grants.last().map(|e| e["status"].clone()),
        Some(Value::from(200)),
        "{device_grants:?}"
    );
    assert_eq!(cache_entries(&device_cache).len(), 1);

    // Logout removes that login's entry only.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kube-relay"));
    cmd.args(token_args(&env, "devicecode", &device_cache))
        .arg("--logout")
        .env("HOME", &env.home);
    let out = crate::support::run(cmd, None, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "logout failed: {stderr}");
    assert!(stderr.contains("removed"), "{stderr}");
    assert!(
        cache_entries(&device_cache).is_empty(),
        "{:?}",
        cache_entries(&device_cache)
    );
    assert_eq!(cache_entries(&browser_cache).len(), 1);

    // Now nothing is cached for the device user and kubectl has no terminal: the plugin
    // refuses at once (no device prompt nobody can answer).
    let mut cmd = Command::new(crate::support::kubectl("1.33"));
    cmd.arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "--context",
            "beta",
            "--request-timeout=30s",
            "auth",
            "whoami",
        ])
        .env_remove("KUBECONFIG")
        .stdin(std::process::Stdio::null());
    for (k, v) in &denv {
        cmd.env(k, v);
    }
    let out = crate::support::run(cmd, None, KUBECTL_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no terminal"), "{stderr}");
    assert!(cache_entries(&device_cache).is_empty());
}

/// An access token near its end is refreshed: with 90 s tokens (less than the plugin's 2 min
/// reuse margin, so the cached token is already too old for the next run) the second kubectl
/// uses the refresh token, without a browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_token_plugin_refreshes_without_a_new_sign_in() {
    require_browser();
    let art = artifacts("kubectl-refresh");
    let env = LoginEnv::start(&["--access-token-ttl", "90"]).await;
    let browser_cache = env.dir.path().join("cache-browser");
    let device_cache = env.dir.path().join("cache-device");
    let kubeconfig = env.dir.path().join("kubeconfig");
    plugin_kubeconfig(&env, &kubeconfig, &browser_cache, &device_cache);
    let browser = FakeBrowser::new(&env.dir.path().join("browser-alice"), &art, "alice");
    let penv = plugin_env(&env, &browser_cache, Some(&browser));

    let (user, _) = whoami_ok(&kubeconfig, "alpha", &penv).await;
    assert_eq!(user, "alice");
    assert_eq!(browser.opened(), 1);
    assert_eq!(browser.result(1).await["final"]["h1"], "Signed in");
    env.idp.sync().await;
    assert_eq!(env.idp.grants("authorization_code"), 1);
    assert_eq!(env.idp.grants("refresh_token"), 0);

    let (ok, out) = whoami(&kubeconfig, "alpha", &penv).finish().await;
    assert!(ok, "kubectl auth whoami failed:\n{out}");
    env.idp.sync().await;
    assert_eq!(
        browser.opened(),
        1,
        "signed in again instead of refreshing; IdP token requests: {:?}\nkubectl:\n{out}",
        env.idp.token_events()
    );
    let (user, groups) = whoami_line(&out).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(user, "alice");
    assert!(
        groups.as_array().unwrap().iter().any(|g| g == "sre"),
        "{groups}"
    );
    env.idp.sync().await;
    assert_eq!(env.idp.grants("authorization_code"), 1);
    let refreshes: Vec<Value> = env
        .idp
        .token_events()
        .into_iter()
        .filter(|e| e["grant_type"] == "refresh_token")
        .collect();
    assert_eq!(refreshes.len(), 1, "{:?}", env.idp.token_events());
    assert_eq!(refreshes[0]["status"], 200, "{refreshes:?}");
    assert_eq!(refreshes[0]["client_id"], CLI_CLIENT, "{refreshes:?}");
}

/// Step-up in the browser: `kube-relay token --auth-context c1 --login browser` opens a sign-in
/// whose authorization request carries Entra's `claims` request for authentication context c1;
/// after the sign-in in Chromium the access token holds `acrs: ["c1"]`. The step-up token is
/// cached apart: the plain login signs in on its own and its token has no `acrs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_up_sign_in_sends_the_claims_request_in_a_real_browser() {
    require_browser();
    let art = artifacts("step-up");
    let env = LoginEnv::start(&[]).await;
    let cache = env.dir.path().join("cache-step-up");
    let browser = FakeBrowser::new(&env.dir.path().join("browser-step-up"), &art, "alice");
    let token = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kube-relay"));
        c.args(token_args(&env, "browser", &cache))
            .args(extra)
            .env(
                "KUBERNETES_EXEC_INFO",
                r#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","spec":{"interactive":true}}"#,
            )
            .env("BROWSER", &browser.script)
            .env("HOME", &env.home)
            .env_remove("KUBE_RELAY_LOGIN")
            .stdin(std::process::Stdio::null());
        c
    };
    let run_token = |c: Command| async move {
        let out = tokio::task::spawn_blocking(move || crate::support::run(c, None, DRIVE_TIMEOUT))
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "kube-relay token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cred: Value = serde_json::from_slice(&out.stdout).unwrap();
        cred["status"]["token"].as_str().unwrap().to_owned()
    };

    let stepped = run_token(token(&["--auth-context", "c1"])).await;
    assert_eq!(browser.opened(), 1);
    assert_eq!(browser.result(1).await["final"]["h1"], "Signed in");
    let url = std::fs::read_to_string(browser.dir.join("browser.log")).unwrap();
    let q = query(url.lines().next().unwrap());
    let claims: Value = serde_json::from_str(param(&q, "claims").unwrap()).unwrap();
    assert_eq!(
        claims,
        serde_json::json!({"access_token": {"acrs": {"essential": true, "value": "c1"}}})
    );
    let (_, payload) = jwt_parts(&stepped);
    assert_eq!(payload["acrs"], serde_json::json!(["c1"]), "{payload}");
    assert_eq!(payload["sub"], "alice");

    // Cached: the same step-up login again opens no browser.
    assert_eq!(run_token(token(&["--auth-context", "c1"])).await, stepped);
    assert_eq!(browser.opened(), 1);

    // The plain login is its own cache entry and its own sign-in, without the claims request.
    let plain = run_token(token(&[])).await;
    assert_eq!(browser.opened(), 2);
    let url = std::fs::read_to_string(browser.dir.join("browser.log")).unwrap();
    let q = query(url.lines().nth(1).unwrap());
    assert!(param(&q, "claims").is_none(), "{url}");
    assert!(jwt_parts(&plain).1.get("acrs").is_none());
}

/// A finished recording as the relay writes them, for the playback tests.
const RECORDED: &str = concat!(
    "{\"version\":2,\"width\":80,\"height\":24,\"timestamp\":1796610600,\"title\":\"alice on alpha: default/web-0\",\"command\":\"sh\",\"env\":{\"TERM\":\"xterm-256color\"}}\n",
    "[0.1,\"o\",\"$ echo hello\\r\\n\"]\n",
    "[0.3,\"o\",\"hello from the recording\\r\\n\"]\n",
);
const RECORDING: &str = "alpha_20261207T023000Z_0d0e0a0d-0000-4000-8000-000000000001.cast";

/// docs/security.md G3: an auditor (alice, in `sre`) finds the recording from the portal and
/// plays it in Chromium with the embedded asciinema-player; bob (not an auditor) gets the same
/// 403 for the list and the file; without a session the file is a 401 and the list a sign-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditors_play_recordings_in_a_real_browser_and_nobody_else_can() {
    require_browser();
    let art = artifacts("playback");
    let env = LoginEnv::start(&[]).await;
    let store = env.dir.path().join("relay/recordings");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join(RECORDING), RECORDED).unwrap();

    let alice = drive_async(
        &art,
        &[
            "playback",
            "--relay",
            &env.relay.url,
            "--user",
            "alice",
            "--expect",
            "hello from the recording",
        ],
    )
    .await;
    assert_eq!(alice["offered"], true, "{alice}");
    assert_eq!(
        alice["recordings"],
        serde_json::json!([RECORDING]),
        "{alice}"
    );
    assert!(
        alice["terminal"]
            .as_str()
            .is_some_and(|t| t.contains("hello from the recording")),
        "the player did not show the recording: {alice}"
    );
    assert_eq!(alice["file"]["status"], 200, "{alice}");
    assert_eq!(alice["page_errors"], serde_json::json!([]), "{alice}");

    let bob = drive_async(
        &art,
        &["playback", "--relay", &env.relay.url, "--user", "bob"],
    )
    .await;
    assert_eq!(bob["offered"], false, "{bob}");
    assert_eq!(bob["list"]["status"], 403, "{bob}");
    assert_eq!(bob["list"]["h1"], "Recordings are for auditors", "{bob}");

    // Without any session: the file is refused, the list sends the browser to sign in.
    use rustls_pki_types::pem::PemObject as _;
    let ca = rustls_pki_types::CertificateDer::pem_file_iter(&env.relay.ca_file)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let addr: std::net::SocketAddr = env
        .relay
        .url
        .trim_start_matches("https://localhost:")
        .parse::<u16>()
        .map(|p| ([127, 0, 0, 1], p).into())
        .unwrap();
    for (path, want) in [
        (format!("/-/recordings/file/{RECORDING}"), "HTTP/1.1 401"),
        ("/-/recordings".to_owned(), "HTTP/1.1 303"),
        (format!("/-/recordings/play/{RECORDING}"), "HTTP/1.1 303"),
    ] {
        let got = crate::support::tls_exchange(
            addr,
            &ca,
            "localhost",
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(10),
        )
        .await;
        assert!(got.starts_with(want), "{path}: {got}");
        assert!(!got.contains("hello from the recording"), "{path}: {got}");
    }
}

/// The on-call journey in Chromium (README "Web terminal"): alice signs in, opens a terminal in
/// a pod with the keyboard, runs a command and sees its output, resizes, exits with a code the
/// page shows, follows the pod's logs; then, as an auditor, plays that very session back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_terminal_runs_a_shell_and_follows_logs_in_a_real_browser() {
    require_browser();
    let art = artifacts("terminal");
    let env = LoginEnv::start(&[]).await;
    let run = drive_async(
        &art,
        &["terminal", "--relay", &env.relay.url, "--user", "alice"],
    )
    .await;
    assert_eq!(run["exit_code"], "3", "{run}");
    assert!(
        run["terminal"]
            .as_str()
            .is_some_and(|t| t.contains("hello-web")),
        "{run}"
    );
    assert!(run["logs"].as_str().is_some_and(|l| !l.is_empty()), "{run}");
    assert_eq!(run["page_errors"], serde_json::json!([]), "{run}");
    assert_eq!(run["a11y"]["terminal"], serde_json::json!([]), "{run}");
    // Signed out: the page no longer lists clusters and the terminal sends the browser to sign in.
    assert_eq!(run["signed_out"]["has_clusters"], false, "{run}");
    assert_eq!(run["signed_out"]["terminal"], 303, "{run}");
    // The cluster saw alice's exec, made by the relay's credential for her (impersonate mode).
    // The relay (another process) writes the record when the session ends: wait for it.
    let audit_path = env.dir.path().join("relay/audit.jsonl");
    let exec: Vec<Value> = crate::support::eventually("the exec's record", DRIVE_TIMEOUT, || {
        let audit = std::fs::read_to_string(&audit_path).unwrap_or_default();
        let exec: Vec<Value> = audit
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["objectRef"]["subresource"] == "exec" && r["stage"] == "ResponseComplete")
            .collect();
        async move {
            if exec.is_empty() {
                Err(audit)
            } else {
                Ok(exec)
            }
        }
    })
    .await;
    assert_eq!(exec.len(), 1, "{exec:?}");
    assert_eq!(
        exec[0]["annotations"]["kube-relay.io/client"],
        "web-terminal"
    );
    assert_eq!(exec[0]["user"]["username"], "alice");
    assert!(
        !exec[0]["requestURI"].as_str().unwrap().contains("csrf"),
        "{}",
        exec[0]
    );

    // The session was recorded (alpha requires it): the auditor replays it in the browser.
    let recording = exec[0]["annotations"]["kube-relay.io/recording"]
        .as_str()
        .expect("the record names the recording")
        .to_owned();
    let played = drive_async(
        &art,
        &[
            "playback",
            "--relay",
            &env.relay.url,
            "--user",
            "alice",
            "--expect",
            "hello-web",
            "--label",
            "replay-alice",
        ],
    )
    .await;
    assert_eq!(
        played["recordings"],
        serde_json::json!([recording]),
        "{played}"
    );
    // The browser told the pod its size, and again when the window shrank.
    let cast =
        std::fs::read_to_string(env.dir.path().join("relay/recordings").join(&recording)).unwrap();
    let header: Value = serde_json::from_str(cast.lines().next().unwrap()).unwrap();
    // The size is the header's when it came before any output, else a resize event.
    let sized = (header["width"].as_u64(), header["height"].as_u64()) != (Some(80), Some(24));
    assert!(
        sized || cast.contains(",\"r\","),
        "the browser's size is missing: {cast}"
    );
    assert!(
        played["terminal"]
            .as_str()
            .is_some_and(|t| t.contains("hello-web")),
        "the replay did not show the session: {played}"
    );
}

/// An auditor replays kubectl's own sessions in Chromium: exec sessions of kubectl 1.27 (SPDY)
/// and 1.33 (WebSocket), recorded by the dev environment's relay, played from the portal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_sessions_recorded_by_the_relay_play_back_in_a_real_browser() {
    require_browser();
    let art = artifacts("kubectl-playback");
    // Record: kubectl through the dev environment, whose cluster alpha requires recording.
    let dev = crate::support::dev_env().await;
    let mut recorded = Vec::new();
    for version in ["1.27", "1.33"] {
        let text = format!("kubectl-{version}-was-here");
        let out = dev
            .kubectl(version, "alpha")
            .args(["exec", "-n", "default", "web-0", "--", "echo", &text])
            .output()
            .unwrap();
        assert!(out.status.success(), "kubectl {version}");
        recorded.push(text);
    }
    let records = crate::support::eventually("two session records", DRIVE_TIMEOUT, || async {
        let names: Vec<String> = std::fs::read_to_string(dev.dev.dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["stage"] == "ResponseComplete")
            .filter_map(|r| {
                r["annotations"]["kube-relay.io/recording"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        if names.len() >= 2 {
            Ok(names)
        } else {
            Err(names)
        }
    })
    .await;
    // Play: the recordings, as the relay wrote them, in a portal with an auditor.
    let env = LoginEnv::start(&[]).await;
    let store = env.dir.path().join("relay/recordings");
    std::fs::create_dir_all(&store).unwrap();
    for name in &records {
        std::fs::copy(dev.dev.dir.join("recordings").join(name), store.join(name)).unwrap();
    }
    for (name, text) in records.iter().zip(&recorded) {
        let played = drive_async(
            &art,
            &[
                "playback",
                "--relay",
                &env.relay.url,
                "--user",
                "alice",
                "--recording",
                name,
                "--expect",
                text,
                "--label",
                text,
            ],
        )
        .await;
        assert!(
            played["terminal"]
                .as_str()
                .is_some_and(|t| t.contains(text.as_str())),
            "{name} did not play {text}: {played}"
        );
        assert_eq!(played["page_errors"], serde_json::json!([]), "{played}");
    }
    dev.dev.stop().await;
}
