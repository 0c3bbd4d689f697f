//! `kube-relay dev`'s sign-in, against its dev issuer over HTTPS: the authorization server that
//! makes the portal, `kube-relay token` and `kube-relay kubeconfig` work with no external
//! identity provider. Tokens it issues are checked where it matters: through the relay.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;
use base64::Engine as _;
use kube_relay::dev::{CLI_CLIENT_ID, DEV_SCOPE, PORTAL_CLIENT_ID};
use kube_relay::net::idp::IdpHttp;
use serde_json::Value;

/// A client of the dev issuer: HTTPS trusting the dev CA, redirects not followed.
struct Issuer {
    http: IdpHttp,
    url: String,
}

impl Issuer {
    fn of(env: &Env) -> Self {
        Self {
            http: IdpHttp::new(&env.relay_ca()).unwrap(),
            url: env.dev.issuer.issuer_url(),
        }
    }

    async fn get(&self, path_and_query: &str) -> (u16, http::HeaderMap, String) {
        let req = http::Request::get(format!("{}{path_and_query}", self.url))
            .body(Vec::new())
            .unwrap();
        let resp = self.http.send(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        (
            parts.status.as_u16(),
            parts.headers,
            String::from_utf8(body).unwrap(),
        )
    }

    async fn post(
        &self,
        path: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> (u16, http::HeaderMap, String) {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut req = http::Request::post(format!("{}{path}", self.url)).header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        );
        if let Some((id, secret)) = basic {
            let creds = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
            req = req.header(http::header::AUTHORIZATION, format!("Basic {creds}"));
        }
        let resp = self
            .http
            .send(req.body(body.into_bytes()).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        (
            parts.status.as_u16(),
            parts.headers,
            String::from_utf8(body).unwrap(),
        )
    }

    /// POST /token; returns the status and the JSON answer.
    async fn token(&self, form: &[(&str, &str)]) -> (u16, Value) {
        let (status, _, body) = self.post("/token", form, None).await;
        (status, serde_json::from_str(&body).unwrap())
    }

    async fn refresh(&self, refresh_token: &str) -> (u16, Value) {
        self.token(&[
            ("grant_type", "refresh_token"),
            ("client_id", CLI_CLIENT_ID),
            ("refresh_token", refresh_token),
        ])
        .await
    }

    /// Signs `user` in at /authorize for the CLI client with PKCE; returns the redirect's query.
    async fn authorize(&self, user: &str, redirect: &str, challenge: &str) -> Query {
        let (status, headers, body) = self
            .post(
                "/authorize",
                &[
                    ("client_id", CLI_CLIENT_ID),
                    ("redirect_uri", redirect),
                    ("response_type", "code"),
                    ("scope", &format!("{DEV_SCOPE} openid offline_access")),
                    ("state", "state-123"),
                    ("nonce", "nonce-456"),
                    ("code_challenge", challenge),
                    ("code_challenge_method", "S256"),
                    ("user", user),
                ],
                None,
            )
            .await;
        assert_eq!(status, 303, "{body}");
        let location = headers[http::header::LOCATION].to_str().unwrap();
        assert!(location.starts_with(redirect), "{location}");
        query(location)
    }
}

type Query = BTreeMap<String, String>;

fn query(url: &str) -> Query {
    let q = url.split_once('?').map_or("", |(_, q)| q);
    url::form_urlencoded::parse(q.as_bytes())
        .into_owned()
        .collect()
}

fn challenge_of(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// `GET /-/clusters` through the relay with `token`: (status, cluster names, username).
async fn clusters_with(env: &Env, token: &str) -> (u16, Vec<String>, String) {
    let auth = format!("Bearer {token}");
    let (status, _, body) = request(
        env,
        "localhost",
        "GET",
        "/-/clusters",
        &[("Authorization", &auth), ("Accept", "application/json")],
    )
    .await;
    if status != 200 {
        return (status, Vec::new(), body);
    }
    let v: Value = serde_json::from_str(&body).unwrap();
    let names = v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    (
        status,
        names,
        v["user"]["username"].as_str().unwrap().to_owned(),
    )
}

/// A JWT's claims, unverified (the relay verifies access tokens; this only reads an ID token).
fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

const VERIFIER: &str = "a-verifier-of-at-least-forty-three-characters-0123456789";

#[tokio::test]
async fn discovery_and_the_login_section_name_the_authorization_server() {
    let env = dev_env().await;
    let issuer = Issuer::of(&env);
    let (status, _, body) = issuer.get("/.well-known/openid-configuration").await;
    assert_eq!(status, 200);
    let d: Value = serde_json::from_str(&body).unwrap();
    let url = &issuer.url;
    assert_eq!(d["authorization_endpoint"], format!("{url}/authorize"));
    assert_eq!(d["token_endpoint"], format!("{url}/token"));
    assert_eq!(
        d["device_authorization_endpoint"],
        format!("{url}/device/code")
    );
    assert_eq!(
        d["code_challenge_methods_supported"],
        serde_json::json!(["S256"])
    );
    let grants = d["grant_types_supported"].to_string();
    for g in [
        "authorization_code",
        "refresh_token",
        "urn:ietf:params:oauth:grant-type:device_code",
    ] {
        assert!(grants.contains(g), "{grants}");
    }

    // The relay publishes the login section dev mode wrote.
    let (status, _, body) = request(&env, "localhost", "GET", "/-/login-config", &[]).await;
    assert_eq!(status, 200, "{body}");
    let login: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(login["issuer"], url.as_str());
    assert_eq!(login["clientId"], CLI_CLIENT_ID);
    assert_eq!(login["scopes"], serde_json::json!([DEV_SCOPE]));

    // The portal's secrets are private files.
    #[cfg(unix)]
    for f in ["portal-secret", "cookie-key"] {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(env.dev.dir.join(f)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let key = std::fs::read_to_string(env.dev.dir.join("cookie-key")).unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .unwrap()
            .len(),
        48
    );
    env.dev.stop().await;
}

#[tokio::test]
async fn the_authorize_page_offers_the_dev_users_and_refuses_foreign_redirects() {
    let env = dev_env().await;
    let issuer = Issuer::of(&env);
    let challenge = challenge_of(VERIFIER);
    let authorize = |redirect: &str, client: &str| {
        let q = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("client_id", client),
                ("redirect_uri", redirect),
                ("response_type", "code"),
                ("scope", "openid kube-relay"),
                ("state", "xyz"),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ])
            .finish();
        format!("/authorize?{q}")
    };
    let (status, headers, page) = issuer
        .get(&authorize("http://127.0.0.1:38111/callback", CLI_CLIENT_ID))
        .await;
    assert_eq!(status, 200, "{page}");
    assert!(headers[http::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    for user in ["alice", "bob"] {
        assert!(
            page.contains(&format!(
                r#"<button type="submit" name="user" value="{user}">"#
            )),
            "{page}"
        );
    }
    assert!(page.contains(r#"value="cancel""#), "{page}");
    assert!(page.contains(r#"name="state" value="xyz""#), "{page}");

    // The portal's client is registered with the relay's callback only.
    let callback = format!("https://localhost:{}/-/callback", env.dev.relay_addr.port());
    let (status, _, _) = issuer.get(&authorize(&callback, PORTAL_CLIENT_ID)).await;
    assert_eq!(status, 200);
    // What the relay's portal sends at /-/login is accepted as is (its own callback, its scopes).
    let (status, headers, body) = request(&env, "localhost", "GET", "/-/login", &[]).await;
    assert!((300..400).contains(&status), "{status} {body}");
    let location = headers
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .expect("the portal redirects to the issuer");
    let path = location
        .strip_prefix(&issuer.url)
        .unwrap_or_else(|| panic!("{location}"));
    let (status, _, page) = issuer.get(path).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(PORTAL_CLIENT_ID), "{page}");

    for (redirect, client) in [
        ("https://evil.example/callback", CLI_CLIENT_ID),
        ("http://127.0.0.1:38111/callback", PORTAL_CLIENT_ID),
        ("http://127.0.0.1:38111/callback", "someone-else"),
    ] {
        let (status, headers, _) = issuer.get(&authorize(redirect, client)).await;
        assert_eq!(status, 400, "{client} {redirect}");
        assert!(headers.get(http::header::LOCATION).is_none());
    }
    env.dev.stop().await;
}

#[tokio::test]
async fn code_flow_with_pkce_gives_tokens_the_relay_accepts_and_refresh_rotates() {
    let env = dev_env().await;
    let issuer = Issuer::of(&env);
    let redirect = "http://127.0.0.1:38222/callback";
    let challenge = challenge_of(VERIFIER);

    // A wrong verifier is refused (and uses the code up).
    let q = issuer.authorize("alice", redirect, &challenge).await;
    assert_eq!(q["state"], "state-123");
    assert_eq!(q["iss"], issuer.url);
    let wrong = "another-verifier-of-at-least-forty-three-characters-xyz";
    let (status, err) = issuer
        .token(&[
            ("grant_type", "authorization_code"),
            ("client_id", CLI_CLIENT_ID),
            ("code", &q["code"]),
            ("redirect_uri", redirect),
            ("code_verifier", wrong),
        ])
        .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("invalid_grant"))
    );

    // The right verifier: access, ID and refresh tokens.
    let q = issuer.authorize("alice", redirect, &challenge).await;
    let exchange = [
        ("grant_type", "authorization_code"),
        ("client_id", CLI_CLIENT_ID),
        ("code", q["code"].as_str()),
        ("redirect_uri", redirect),
        ("code_verifier", VERIFIER),
    ];
    let (status, tokens) = issuer.token(&exchange).await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    assert!(tokens["expires_in"].as_u64().unwrap() > 600);
    let id = jwt_claims(tokens["id_token"].as_str().unwrap());
    assert_eq!(id["nonce"], "nonce-456");
    assert_eq!(id["aud"], CLI_CLIENT_ID);
    let access = tokens["access_token"].as_str().unwrap();
    let (status, names, user) = clusters_with(&env, access).await;
    assert_eq!(status, 200, "{user}");
    assert_eq!(names, ["alpha", "beta"]);
    assert_eq!(user, "alice");

    // Refresh: a new access token and a new refresh token; the old one is then refused.
    let rt1 = tokens["refresh_token"].as_str().unwrap().to_owned();
    let (status, refreshed) = issuer.refresh(&rt1).await;
    assert_eq!(status, 200, "{refreshed}");
    let rt2 = refreshed["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rt1, rt2);
    let (status, names, _) = clusters_with(&env, refreshed["access_token"].as_str().unwrap()).await;
    assert_eq!((status, names.len()), (200, 2));
    let (status, err) = issuer.refresh(&rt1).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    // Presenting a rotated-out token means it leaked: the session's current token dies too.
    let (_, err) = issuer.refresh(&rt2).await;
    assert_eq!(err["error"], "invalid_grant");

    // The code was good once, and a replay revokes what it produced.
    let q = issuer.authorize("alice", redirect, &challenge).await;
    let exchange = [
        ("grant_type", "authorization_code"),
        ("client_id", CLI_CLIENT_ID),
        ("code", q["code"].as_str()),
        ("redirect_uri", redirect),
        ("code_verifier", VERIFIER),
    ];
    let (status, tokens) = issuer.token(&exchange).await;
    assert_eq!(status, 200, "{tokens}");
    let (status, err) = issuer.token(&exchange).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (_, err) = issuer
        .refresh(tokens["refresh_token"].as_str().unwrap())
        .await;
    assert_eq!(err["error"], "invalid_grant");
    env.dev.stop().await;
}

#[tokio::test]
async fn device_flow_is_pending_until_approved_then_issues_a_token() {
    let env = dev_env().await;
    let issuer = Issuer::of(&env);
    let (status, _, body) = issuer
        .post(
            "/device/code",
            &[
                ("client_id", CLI_CLIENT_ID),
                ("scope", &format!("{DEV_SCOPE} openid offline_access")),
            ],
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let start: Value = serde_json::from_str(&body).unwrap();
    let device_code = start["device_code"].as_str().unwrap();
    let user_code = start["user_code"].as_str().unwrap();
    assert_eq!(user_code.len(), 9, "XXXX-XXXX");
    assert_eq!(start["verification_uri"], format!("{}/device", issuer.url));
    assert!(start["interval"].as_u64().unwrap() >= 1);
    assert!(start["expires_in"].as_u64().unwrap() >= 60);

    let poll = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
        ("client_id", CLI_CLIENT_ID),
        ("device_code", device_code),
    ];
    let span = tokio::time::Instant::now();
    let (status, err) = issuer.token(&poll).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("authorization_pending"))
    );
    // Polling again at once is too fast. The issuer saw the two polls at most `span` apart, so
    // under three quarters of the interval it must say slow_down; a machine too loaded to poll
    // that fast may get either answer.
    let (_, err) = issuer.token(&poll).await;
    let interval = Duration::from_secs(start["interval"].as_u64().unwrap());
    if span.elapsed() < interval * 3 / 4 {
        assert_eq!(err["error"], "slow_down");
    } else {
        assert!(
            ["slow_down", "authorization_pending"].contains(&err["error"].as_str().unwrap_or("")),
            "{err}"
        );
    }

    // The verification page, prefilled from verification_uri_complete.
    let complete = start["verification_uri_complete"].as_str().unwrap();
    let path = complete.strip_prefix(&issuer.url).unwrap();
    let (status, _, page) = issuer.get(path).await;
    assert_eq!(status, 200);
    assert!(page.contains(&format!(r#"value="{user_code}""#)), "{page}");
    assert!(page.contains(r#"value="bob""#), "{page}");
    let (status, _, page) = issuer
        .post(
            "/device",
            &[("user_code", user_code), ("user", "bob")],
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");

    let (status, tokens) = issuer.token(&poll).await;
    assert_eq!(status, 200, "{tokens}");
    assert!(tokens["refresh_token"].is_string());
    let (status, names, user) = clusters_with(&env, tokens["access_token"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{user}");
    assert_eq!((names, user.as_str()), (vec!["beta".to_owned()], "bob"));
    // A device code yields tokens once.
    let (status, err) = issuer.token(&poll).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    env.dev.stop().await;
}

/// What client-go puts in `KUBERNETES_EXEC_INFO` when a person is at the terminal.
const INTERACTIVE: &str = r#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","spec":{"interactive":true}}"#;

/// Runs a `kube-relay token --login devicecode` command as a person would: reads the code it
/// prints on stderr, approves it as `user` at the dev issuer's device page, and returns the
/// command's output (the ExecCredential on stdout).
async fn device_sign_in(issuer: &Issuer, mut cmd: Command, user: &str) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let user_code = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no user code on stderr: {seen:?}"
        );
        match rx.try_recv() {
            Ok(line) => {
                if let Some((_, rest)) = line.split_once("enter the code ") {
                    break rest.trim_end_matches(')').trim().to_owned();
                }
                seen.push(line);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let (status, _, page) = issuer
        .post(
            "/device",
            &[("user_code", &user_code), ("user", user)],
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(out.status.success(), "stderr: {seen:?} {rest:?}");
    out
}

/// `kube-relay token --login devicecode --issuer …`, as a person runs it: it prints the code on
/// stderr, someone approves it at the dev issuer, and an ExecCredential comes out on stdout.
#[tokio::test]
async fn kube_relay_token_signs_in_with_the_device_code_at_the_dev_issuer() {
    let env = dev_env().await;
    let issuer = Issuer::of(&env);
    let ca = env.dev.dir.join("ca.crt");
    let cache = env.tmp.path().join("token-cache");
    let token_cmd = |exec_info: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kube-relay"));
        c.args(["token", "--login", "devicecode", "--issuer", &issuer.url])
            .args(["--client-id", CLI_CLIENT_ID, "--scope", DEV_SCOPE])
            .arg("--ca-file")
            .arg(&ca)
            .arg("--cache-dir")
            .arg(&cache)
            .args(["--timeout", "60s"])
            .env_remove("KUBERNETES_EXEC_INFO")
            .env_remove("KUBE_RELAY_LOGIN")
            .stdin(Stdio::null());
        if let Some(info) = exec_info {
            c.env("KUBERNETES_EXEC_INFO", info);
        }
        c
    };

    // Without a terminal and without client-go saying it may ask, it refuses at once.
    let out = run(token_cmd(None), None, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no terminal"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // client-go says the user is there (interactive): the device flow runs.
    let out = device_sign_in(&issuer, token_cmd(Some(INTERACTIVE)), "alice").await;
    let cred: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cred["kind"], "ExecCredential");
    assert_eq!(cred["apiVersion"], "client.authentication.k8s.io/v1");
    let token = cred["status"]["token"].as_str().unwrap().to_owned();
    let (status, names, user) = clusters_with(&env, &token).await;
    assert_eq!((status, user.as_str()), (200, "alice"));
    assert_eq!(names, ["alpha", "beta"]);

    // Cached now: the same command without a terminal answers from the cache.
    let out = run(token_cmd(None), None, Duration::from_secs(30));
    let cached = ok(&out, "kube-relay token from the cache");
    let cached: Value = serde_json::from_str(&cached).unwrap();
    assert_eq!(cached["status"]["token"], token.as_str());
    env.dev.stop().await;
}

/// Step-up end to end, as carol meets it in `kube-relay dev`: `kube-relay kubeconfig` writes
/// `alpha` and `alpha@c1` (the rules on alpha use authentication context c1 for her); reads
/// work on `alpha`, exec there is refused with the command to run, and the `alpha@c1` user
/// (`kube-relay token --auth-context c1`) signs in with Entra's `claims` request, gets a token
/// with `acrs: ["c1"]` cached apart from the plain one, and exec works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_up_context_from_kube_relay_kubeconfig_lets_carol_exec() {
    let env = dev_env().await;
    let issuer = Issuer::of(&env);
    let ca = env.dev.dir.join("ca.crt");
    let cache = env.tmp.path().join("token-cache");
    let kubeconfig = env.tmp.path().join("carol.kubeconfig");

    // The kubeconfig, listed with a token carol already has (no sign-in needed for that).
    let mut c = Command::new(env!("CARGO_BIN_EXE_kube-relay"));
    c.arg("kubeconfig")
        .args([
            "--relay",
            &format!("https://localhost:{}", env.dev.relay_addr.port()),
        ])
        .args(["--token", &env.dev.token("carol")])
        .args(["--login", "devicecode"])
        .arg("--relay-ca-file")
        .arg(&ca)
        .arg("--idp-ca-file")
        .arg(&ca)
        .arg("--cache-dir")
        .arg(&cache)
        .args(["--exec-command", env!("CARGO_BIN_EXE_kube-relay")])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .env("HOME", env.tmp.path())
        .env_remove("KUBECONFIG");
    ok(
        &run(c, None, Duration::from_secs(60)),
        "kube-relay kubeconfig",
    );
    let doc: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&kubeconfig).unwrap()).unwrap();
    let contexts: Vec<&str> = doc["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(contexts, ["alpha", "alpha@c1"], "{doc}");

    // Each user signs in once, with the device code, as a person would (the exec entries'
    // own command and arguments); afterwards kubectl runs them non-interactively from the cache.
    let mut tokens = BTreeMap::new();
    for user in doc["users"].as_array().unwrap() {
        let exec = &user["user"]["exec"];
        let mut cmd = Command::new(exec["command"].as_str().unwrap());
        cmd.args(
            exec["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap()),
        )
        .env("KUBERNETES_EXEC_INFO", INTERACTIVE)
        .env_remove("KUBE_RELAY_LOGIN")
        .stdin(Stdio::null());
        let out = device_sign_in(&issuer, cmd, "carol").await;
        let cred: Value = serde_json::from_slice(&out.stdout).unwrap();
        let token = cred["status"]["token"].as_str().unwrap().to_owned();
        tokens.insert(user["name"].as_str().unwrap().to_owned(), token);
    }
    let step_up = tokens.iter().find(|(n, _)| n.ends_with("@c1")).unwrap().1;
    let plain = tokens.iter().find(|(n, _)| !n.ends_with("@c1")).unwrap().1;
    assert_eq!(jwt_claims(step_up)["acrs"], serde_json::json!(["c1"]));
    assert!(jwt_claims(plain).get("acrs").is_none());

    let kubectl = |context: &str, args: &[&str]| {
        let mut c = Command::new(kubectl("1.33"));
        c.arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--context", context, "--request-timeout=30s"])
            .args(args)
            .env("HOME", env.tmp.path())
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        c
    };
    let out = ok(
        &run(
            kubectl("alpha", &["get", "pods", "-n", "default"]),
            None,
            Duration::from_secs(60),
        ),
        "carol reads alpha",
    );
    assert!(out.contains("web-0"), "{out}");
    let out = run(
        kubectl(
            "alpha",
            &["exec", "-n", "default", "web-0", "--", "echo", "hi"],
        ),
        None,
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("requires a step-up sign-in (authentication context c1)")
            && stderr.contains("alpha@c1"),
        "{stderr}"
    );
    let out = ok(
        &run(
            kubectl(
                "alpha@c1",
                &["exec", "-n", "default", "web-0", "--", "echo", "stepped-up"],
            ),
            None,
            Duration::from_secs(60),
        ),
        "carol execs on the step-up context",
    );
    assert_eq!(out.trim(), "stepped-up");

    env.dev.stop().await;
}
