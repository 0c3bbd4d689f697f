//! Upstream credentials (issue 3 item 4) against loopback stand-ins: Entra's token endpoint
//! (client credentials, on-behalf-of) from kube-sim, and an Entra-shaped issuer for the callers'
//! tokens. Every mode's happy path, caching, refresh, single flight, each Entra failure mode as
//! the Status the user sees, token-file rotation, and no secret in Debug output or errors.
//! Everything listens on 127.0.0.1.

use crate::support::tenant::{
    now, AKS_APP, GROUP_OPS, OID_ALICE, OID_BOB, OTHER_TID, RELAY_APP, TID,
};
use crate::support::yaml::{contoso, RelayYaml};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::StatusCode;
use kube_relay::auth::{Authenticator, Principal};
use kube_relay::config::Config;
use kube_relay::credentials::{CredentialError, UpstreamCredentials};
use kube_sim::issuer::{DevIssuer, IssuerHandle, KeyAlg};
use kube_sim::token_endpoint::{Failure, TokenEndpointConfig, TokenEndpointHandle};
use serde_json::{json, Value};
use tokio::net::TcpListener;

const WI_APP: &str = "e5e5e5e5-0000-0000-0000-000000000005";
const OBO_SECRET: &str = "obo-s3cr3t-value";
const APP_SECRET: &str = "app-s3cr3t-value";

struct World {
    /// The callers' issuer (Entra-shaped, served by `idp`).
    users: DevIssuer,
    idp: IssuerHandle,
    /// Signs projected service-account tokens (federated assertions).
    k8s: DevIssuer,
    te: TokenEndpointHandle,
    te_signer: DevIssuer,
    te_authority: String,
    cfg: Config,
    auth: Authenticator,
    dir: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        self.idp.shutdown();
        self.te.shutdown();
    }
}

