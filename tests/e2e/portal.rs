//! The browser portal without a browser or a code-flow identity provider: the landing page and
//! its headers, sessions the test seals itself with the configured cookie key (valid, chunked,
//! tampered, other key, wrong purpose, expired), the sign-out form's CSRF and origin checks, and
//! callbacks that must never create a session. The full sign-in through a real provider is
//! covered by the browser tests.

use crate::support::tenant::now;

use crate::support::{parse_response, CustomRelay, FakeUpstream};
use kube_relay::auth::sso::Attempt;
use kube_relay::config::CookieKey;
use kube_relay::portal::web::session::{
    self, Session, LOGIN_COOKIE, LOGIN_PURPOSE, SESSION_COOKIE, SESSION_PURPOSE,
};

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

struct Portal {
    relay: CustomRelay,
    key: CookieKey,
    _alpha: FakeUpstream,
    _beta: FakeUpstream,
    _dir: tempfile::TempDir,
}

/// A relay with clusters `alpha` and `beta` (dev/alice) and `gamma` (dev/bob, unreachable),
/// and the portal configured with a cookie key this test also holds.
async fn portal() -> Portal {
    portal_with("").await
}

/// [`portal`] with `portal_keys` (more `login.portal` keys, each line indented 4 spaces).
async fn portal_with(portal_keys: &str) -> Portal {
    let alpha = FakeUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
    let beta = FakeUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
    let dir = tempfile::tempdir().unwrap();
    let key_text = "portal-test-cookie-key-0123456789abcdef0123456789";
    std::fs::write(dir.path().join("cookie.key"), format!("{key_text}\n")).unwrap();
    std::fs::write(dir.path().join("secret"), "portal-secret").unwrap();
    std::fs::write(dir.path().join("gamma-ca.crt"), &alpha.ca_pem).unwrap();
    // `start_with` appends right after its cluster list, so the first lines add one more
    // cluster before the top-level `login` section. Paths are absolute: the relay's own
    // directory is private to the harness.
    let d = dir.path().display();
    let extra = format!(
        "  - {{name: gamma, server: \"https://gamma.invalid:443\", connect: \"127.0.0.1:1\", ca_file: {d}/gamma-ca.crt, upstream_auth: {{mode: passthrough}}, access: [{{users: [dev/bob], verbs: [get, list]}}, {{users: [dev/bob], verbs: [create], auth_context: [c1]}}]}}\n\
         login:\n  issuer: dev\n  client_id: kube-relay-cli\n  scopes: [kube-relay]\n  portal:\n    client_id: kube-relay-portal\n    client_secret_file: {d}/secret\n    cookie_key_file: {d}/cookie.key\n    session_lifetime: 30m\n{portal_keys}\
         timeouts: {{health_interval: 300ms}}\n"
    );
    let relay = CustomRelay::start_with(&[("alpha", &alpha), ("beta", &beta)], &extra).await;
    // The relay's documented derivation: SHA-256 of the key file's trimmed contents.
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key_text.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    Portal {
        relay,
        key: CookieKey(key),
        _alpha: alpha,
        _beta: beta,
        _dir: dir,
    }
}

/// One HTTP/1.1 request to the public host; returns (status, head, body).
async fn send(
    relay: &CustomRelay,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    parse_response(&relay.exchange("localhost", req.as_bytes()).await)
}

fn header<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

fn assert_page_headers(head: &str) {
    assert_eq!(header(head, "content-security-policy"), [CSP], "{head}");
    assert_eq!(
        header(head, "x-content-type-options"),
        ["nosniff"],
        "{head}"
    );
    assert_eq!(header(head, "referrer-policy"), ["same-origin"], "{head}");
    assert_eq!(header(head, "cache-control"), ["no-store"], "{head}");
    assert_eq!(
        header(head, "content-type"),
        ["text/html; charset=utf-8"],
        "{head}"
    );
}

