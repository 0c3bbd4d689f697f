//! A real IdP in front of the relay: `oidc-provider` (node, pinned in tests/idp/package.json and
//! installed by scripts/install-test-deps.sh) on 127.0.0.1 over HTTPS, issuing RFC 9068 JWT
//! access tokens by the client-credentials grant. The relay discovers its keys through the
//! discovery document, accepts its tokens for the configured audience, refuses them for another,
//! and follows a key rotation with exactly one JWKS fetch.
//!
//! The provider is tests/idp/provider.mjs, run by the shared harness in tests/support/idp.rs: it
//! prints one JSON line per event on stdout (ready, each request it serves, key reloads) and
//! rotates its keys on SIGHUP.

use std::path::Path;

use crate::support::idp::{jwt_parts, rsa_key, Idp, AUDIENCE, CLIENT_ID, OTHER_AUDIENCE, WAIT};
use kube_sim::pki::TestCa;
use kube_sim::record::UserInfo;
use kube_sim::server::{SimAuth, SimConfig, SimHandle, StaticToken};
use rustls::pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RELAY_TOKEN: &str = "relay-own-token-8d2e";

/// A simulated cluster trusting the relay's own token, with impersonation rights.
async fn start_cluster() -> (SimHandle, String) {
    let ca = TestCa::new("kube-sim idp-test cluster CA").unwrap();
    let leaf = ca.issue(&["sim.kube-sim.localhost", "127.0.0.1"]).unwrap();
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
            ..SimConfig::new("sim")
        },
    )
    .await
    .unwrap();
    (sim, ca.cert_pem().to_owned())
}

/// The relay, in process: one `oidc` issuer pointing at `idp` and one impersonating cluster
/// `sim` open to the provider's client.
struct Relay {
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    ca: Vec<CertificateDer<'static>>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Relay {
    async fn start(dir: &Path, idp: &Idp, sim: &SimHandle, sim_ca_pem: &str) -> Self {
        Self::start_with(dir, idp, sim, sim_ca_pem, "").await
    }

