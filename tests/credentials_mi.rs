//! Managed identity credentials against a loopback identity endpoint.
//!
//! azure_identity finds the managed identity endpoint only through the process environment
//! (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`, as App Service, Container Apps and Arc set them;
//! else IMDS at 169.254.169.254). So this is its own test binary with ONE test that sets those
//! variables before anything reads them: no other test shares the process environment.
// A test binary has no outside users, so `pub` in its support code means "shared here".
#![allow(unreachable_pub)]
// Test code may use std locks: poisoning there only fails the test that panicked.
#![allow(clippy::disallowed_types)]

// Shared with the end-to-end binary (tests/e2e), which uses all of it; this one does not.
#[allow(dead_code)]
mod support;

use support::yaml::{contoso, RelayYaml};

use std::sync::atomic::Ordering;
use support::tenant::{now, AKS_APP, GROUP_OPS, OID_ALICE, RELAY_APP, TID};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use kube_sim::issuer::{DevIssuer, KeyAlg};
use kube_sim::token_endpoint::TokenEndpointConfig;
use serde_json::{json, Value};
use tokio::net::TcpListener;

const MI_CLIENT: &str = "f6f6f6f6-0000-0000-0000-000000000006";

fn claims_of(v: &http::HeaderValue) -> Value {
    let jwt = v.to_str().unwrap().strip_prefix("Bearer ").unwrap();
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_identity_for_impersonation_and_as_obo_federated_assertion() {
    kube_relay::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_sim::pki::TestCa::new("mi test CA").unwrap();
    let leaf = ca.issue(&["127.0.0.1"]).unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("relay.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("relay.key"), &leaf.key_pem).unwrap();
    let tls = kube_sim::server::tls_config(&leaf).unwrap();

    // The identity endpoint: plain HTTP on loopback, like the real ones.
    let mi_signer =
        DevIssuer::generate(&format!("https://sts.windows.net/{TID}/"), KeyAlg::Rs256).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mi_port = l.local_addr().unwrap().port();
    let mi_cfg = TokenEndpointConfig::new(TID, mi_signer.clone());
    let identity_header = mi_cfg.identity_header.clone();
    let mi = kube_sim::token_endpoint::serve(l, None, mi_cfg)
        .await
        .unwrap();
    // Set before any credential is built, and the only test in this binary (see module docs):
    // azure_identity's managed identity reads its endpoint from the environment only.
    #[allow(clippy::disallowed_methods)]
    std::env::set_var(
        "IDENTITY_ENDPOINT",
        format!("http://127.0.0.1:{mi_port}/msi/token"),
    );
    #[allow(clippy::disallowed_methods)]
    std::env::set_var("IDENTITY_HEADER", &identity_header);

    // The callers' IdP and the OBO token endpoint, which trusts the MI's tokens as federated
    // assertions.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp_authority = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let users = DevIssuer::generate(&format!("{idp_authority}/{TID}/v2.0"), KeyAlg::Rs256).unwrap();
    let idp =
        kube_sim::issuer::serve_entra(l, Some(tls.clone()), &idp_authority, TID, users.clone())
            .await
            .unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let te_authority = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let mut te_cfg = TokenEndpointConfig::new(TID, users.clone());
    te_cfg.assertion_issuers = vec![users.clone(), mi_signer.clone()];
    let te = kube_sim::token_endpoint::serve(l, Some(tls), te_cfg)
        .await
        .unwrap();

    let yaml = RelayYaml::new("https://localhost")
        .top("routing: {host_suffix: relay.test}")
        .issuer(contoso(
            &idp_authority,
            "ca.crt",
            "api://kube-relay",
            "required_scopes: [user_impersonation]",
        ))
        .cluster(format!(
            "name: mi
server: https://mi.privatelink.test
ca_file: ca.crt
upstream_auth: {{mode: impersonate, azure: {{credential: managed_identity, client_id: {MI_CLIENT}}}}}
access: [{{groups: [{GROUP_OPS}]}}]"
        ))
        .cluster(format!(
            "name: obo-mi
server: https://obo.privatelink.test
ca_file: ca.crt
upstream_auth: {{mode: on_behalf_of, client_id: {RELAY_APP}, federated: {{credential: managed_identity, client_id: {MI_CLIENT}}}, authority_host: '{te_authority}', ca_file: ca.crt}}
access: [{{groups: [{GROUP_OPS}]}}]"
        ))
        .build();
    let cfg = kube_relay::config::parse(&yaml, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let auth = kube_relay::auth::Authenticator::new(
        &cfg.issuers,
        std::sync::Arc::new(kube_relay::metrics::Metrics::new()),
    )
    .unwrap();
    let token = users.mint(json!({
        "iss": format!("https://sts.windows.net/{TID}/"), "aud": "api://kube-relay", "tid": TID,
        "oid": OID_ALICE, "upn": "alice@contoso.test", "scp": "user_impersonation",
        "groups": [GROUP_OPS], "ver": "1.0", "iat": now(), "nbf": now(), "exp": now() + 3600,
    }));
    // The first call starts the key fetch and waits a bounded time for it; on a loaded machine
    // that wait can end first, so retry until the keys are in.
    let alice = support::eventually(
        "the token authenticates",
        std::time::Duration::from_secs(15),
        || async { auth.authenticate(&token).await.map(|(p, _)| p) },
    )
    .await;

    // Impersonation with the managed identity: an AKS-audience app token, then cached.
    let c = kube_relay::credentials::UpstreamCredentials::new(&cfg.clusters[0]).unwrap();
    assert!(c.impersonates());
    let v = c.authorization(&alice).await.unwrap().unwrap();
    let claims = claims_of(&v);
    assert_eq!(claims["aud"], AKS_APP);
    assert_eq!(claims["appid"], MI_CLIENT);
    assert_eq!(claims["idtyp"], "app");
    assert_eq!(c.authorization(&alice).await.unwrap().unwrap(), v);
    assert_eq!(mi.managed_identity_grants.load(Ordering::SeqCst), 1);

    // OBO whose client assertion is the managed identity's token for api://AzureADTokenExchange.
    let c = kube_relay::credentials::UpstreamCredentials::new(&cfg.clusters[1]).unwrap();
    let v = c.authorization(&alice).await.unwrap().unwrap();
    assert_eq!(claims_of(&v)["oid"], OID_ALICE);
    assert_eq!(claims_of(&v)["aud"], AKS_APP);
    let form = te.last_form();
    let assertion = form["client_assertion"].clone();
    let payload: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(assertion.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["aud"], "api://AzureADTokenExchange");
    assert_eq!(te.obo_grants.load(Ordering::SeqCst), 1);
    assert_eq!(mi.managed_identity_grants.load(Ordering::SeqCst), 2);

    idp.shutdown();
    te.shutdown();
    mi.shutdown();
}