/// The payload of a JWT, unverified (the test reads what the endpoint minted).
fn claims_of(header_value: &http::HeaderValue) -> Value {
    let s = header_value.to_str().unwrap();
    let jwt = s.strip_prefix("Bearer ").unwrap();
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

async fn world() -> World {
    kube_relay::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_sim::pki::TestCa::new("credentials test CA").unwrap();
    let leaf = ca.issue(&["127.0.0.1", "localhost"]).unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
    let tls = kube_sim::server::tls_config(&leaf).unwrap();

    // The callers' IdP.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp_authority = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let users = DevIssuer::generate(&format!("{idp_authority}/{TID}/v2.0"), KeyAlg::Rs256).unwrap();
    let idp =
        kube_sim::issuer::serve_entra(l, Some(tls.clone()), &idp_authority, TID, users.clone())
            .await
            .unwrap();

    // The relay's OBO client certificate.
    let obo_cert = kube_sim::token_endpoint::ClientCertificate::generate("kube-relay-obo").unwrap();
    std::fs::write(dir.path().join("obo.crt"), &obo_cert.cert_pem).unwrap();
    std::fs::write(dir.path().join("obo.key"), &obo_cert.key_pem).unwrap();

    // The token endpoint.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let te_authority = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let te_signer =
        DevIssuer::generate(&format!("https://sts.windows.net/{TID}/"), KeyAlg::Rs256).unwrap();
    let k8s = DevIssuer::generate("https://oidc.aks.test/cluster", KeyAlg::Rs256).unwrap();
    let mut tcfg = TokenEndpointConfig::new(TID, te_signer.clone());
    tcfg.assertion_issuers = vec![users.clone(), k8s.clone()];
    tcfg.client_secrets
        .insert(RELAY_APP.into(), OBO_SECRET.into());
    tcfg.client_secrets.insert(WI_APP.into(), APP_SECRET.into());
    tcfg.client_certificates.insert(
        RELAY_APP.into(),
        (obo_cert.x5t_s256.clone(), obo_cert.public_key_pem.clone()),
    );
    let te = kube_sim::token_endpoint::serve(l, Some(tls), tcfg)
        .await
        .unwrap();

    std::fs::write(dir.path().join("relay-token"), "relay-sa-token-1\n").unwrap();
    std::fs::write(dir.path().join("obo-secret"), format!("{OBO_SECRET}\n")).unwrap();
    std::fs::write(dir.path().join("app-secret"), APP_SECRET).unwrap();
    std::fs::write(dir.path().join("wrong-secret"), "not-the-secret").unwrap();
    std::fs::write(dir.path().join("client.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("client.key"), &leaf.key_pem).unwrap();
    let sa = k8s.mint(json!({
        "aud": "api://AzureADTokenExchange",
        "sub": "system:serviceaccount:kube-relay:kube-relay",
        "exp": now() + 3600,
    }));
    std::fs::write(dir.path().join("sa-token"), sa).unwrap();

    let ep = format!("authority_host: '{te_authority}', ca_file: ca.crt");
    let cluster = |name: &str, auth: String| {
        format!(
            "name: {name}\nserver: https://{name}.privatelink.test\nca_file: ca.crt\nupstream_auth: {auth}\naccess:\n  - groups: [{GROUP_OPS}]"
        )
    };
    let clusters = [
        cluster("passthrough", "{mode: passthrough}".into()),
        cluster("cert", "{mode: impersonate, client_cert_file: client.crt, client_key_file: client.key}".into()),
        cluster("file", "{mode: impersonate, token_file: relay-token}".into()),
        cluster("secret", format!("{{mode: impersonate, azure: {{credential: client_secret, client_id: {WI_APP}, tenant_id: {TID}, client_secret_file: app-secret, {ep}}}}}")),
        cluster("wi", format!("{{mode: impersonate, azure: {{credential: workload_identity, client_id: {WI_APP}, tenant_id: {TID}, federated_token_file: sa-token, {ep}}}}}")),
        cluster("obo", format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: obo-secret, {ep}}}")),
        cluster("obo-cert", format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_certificate_file: obo.crt, client_key_file: obo.key, {ep}}}")),
        cluster("obo-fed", format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, federated: {{credential: workload_identity, federated_token_file: sa-token}}, {ep}}}")),
        cluster("obo-other", format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: obo-secret, tenant_id: {OTHER_TID}, {ep}}}")),
        cluster("obo-tenant", format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: obo-secret, tenant_id: {TID}, {ep}}}")),
        cluster("obo-cert-tenant", format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_certificate_file: obo.crt, client_key_file: obo.key, tenant_id: {TID}, {ep}}}")),
        cluster("secret-wrong", format!("{{mode: impersonate, azure: {{credential: client_secret, client_id: {WI_APP}, tenant_id: {TID}, client_secret_file: wrong-secret, {ep}}}}}")),
        cluster("obo-nowhere", format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: obo-secret, authority_host: 'https://127.0.0.1:1', ca_file: ca.crt}}")),
    ];
    std::fs::write(dir.path().join("relay.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("relay.key"), &leaf.key_pem).unwrap();
    let yaml = clusters
        .into_iter()
        .fold(
            RelayYaml::new("https://localhost")
                .top("routing: {host_suffix: relay.test}")
                .issuer(contoso(
                    &idp_authority,
                    "ca.crt",
                    &format!("api://kube-relay, {AKS_APP}"),
                    "required_scopes: [user_impersonation]",
                )),
            RelayYaml::cluster,
        )
        .build();
    let cfg =
        kube_relay::config::parse(&yaml, dir.path()).unwrap_or_else(|e| panic!("config: {e}"));
    let auth =
        Authenticator::new(&cfg.issuers, Arc::new(kube_relay::metrics::Metrics::new())).unwrap();
    World {
        users,
        idp,
        k8s,
        te,
        te_signer,
        te_authority,
        cfg,
        auth,
        dir,
    }
}

impl World {
    fn creds(&self, cluster: &str) -> UpstreamCredentials {
        let c = self
            .cfg
            .clusters
            .iter()
            .find(|c| c.name.to_string() == cluster)
            .unwrap();
        UpstreamCredentials::new(c).unwrap()
    }

    /// A v1 user token for the relay's API, as kubelogin would get it.
    fn user_token(&self, oid: &str) -> String {
        self.users.mint(json!({
            "iss": format!("https://sts.windows.net/{TID}/"), "aud": "api://kube-relay", "tid": TID,
            "oid": oid, "upn": format!("{oid}@contoso.test"), "scp": "user_impersonation",
            "groups": [GROUP_OPS], "ver": "1.0", "iat": now(), "nbf": now(), "exp": now() + 3600,
        }))
    }

    async fn principal(&self, oid: &str) -> Arc<Principal> {
        let token = self.user_token(oid);
        // The first call starts the issuer's key fetch and waits a bounded time for it; on a
        // loaded machine that wait can end first, so retry until the keys are in.
        crate::support::eventually(
            "the token authenticates",
            Duration::from_secs(15),
            || async { self.auth.authenticate(&token).await.map(|(p, _)| p) },
        )
        .await
    }

    fn grants(&self) -> (u64, u64) {
        (
            self.te.client_credentials_grants.load(Ordering::SeqCst),
            self.te.obo_grants.load(Ordering::SeqCst),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_and_client_certificate() {
    let w = world().await;
    let alice = w.principal(OID_ALICE).await;
    let c = w.creds("passthrough");
    assert!(!c.impersonates());
    let v = c.authorization(&alice).await.unwrap().unwrap();
    assert_eq!(
        v.to_str().unwrap(),
        format!("Bearer {}", alice.bearer_token())
    );
    assert!(v.is_sensitive());

    let c = w.creds("cert");
    assert!(c.impersonates());
    assert!(c.authorization(&alice).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_is_reread_after_rotation() {
    let w = world().await;
    let alice = w.principal(OID_ALICE).await;
    let c = w.creds("file");
    assert!(c.impersonates());
    let v = c.authorization(&alice).await.unwrap().unwrap();
    assert_eq!(v, "Bearer relay-sa-token-1");
    assert!(!format!("{c:?}").contains("relay-sa-token"));
    // The kubelet rewrites projected tokens in place (via a symlink swap); either way the
    // content and mtime change.
    std::fs::write(
        w.dir.path().join("relay-token"),
        "relay-sa-token-2-rotated\n",
    )
    .unwrap();
    tokio::time::sleep(kube_relay::credentials::FILE_CHECK_INTERVAL + Duration::from_millis(200))
        .await;
    let v = c.authorization(&alice).await.unwrap().unwrap();
    assert_eq!(v, "Bearer relay-sa-token-2-rotated");
    // An empty file (a rewrite in progress) keeps the last good token.
    std::fs::write(w.dir.path().join("relay-token"), "").unwrap();
    tokio::time::sleep(kube_relay::credentials::FILE_CHECK_INTERVAL + Duration::from_millis(200))
        .await;
    let v = c.authorization(&alice).await.unwrap().unwrap();
    assert_eq!(v, "Bearer relay-sa-token-2-rotated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_client_secret_is_cached_and_refreshed() {
    let w = world().await;
    let alice = w.principal(OID_ALICE).await;
    let c = w.creds("secret");
    assert!(c.impersonates());
    let v = c.authorization(&alice).await.unwrap().unwrap();
    let claims = claims_of(&v);
    assert_eq!(claims["aud"], AKS_APP);
    assert_eq!(claims["iss"], format!("https://sts.windows.net/{TID}/"));
    assert_eq!(claims["idtyp"], "app");
    assert_eq!(claims["appid"], WI_APP);
    assert_eq!(w.te.last_form()["client_secret"], APP_SECRET);
    assert_eq!(w.te.last_form()["scope"], format!("{AKS_APP}/.default"));
    // Cached: the second call sends nothing.
    let again = c.authorization(&alice).await.unwrap().unwrap();
    assert_eq!(again, v);
    assert_eq!(w.grants().0, 1);
    assert_eq!(c.stats().cache_hits, 1);

    // A token due for refresh is still served from the cache while the refresh runs in the
    // background: even with the endpoint hanging, the caller does not wait.
    // 12 s tokens: the refresh is due at 6 s, the cached token usable until 9 s, so the
    // probes below at 6.5 s have 2.5 s of slack however loaded the machine is.
    w.te.set_token_lifetime(Duration::from_secs(12));
    let c = w.creds("secret");
    let first = c.authorization(&alice).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(6500)).await;
    w.te.set_failure(Failure::Hang);
    let hung = w.te.requests.load(Ordering::SeqCst) + 1;
    let started = tokio::time::Instant::now();
    let during = c.authorization(&alice).await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited on a refresh"
    );
    assert_eq!(during, first);
    // The background refresh reached the (hanging) endpoint; only then heal it, so that grant
    // is not counted against the next part.
    crate::support::eventually_true(
        "the hung refresh reaches the endpoint",
        Duration::from_secs(10),
        || w.te.requests.load(Ordering::SeqCst) == hung,
    )
    .await;
    w.te.set_failure(Failure::None);

    // And the refresh replaces the token before it expires, without an extra fetch.
    let c = w.creds("secret");
    let first = c.authorization(&alice).await.unwrap().unwrap();
    let base = w.grants().0;
    tokio::time::sleep(Duration::from_millis(6500)).await;
    assert_eq!(c.authorization(&alice).await.unwrap().unwrap(), first);
    crate::support::eventually_true("the refresh is granted", Duration::from_secs(10), || {
        w.grants().0 == base + 1
    })
    .await;
    // The grant was counted when it arrived; the cache takes the answer a moment later.
    // Tokens minted in the same second can be byte-identical, so the claims tell them apart.
    let first_exp = claims_of(&first)["exp"].as_u64();
    crate::support::eventually(
        "the refreshed token replaces the cached one",
        Duration::from_secs(10),
        || async {
            let after = c.authorization(&alice).await.unwrap().unwrap();
            let exp = claims_of(&after)["exp"].as_u64();
            if exp > first_exp {
                Ok(())
            } else {
                Err(exp)
            }
        },
    )
    .await;
    assert_eq!(
        w.grants().0,
        base + 1,
        "the refreshed token is served from the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_workload_identity_uses_the_projected_token() {
    let w = world().await;
    let alice = w.principal(OID_ALICE).await;
    let c = w.creds("wi");
    let v = c.authorization(&alice).await.unwrap().unwrap();
    assert_eq!(claims_of(&v)["aud"], AKS_APP);
    let form = w.te.last_form();
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], WI_APP);
    assert_eq!(
        form["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert_eq!(
        form["client_assertion"],
        std::fs::read_to_string(w.dir.path().join("sa-token")).unwrap()
    );
    let _ = (&w.k8s, &w.te_signer, &w.te_authority);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obo_exchanges_per_user_and_caches() {
    let w = world().await;
    let alice = w.principal(OID_ALICE).await;
    let bob = w.principal(OID_BOB).await;
    let c = w.creds("obo");
    assert!(!c.impersonates());
    let v = c.authorization(&alice).await.unwrap().unwrap();
    let claims = claims_of(&v);
    assert_eq!(claims["aud"], AKS_APP);
    assert_eq!(claims["oid"], OID_ALICE);
    assert_eq!(claims["tid"], TID);
    assert_eq!(claims["ver"], "1.0");
    assert_eq!(claims["iss"], format!("https://sts.windows.net/{TID}/"));
    let form = w.te.last_form();
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    assert_eq!(form["requested_token_use"], "on_behalf_of");
    assert_eq!(form["assertion"], alice.bearer_token());
    assert_eq!(form["scope"], format!("{AKS_APP}/.default"));
    assert_eq!(form["client_secret"], OBO_SECRET);
    assert_eq!(w.grants().1, 1);

    // Same user (even with a fresh token): cached. Another user: a new exchange.
    let alice2 = w.principal(OID_ALICE).await;
    assert_eq!(c.authorization(&alice2).await.unwrap().unwrap(), v);
    assert_eq!(w.grants().1, 1);
    let vb = c.authorization(&bob).await.unwrap().unwrap();
    assert_eq!(claims_of(&vb)["oid"], OID_BOB);
    assert_eq!(w.grants().1, 2);
    assert_eq!(c.stats().fetches, 2);
    assert_eq!(c.stats().cache_hits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn obo_concurrent_requests_share_one_exchange() {
    let w = world().await;
    let alice = w.principal(OID_ALICE).await;
    let c = Arc::new(w.creds("obo"));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let c = c.clone();
        let alice = alice.clone();
        tasks.push(tokio::spawn(async move { c.authorization(&alice).await }));
    }
    let mut values = Vec::new();
    for t in tasks {
        values.push(t.await.unwrap().unwrap().unwrap());
    }
    assert!(values.windows(2).all(|p| p[0] == p[1]));
    assert_eq!(w.grants().1, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obo_with_certificate_and_federated_assertions() {
    let w = world().await;
    let alice = w.principal(OID_ALICE).await;
    let v = w
        .creds("obo-cert")
        .authorization(&alice)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claims_of(&v)["oid"], OID_ALICE);
    let form = w.te.last_form();
    assert!(!form.contains_key("client_secret"));
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(form["client_assertion"].split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert!(header["x5t#S256"].is_string());

    let v = w
        .creds("obo-fed")
        .authorization(&alice)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claims_of(&v)["oid"], OID_ALICE);
    assert_eq!(
        w.te.last_form()["client_assertion"],
        std::fs::read_to_string(w.dir.path().join("sa-token")).unwrap()
    );
    assert_eq!(w.grants().1, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obo_failures_become_statuses_that_say_what_to_do() {
    let w = world().await;
    let alice = w.principal(OID_ALICE).await;
    let bob = w.principal(OID_BOB).await;
    let c = w.creds("obo");
    // Alice's token is cached before the outage and keeps working through it.
    c.authorization(&alice).await.unwrap().unwrap();

    w.te.set_failure(Failure::ConsentMissing);
    let e = c.authorization(&bob).await.unwrap_err();
    assert!(matches!(e, CredentialError::ConsentRequired(_)), "{e:?}");
    let p = e.into_proxy_error("obo");
    assert_eq!(p.status(), StatusCode::FORBIDDEN);
    let body = status_body(p).await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("administrator must grant admin consent"),
        "{body}"
    );

    w.te.set_failure(Failure::InteractionRequired);
    let p = c
        .authorization(&bob)
        .await
        .unwrap_err()
        .into_proxy_error("obo");
    assert_eq!(p.status(), StatusCode::UNAUTHORIZED);
    let body = status_body(p).await;
    assert!(
        body["message"].as_str().unwrap().contains("sign in again"),
        "{body}"
    );
    assert!(
        !body.to_string().contains("AADSTS50076"),
        "Entra detail stays in the log"
    );

    w.te.set_failure(Failure::ServerError);
    let p = c
        .authorization(&bob)
        .await
        .unwrap_err()
        .into_proxy_error("obo");
    assert_eq!(p.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(status_body(p).await["message"]
        .as_str()
        .unwrap()
        .contains("obo"));
    assert!(
        c.authorization(&alice).await.is_ok(),
        "cached token survives the outage"
    );

    w.te.set_failure(Failure::Hang);
    let started = tokio::time::Instant::now();
    let p = c
        .authorization(&bob)
        .await
        .unwrap_err()
        .into_proxy_error("obo");
    assert_eq!(p.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < kube_relay::credentials::FETCH_TIMEOUT + Duration::from_secs(2));

    w.te.set_failure(Failure::None);
    assert!(c.authorization(&bob).await.is_ok());

    // An unreachable authority is an outage too, and a token from another tenant is refused
    // before anything is sent.
    let p = w
        .creds("obo-nowhere")
        .authorization(&bob)
        .await
        .unwrap_err()
        .into_proxy_error("x");
    assert_eq!(p.status(), StatusCode::SERVICE_UNAVAILABLE);
    let before = w.te.requests.load(Ordering::SeqCst);
    let p = w
        .creds("obo-other")
        .authorization(&bob)
        .await
        .unwrap_err()
        .into_proxy_error("x");
    assert_eq!(p.status(), StatusCode::FORBIDDEN);
    assert_eq!(w.te.requests.load(Ordering::SeqCst), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_outage_is_503_naming_the_cluster() {
    let w = world().await;
    let alice = w.principal(OID_ALICE).await;
    w.te.set_failure(Failure::ServerError);
    let e = w.creds("secret").authorization(&alice).await.unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains(APP_SECRET), "{text}");
    let p = e.into_proxy_error("secret");
    assert_eq!(p.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(status_body(p).await["details"]["name"], "secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_debug_output() {
    let w = world().await;
    let dump = format!("{:?} {:?}", w.cfg.clusters, w.creds("obo"));
    for secret in [OBO_SECRET, APP_SECRET, "relay-sa-token", "PRIVATE KEY"] {
        assert!(!dump.contains(secret), "{secret} in {dump}");
    }
}

async fn status_body(p: kube_relay::error::ProxyError) -> Value {
    use http_body_util::BodyExt;
    let resp = p.into_response();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

/// `kube-relay doctor` acquires a token with every Entra credential mode and shows Entra's own
/// error text when it cannot (issue "Entra at enterprise scale" item 4): Azure client secret
/// and workload identity get a token for the AKS scope; on_behalf_of clusters prove the relay's
/// client (secret or certificate) with a client-credentials grant where a tenant is configured,
/// and say why not where each caller's token names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_acquires_a_token_for_every_entra_credential_mode() {
    let w = world().await;
    let report = kube_relay::cli::doctor::run(
        &w.cfg,
        &kube_relay::cli::doctor::Options {
            timeout: Duration::from_secs(3),
        },
    )
    .await;
    let row = |cluster: &str| {
        report
            .find(&format!("cluster/{cluster}"), "credential")
            .unwrap_or_else(|| panic!("no credential row for {cluster}: {}", report.render()))
            .clone()
    };
    use kube_relay::cli::doctor::Outcome;
    for ok in ["secret", "wi"] {
        let r = row(ok);
        assert_eq!(r.outcome, Outcome::Ok, "{ok}: {}", r.detail);
        assert!(r.detail.contains("token acquired"), "{}", r.detail);
    }
    for ok in ["obo-tenant", "obo-cert-tenant"] {
        let r = row(ok);
        assert_eq!(r.outcome, Outcome::Ok, "{ok}: {}", r.detail);
        assert!(
            r.detail.contains("Entra accepts the relay's client"),
            "{}",
            r.detail
        );
    }
    let r = row("obo");
    assert_eq!(r.outcome, Outcome::Skip, "{}", r.detail);
    assert!(r.detail.contains("no tenant_id"), "{}", r.detail);
    // Entra's own words reach the row (AADSTS code and description), never the secret.
    let r = row("secret-wrong");
    assert_eq!(r.outcome, Outcome::Fail, "{}", r.detail);
    assert!(r.detail.contains("AADSTS7000215"), "{}", r.detail);
    assert!(!r.detail.contains("not-the-secret"), "{}", r.detail);
    let r = row("obo-nowhere");
    assert_eq!(r.outcome, Outcome::Skip, "{}", r.detail);
    assert!(!report.render().contains(APP_SECRET));
    assert!(!report.render().contains(OBO_SECRET));
}