    /// `issuer_extra`: more keys of the issuer entry, e.g. `require_nbf: true`.
    async fn start_with(
        dir: &Path,
        idp: &Idp,
        sim: &SimHandle,
        sim_ca_pem: &str,
        issuer_extra: &str,
    ) -> Self {
        kube_relay::install_crypto_provider();
        let ca = TestCa::new("relay test CA").unwrap();
        let leaf = ca.issue(&["localhost", "127.0.0.1"]).unwrap();
        std::fs::write(dir.join("relay.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.join("relay.key"), &leaf.key_pem).unwrap();
        std::fs::write(dir.join("sim-ca.crt"), sim_ca_pem).unwrap();
        std::fs::write(dir.join("relay-token"), RELAY_TOKEN).unwrap();
        let yaml = format!(
            r#"listen: 127.0.0.1:0
public_url: https://localhost
tls: {{cert_file: relay.crt, key_file: relay.key}}
admin: {{listen: 127.0.0.1:0}}
routing: {{host_suffix: relay.test}}
identity:
  issuers:
    - name: idp
      kind: oidc
      issuer: "{issuer}"
      audiences: ["{AUDIENCE}"]
      username_claim: sub
      ca_file: idp-ca.crt
      key_refresh_cooldown: 1s
      {issuer_extra}
clusters:
  - name: sim
    server: "https://sim.kube-sim.localhost:{port}"
    connect: "127.0.0.1:{port}"
    ca_file: sim-ca.crt
    upstream_auth: {{mode: impersonate, token_file: relay-token}}
    access: [{{users: [idp/{CLIENT_ID}]}}]
"#,
            issuer = idp.issuer,
            port = sim.addr.port(),
        );
        let path = dir.join("relay.yaml");
        std::fs::write(&path, yaml).unwrap();
        let cfg = kube_relay::config::load(&path).unwrap();
        let app = kube_relay::server::App::bind(cfg).await.unwrap();
        let addr = app.local_addr().unwrap();
        let admin = app.admin_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(app.run(shutdown.clone()));
        crate::support::wait_ready(admin).await;
        let ca = CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        Self {
            addr,
            admin,
            ca,
            shutdown,
        }
    }

    /// `GET /clusters/sim/api/v1/namespaces/default/pods` with `token`; (status, body).
    async fn list_pods(&self, token: &str) -> (u16, String) {
        let req = format!(
            "GET /clusters/sim/api/v1/namespaces/default/pods HTTP/1.1\r\nHost: localhost\r\n\
             Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        let mut s =
            crate::support::tls_connect(self.addr, &self.ca, "localhost", &[b"http/1.1"]).await;
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("relay answers in time")
            .ok();
        let raw = String::from_utf8_lossy(&buf).into_owned();
        let (code, _, body) = crate::support::parse_response(&raw);
        (code, body)
    }

    /// The admin listener's /metrics text.
    async fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("metrics in time")
            .ok();
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `relay_jwks_refresh_total{issuer="idp",result}`, if the relay has counted any.
fn refreshes(metrics: &str, result: &str) -> Option<u64> {
    let series = format!("relay_jwks_refresh_total{{issuer=\"idp\",result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map(|v| v.trim().parse().unwrap())
}

/// `relay_authn_total{result="failure",reason}`: 0 when never counted.
fn authn_failures(metrics: &str, reason: &str) -> u64 {
    let series = format!("relay_authn_total{{result=\"failure\",reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The last request the cluster saw for the pods list, with the identity it resolved.
fn last_pods_user(sim: &SimHandle) -> UserInfo {
    sim.record
        .matching("/api/v1/namespaces/default/pods")
        .last()
        .expect("the cluster saw the request")
        .user
        .clone()
        .expect("the cluster authenticated the request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_provider_tokens_are_accepted_and_its_key_rotation_followed() {
    let dir = tempfile::tempdir().unwrap();
    let first = rsa_key();
    let mut idp = Idp::start(dir.path(), &[&first], &[]).await;
    let (sim, sim_ca) = start_cluster().await;
    let relay = Relay::start(dir.path(), &idp, &sim, &sim_ca).await;
    idp.sync().await;
    // Readiness means the relay loaded the provider's keys: discovery, then jwks_uri.
    assert!(idp.hits("/.well-known/openid-configuration") >= 1);
    assert!(
        idp.hits("/jwks") >= 1,
        "the relay fetched the JWKS at start"
    );

    // (a) A client-credentials token for the relay's audience reaches the cluster as the client.
    let token = idp.token(AUDIENCE).await;
    let (header, claims) = jwt_parts(&token);
    assert_eq!(header["alg"], "RS256", "{header}");
    assert_eq!(header["kid"], first.0.as_str(), "{header}");
    assert_eq!(claims["iss"], idp.issuer.as_str(), "{claims}");
    assert_eq!(claims["aud"], AUDIENCE, "{claims}");
    assert_eq!(claims["sub"], CLIENT_ID, "{claims}");
    let (code, body) = relay.list_pods(&token).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"web-0\""), "{body}");
    let user = last_pods_user(&sim);
    assert_eq!(user.username, CLIENT_ID, "{user:?}");

    // (b) The same client, the same keys, another audience: refused, and no key fetch for it.
    idp.sync().await;
    let jwks_at_start = idp.hits("/jwks");
    let other = idp.token(OTHER_AUDIENCE).await;
    assert_eq!(jwt_parts(&other).1["aud"], OTHER_AUDIENCE);
    let (code, body) = relay.list_pods(&other).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("\"kind\":\"Status\""), "{body}");
    idp.sync().await;
    assert_eq!(idp.hits("/jwks"), jwks_at_start);
    let metrics = relay.metrics().await;
    assert_eq!(
        authn_failures(&metrics, "claims"),
        1,
        "refused for its aud: {metrics}"
    );

    // (c) Rotation: a new signing key (new kid) first, the old one still published.
    let second = rsa_key();
    assert_ne!(first.0, second.0);
    idp.rotate(&[&second, &first]).await;
    // No wait needed: scheduled fetches do not start the unknown-kid cooldown, only unknown-kid
    // fetches do, and the relay was ready (keys loaded) before the first token.
    let rotated = idp.token(AUDIENCE).await;
    assert_eq!(jwt_parts(&rotated).0["kid"], second.0.as_str());
    idp.sync().await;
    let before = idp.hits("/jwks");
    let refreshes_at_start = refreshes(&relay.metrics().await, "success");
    assert!(refreshes_at_start.is_some_and(|n| n >= 1));
    // Several requests at once with the new kid: all wait on one single-flight fetch.
    let burst = futures_util::future::join_all((0..4).map(|_| relay.list_pods(&rotated))).await;
    for (code, body) in burst {
        assert_eq!(code, 200, "rotated key not followed: {body}");
    }
    assert_eq!(last_pods_user(&sim).username, CLIENT_ID);
    idp.sync().await;
    assert_eq!(idp.hits("/jwks"), before + 1, "exactly one JWKS fetch");
    // Now cached: the new token again, and the old one (its key is still published), fetch nothing.
    for t in [&rotated, &token] {
        let (code, body) = relay.list_pods(t).await;
        assert_eq!(code, 200, "{body}");
    }
    idp.sync().await;
    assert_eq!(idp.hits("/jwks"), before + 1, "cached keys need no fetch");

    // The relay counts the same fetches: one at start-up, one for the new kid.
    let metrics = relay.metrics().await;
    assert_eq!(
        refreshes(&metrics, "success"),
        Some(refreshes_at_start.unwrap() + 1),
        "{metrics}"
    );
    assert_eq!(refreshes(&metrics, "failure"), None, "{metrics}");
    assert_eq!(authn_failures(&metrics, "unknown_key"), 0, "{metrics}");
    sim.shutdown();
}

/// oidc-provider's stock JWT access tokens (RFC 9068) carry no `nbf`. For `kind: oidc` the
/// relay checks `nbf` when present and does not require it, as kube-apiserver's JWT
/// authenticator does (docs/security.md E4), so such a token is admitted; with
/// `require_nbf: true` the same token is refused. provider.mjs adds `nbf` = `iat` unless
/// `--no-nbf`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_oidc_provider_tokens_without_nbf_are_admitted_unless_required() {
    let dir = tempfile::tempdir().unwrap();
    let key = rsa_key();
    let idp = Idp::start(dir.path(), &[&key], &["--no-nbf"]).await;
    let (sim, sim_ca) = start_cluster().await;
    let token = idp.token(AUDIENCE).await;
    let claims = jwt_parts(&token).1;
    assert!(claims.get("nbf").is_none(), "{claims}");
    assert_eq!(claims["aud"], AUDIENCE, "{claims}");

    let relay = Relay::start(dir.path(), &idp, &sim, &sim_ca).await;
    let (code, body) = relay.list_pods(&token).await;
    assert_eq!(code, 200, "a stock token is admitted: {body}");
    assert_eq!(
        sim.record.matching("/api/v1/namespaces/default/pods").len(),
        1
    );
    relay.shutdown.cancel();

    // The first relay has read its files; the second writes its own over them.
    let strict = Relay::start_with(dir.path(), &idp, &sim, &sim_ca, "require_nbf: true").await;
    let (code, body) = strict.list_pods(&token).await;
    assert_eq!(code, 401, "{body}");
    let metrics = strict.metrics().await;
    assert_eq!(
        authn_failures(&metrics, "claims"),
        1,
        "refused for nbf: {metrics}"
    );
    assert_eq!(
        sim.record.matching("/api/v1/namespaces/default/pods").len(),
        1,
        "the refused request did not reach the cluster"
    );
    sim.shutdown();
}