/// A sealed session for `token`, as one `Cookie` header value (chunked when large).
fn session_cookie(key: &CookieKey, token: String, expires_at: u64) -> (String, Session) {
    crate::support::portal_session_cookie(key, token, expires_at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_out_landing_page_and_stylesheet() {
    let p = portal().await;
    let (code, head, body) = send(&p.relay, "GET", "/", &[], "").await;
    assert_eq!(code, 200, "{head}\n{body}");
    assert_page_headers(&head);
    assert!(header(&head, "set-cookie").is_empty(), "{head}");
    for needle in [
        "<html lang=\"en\">",
        "<main",
        "<h1>kube-relay</h1>",
        "href=\"/-/login\">Sign in</a>",
        "kube-relay kubeconfig --relay https://localhost",
    ] {
        assert!(body.contains(needle), "{needle} missing:\n{body}");
    }
    assert!(!body.contains("id=\"clusters\""));

    let (code, _, body) = send(&p.relay, "GET", "/?signed_out=1", &[], "").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("You have signed out of kube-relay. You may still be signed in at dev"),
        "{body}"
    );
    // Where a provider's sign-out page sends the browser back to.
    let (code, head, body) = send(&p.relay, "GET", "/-/signed-out", &[], "").await;
    assert_eq!(code, 200, "{head}");
    assert_page_headers(&head);
    assert!(
        body.contains("You have signed out of kube-relay and returned from dev's sign-out page."),
        "{body}"
    );
    assert!(body.contains("href=\"/-/login\">Sign in</a>"), "{body}");
    let (code, head, _) = send(&p.relay, "POST", "/-/signed-out", &[], "").await;
    assert_eq!(code, 405, "{head}");

    let (code, head, body) = send(&p.relay, "GET", "/-/static/portal.css", &[], "").await;
    assert_eq!(code, 200);
    assert_eq!(header(&head, "content-type"), ["text/css; charset=utf-8"]);
    assert_eq!(header(&head, "x-content-type-options"), ["nosniff"]);
    assert!(body.contains(":focus-visible"));

    // State-changing or unknown methods on pages are refused with a page, not a Status.
    let (code, head, body) = send(&p.relay, "GET", "/-/logout", &[], "").await;
    assert_eq!(code, 405, "{head}");
    assert_eq!(header(&head, "allow"), ["POST"]);
    assert!(body.contains("<h1>Method not allowed</h1>"));
    let (code, _, _) = send(&p.relay, "POST", "/", &[], "").await;
    assert_eq!(code, 405);
    // A HEAD probe must not start or finish a sign-in.
    let (code, head, _) = send(&p.relay, "HEAD", "/-/callback?code=a&state=b", &[], "").await;
    assert_eq!(code, 405, "{head}");
    assert!(header(&head, "set-cookie").is_empty());

    // The dev issuer offers no browser sign-in (no authorization endpoint): a clear page.
    let (code, head, body) = send(&p.relay, "GET", "/-/login", &[], "").await;
    assert_eq!(code, 503, "{head}\n{body}");
    assert_page_headers(&head);
    assert!(body.contains("<h1>The sign-in service cannot be reached</h1>"));
    assert!(header(&head, "set-cookie").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_session_lists_only_permitted_clusters() {
    let p = portal().await;
    let (cookie, s) = session_cookie(&p.key, p.relay.token("alice"), now() + 600);
    let (code, head, body) = send(&p.relay, "GET", "/", &[("Cookie", &cookie)], "").await;
    assert_eq!(code, 200, "{head}\n{body}");
    assert_page_headers(&head);
    assert!(body.contains("<dd id=\"username\">alice</dd>"), "{body}");
    assert!(body.contains("id=\"clusters\""));
    assert!(body.contains("data-cluster=\"alpha\""));
    assert!(body.contains("data-cluster=\"beta\""));
    assert!(!body.contains("gamma"), "{body}");
    assert!(body.contains("id=\"download-kubeconfig\" href=\"/-/kubeconfig\""));
    assert!(body.contains("--context alpha get pods"));
    assert!(
        !body.contains("data-step-up"),
        "alice needs no step-up: {body}"
    );
    assert!(body.contains(">Sign out</button>"));
    assert!(body.contains(&format!("name=\"csrf\" value=\"{}\"", s.csrf)));

    // bob: only gamma, read-only, and its health (down once probes fail) is said in words.
    let (cookie, _) = session_cookie(&p.key, p.relay.token("bob"), now() + 600);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let body = loop {
        let (code, _, body) = send(&p.relay, "GET", "/", &[("Cookie", &cookie)], "").await;
        assert_eq!(code, 200);
        if body.contains(">down</span>") || tokio::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(body.contains("data-cluster=\"gamma\""), "{body}");
    assert!(!body.contains("data-cluster=\"alpha\"") && !body.contains("data-cluster=\"beta\""));
    assert!(body.contains(">down</span>"), "{body}");
    assert!(
        body.contains("<code>get</code>, <code>list</code>"),
        "{body}"
    );
    // Creating (exec) on gamma needs a step-up: the page says so and names the context.
    assert!(body.contains("data-step-up=\"c1\""), "{body}");
    assert!(body.contains("--context gamma@c1 exec"), "{body}");

    // carol: signed in, no cluster admits her.
    let (cookie, _) = session_cookie(&p.key, p.relay.token("carol"), now() + 600);
    let (_, _, body) = send(&p.relay, "GET", "/", &[("Cookie", &cookie)], "").await;
    assert!(body.contains("id=\"no-clusters\"") && body.contains("id=\"clusters\""));
    assert!(!body.contains("data-cluster=") && !body.contains("download-kubeconfig"));

    // A large token (many groups) travels in chunks and is reassembled.
    let groups: Vec<String> = (0..120)
        .map(|i| format!("00000000-0000-0000-0000-{i:012}"))
        .collect();
    let big = p
        .relay
        .issuer
        .mint(serde_json::json!({"sub": "alice", "aud": "kube-relay", "groups": groups}));
    let (cookie, _) = session_cookie(&p.key, big, now() + 600);
    assert!(cookie.contains(&format!("{SESSION_COOKIE}-2=")), "{cookie}");
    let (code, _, body) = send(&p.relay, "GET", "/", &[("Cookie", &cookie)], "").await;
    assert_eq!(code, 200);
    assert!(body.contains("data-cluster=\"alpha\""), "{body}");
    assert!(body.contains("<dd id=\"groups\">120</dd>"), "{body}");

    // The session also authenticates the lead's JSON API (web::session_principal).
    let (cookie, _) = session_cookie(&p.key, p.relay.token("alice"), now() + 600);
    let (code, head, body) = send(&p.relay, "GET", "/-/clusters", &[("Cookie", &cookie)], "").await;
    assert_eq!(code, 200, "{head}\n{body}");
    assert!(body.contains("alpha") && !body.contains("gamma"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_sessions_show_the_expired_page_and_are_cleared() {
    let p = portal().await;
    let token = p.relay.token("alice");
    let (good, _) = session_cookie(&p.key, token.clone(), now() + 600);
    let value = good.split_once('=').unwrap().1.to_owned();

    let mut tampered = value.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let (other_key, _) = session_cookie(&CookieKey([9; 32]), token.clone(), now() + 600);
    let json =
        serde_json::to_vec(&Session::new(token.clone(), now(), now() + 600).unwrap()).unwrap();
    let as_login = session::seal(&p.key, LOGIN_PURPOSE, &json).unwrap();
    let (session_over, _) = session_cookie(&p.key, token.clone(), now() - 1);
    let expired_token = p.relay.issuer.mint(serde_json::json!({
        "sub": "alice", "aud": "kube-relay", "iat": now() - 7200, "nbf": now() - 7200, "exp": now() - 3600
    }));
    let (token_over, _) = session_cookie(&p.key, expired_token, now() + 600);
    let (wrong_aud, _) = session_cookie(
        &p.key,
        p.relay
            .issuer
            .mint(serde_json::json!({"sub": "alice", "aud": "someone-else"})),
        now() + 600,
    );

    for (what, cookie) in [
        ("tampered", format!("{SESSION_COOKIE}={tampered}")),
        ("other key", other_key),
        ("login purpose", format!("{SESSION_COOKIE}={as_login}")),
        ("session over", session_over),
        ("token expired", token_over),
        ("token for another audience", wrong_aud),
        ("garbage", format!("{SESSION_COOKIE}=%%%not-base64")),
    ] {
        let (code, head, body) = send(&p.relay, "GET", "/", &[("Cookie", &cookie)], "").await;
        assert_eq!(code, 200, "{what}: {head}");
        assert_page_headers(&head);
        assert!(
            body.contains("<h1>Your session has expired</h1>"),
            "{what}: {body}"
        );
        assert!(!body.contains("id=\"clusters\""), "{what}");
        assert!(body.contains("href=\"/-/login\">Sign in</a>"), "{what}");
        let set = header(&head, "set-cookie");
        assert!(
            set.iter()
                .any(|c| c.starts_with(&format!("{SESSION_COOKIE}=;")) && c.contains("Max-Age=0")),
            "{what}: {head}"
        );
        // Nor does the JSON API take it.
        let (code, _, _) = send(&p.relay, "GET", "/-/clusters", &[("Cookie", &cookie)], "").await;
        assert_eq!(code, 401, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_out_needs_csrf_and_same_origin() {
    let p = portal().await;
    // The relay's public_url origin (the test relay's URL carries its port).
    let origin = format!("https://localhost:{}", p.relay.addr.port());
    let origin = origin.as_str();
    let (cookie, s) = session_cookie(&p.key, p.relay.token("alice"), now() + 600);
    let form = |csrf: &str| format!("csrf={csrf}");
    let ct = ("Content-Type", "application/x-www-form-urlencoded");
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String);
    let cases: [Case; 5] = [
        ("no csrf", vec![("Origin", origin), ct], String::new()),
        ("wrong csrf", vec![("Origin", origin), ct], form("AAAA")),
        (
            "foreign origin",
            vec![("Origin", "https://evil.example"), ct],
            form(&s.csrf),
        ),
        (
            "cross-site fetch",
            vec![("Sec-Fetch-Site", "cross-site"), ct],
            form(&s.csrf),
        ),
        ("no origin at all", vec![ct], form(&s.csrf)),
    ];
    for (what, mut headers, body) in cases {
        headers.push(("Cookie", &cookie));
        let (code, head, page) = send(&p.relay, "POST", "/-/logout", &headers, &body).await;
        assert_eq!(code, 403, "{what}: {head}");
        assert_page_headers(&head);
        assert!(
            page.contains("<h1>Sign-out could not be verified</h1>"),
            "{what}"
        );
        assert!(header(&head, "set-cookie").is_empty(), "{what}: {head}");
    }
    // Still signed in after all of that.
    let (_, _, body) = send(&p.relay, "GET", "/", &[("Cookie", &cookie)], "").await;
    assert!(body.contains("id=\"clusters\""));

    let (code, head, _) = send(
        &p.relay,
        "POST",
        "/-/logout",
        &[("Origin", origin), ct, ("Cookie", &cookie)],
        &form(&s.csrf),
    )
    .await;
    assert_eq!(code, 303, "{head}");
    assert_eq!(header(&head, "location"), ["/?signed_out=1"]);
    let set = header(&head, "set-cookie");
    assert!(
        set.iter()
            .any(|c| c.starts_with(&format!("{SESSION_COOKIE}=;")) && c.contains("Max-Age=0")),
        "{head}"
    );
    assert_eq!(
        set.len(),
        1 + session::MAX_CHUNKS,
        "every chunk is cleared too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_that_must_not_sign_in() {
    let p = portal().await;
    let no_session = |head: &str| {
        header(head, "set-cookie")
            .iter()
            .all(|c| !c.starts_with(&format!("{SESSION_COOKIE}=")) || c.contains("Max-Age=0"))
    };

    // No login cookie: opened in another browser, or long after.
    let (code, head, body) = send(&p.relay, "GET", "/-/callback?code=abc&state=xyz", &[], "").await;
    assert_eq!(code, 400, "{head}");
    assert_page_headers(&head);
    assert!(
        body.contains("<h1>Sign-in link expired or invalid</h1>"),
        "{body}"
    );
    assert!(no_session(&head));

    let attempt = |state: &str, expires_at: u64| {
        let a = Attempt {
            state: state.into(),
            verifier: "v".repeat(43),
            nonce: "n".into(),
            next: "/".into(),
            expires_at,
        };
        let sealed =
            session::seal(&p.key, LOGIN_PURPOSE, &serde_json::to_vec(&a).unwrap()).unwrap();
        format!("{LOGIN_COOKIE}={sealed}")
    };
    let as_session = {
        let a = serde_json::json!({"state": "s1", "verifier": "v", "nonce": "n", "next": "/", "expires_at": now() + 600});
        let sealed =
            session::seal(&p.key, SESSION_PURPOSE, &serde_json::to_vec(&a).unwrap()).unwrap();
        format!("{LOGIN_COOKIE}={sealed}")
    };
    for (what, cookie, target) in [
        (
            "state mismatch",
            attempt("s1", now() + 600),
            "/-/callback?code=abc&state=s2",
        ),
        (
            "no state",
            attempt("s1", now() + 600),
            "/-/callback?code=abc",
        ),
        (
            "no code",
            attempt("s1", now() + 600),
            "/-/callback?state=s1",
        ),
        (
            "attempt expired",
            attempt("s1", now() - 1),
            "/-/callback?code=abc&state=s1",
        ),
        (
            "sealed for another purpose",
            as_session,
            "/-/callback?code=abc&state=s1",
        ),
    ] {
        let (code, head, body) = send(&p.relay, "GET", target, &[("Cookie", &cookie)], "").await;
        assert_eq!(code, 400, "{what}: {head}");
        assert!(
            body.contains("<h1>Sign-in link expired or invalid</h1>"),
            "{what}"
        );
        assert!(no_session(&head), "{what}: {head}");
        assert!(
            header(&head, "set-cookie")
                .iter()
                .any(|c| c.starts_with(&format!("{LOGIN_COOKIE}=;"))),
            "{what}: the attempt is used up"
        );
    }

    // The provider reports a denial: a page saying so, with a way to try again. Free text from
    // the URL is not echoed.
    let (code, head, body) = send(
        &p.relay,
        "GET",
        "/-/callback?error=access_denied&error_description=%3Cb%3Ecall%20us%3C%2Fb%3E&state=s1",
        &[("Cookie", &attempt("s1", now() + 600))],
        "",
    )
    .await;
    assert_eq!(code, 403, "{head}");
    assert_page_headers(&head);
    assert!(body.contains("<h1>Sign-in was denied</h1>"), "{body}");
    assert!(body.contains("access_denied"));
    assert!(!body.contains("call us"), "{body}");
    assert!(body.contains("href=\"/-/login\""));
    assert!(no_session(&head));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_off_explains_the_cli() {
    let up = FakeUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
    let relay = CustomRelay::start(&[("alpha", &up)]).await;
    let (code, head, body) = send(&relay, "GET", "/", &[], "").await;
    assert_eq!(code, 200, "{head}");
    assert_page_headers(&head);
    assert!(body.contains("id=\"portal-off\""), "{body}");
    assert!(body.contains("kube-relay kubeconfig --relay https://localhost"));
    assert!(!body.contains("/-/login"));
    for target in ["/-/login", "/-/callback?code=a&state=b"] {
        let (code, head, body) = send(&relay, "GET", target, &[], "").await;
        assert_eq!(code, 404, "{target}: {head}");
        assert_page_headers(&head);
        assert!(
            body.contains("<h1>Browser sign-in is not enabled</h1>"),
            "{target}"
        );
    }
}

/// `sign_out_at_provider` with a provider the relay cannot use for it (here: no sign-in
/// endpoints at all): sign-out still happens, locally, and the signed-in page's CSP lets forms
/// go nowhere but the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_sign_out_falls_back_to_local_when_the_provider_cannot() {
    let p = portal_with("    sign_out_at_provider: true\n").await;
    let origin = format!("https://localhost:{}", p.relay.addr.port());
    let (cookie, s) = session_cookie(&p.key, p.relay.token("alice"), now() + 600);
    let (code, head, body) = send(&p.relay, "GET", "/", &[("Cookie", &cookie)], "").await;
    assert_eq!(code, 200);
    assert!(body.contains("id=\"clusters\""), "{body}");
    assert_eq!(header(&head, "content-security-policy"), [CSP], "{head}");
    let (code, head, _) = send(
        &p.relay,
        "POST",
        "/-/logout",
        &[
            ("Origin", &origin),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", &cookie),
        ],
        &format!("csrf={}", s.csrf),
    )
    .await;
    assert_eq!(code, 303, "{head}");
    assert_eq!(header(&head, "location"), ["/?signed_out=1"]);
    assert!(
        header(&head, "set-cookie")
            .iter()
            .any(|c| c.starts_with(&format!("{SESSION_COOKIE}=;"))),
        "{head}"
    );
}
