//! The Entra-shaped tenant the tests share: one tenant, its applications, users and groups (so a
//! token minted in one story means the same in another), and the clock tokens are minted with.

use std::path::Path;
use std::sync::Arc;

use kube_sim::issuer::{DevIssuer, IssuerHandle, KeyAlg};
use kube_sim::pki::TestCa;
use kube_sim::record::UserInfo;
use kube_sim::server::{SimAuth, SimConfig, SimHandle, StaticToken};
use kube_sim::token_endpoint::{TokenEndpointConfig, TokenEndpointHandle};
use tokio::net::TcpListener;

/// The tenant every test token comes from.
pub const TID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The AKS server application: the audience AKS clusters (and the test bed) accept.
pub const AKS_APP: &str = "6dae42f8-4368-4678-94ff-3960e28e3630";
/// The relay's own application (on_behalf_of: the client's token is for it).
pub const RELAY_APP: &str = "0b1c8a2e-7d3f-4e5a-9b6c-1d2e3f4a5b6c";
/// Alice: in [`GROUP_OPS`] (cluster-admin by the test bed's RBAC).
pub const OID_ALICE: &str = "a1a1a1a1-0000-0000-0000-000000000001";
/// Bob: in no group RBAC knows.
pub const OID_BOB: &str = "b2b2b2b2-0000-0000-0000-000000000002";
/// The operators' group (bound to cluster-admin in every test bed cluster).
pub const GROUP_OPS: &str = "0f0f0f0f-0000-0000-0000-00000000000f";
/// Another tenant, whose tokens the relay must refuse.
pub const OTHER_TID: &str = "11111111-2222-3333-4444-555555555555";
/// The relay's own ServiceAccount token at the simulated AKS cluster (impersonate mode).
pub const RELAY_SA_TOKEN: &str = "relay-sa-token";

/// Seconds since the Unix epoch, for `iat`, `nbf` and `exp`.
pub fn now() -> u64 {
    kube_relay::clock::unix_now()
}

/// The claims of an Entra v1 user token for the AKS server app (what `az` hands kubectl for
/// AKS), for the user `oid` of [`TID`], valid for an hour. Tests adjust them per story.
pub fn v1_user_claims(oid: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": format!("https://sts.windows.net/{TID}/"), "aud": AKS_APP, "tid": TID,
        "oid": oid, "upn": format!("{oid}@contoso.test"), "scp": "user_impersonation",
        "ver": "1.0", "appid": "04b07795-8ddb-461a-bbee-02f9e1bf7b46", "appidacr": "0",
        "iat": now(), "nbf": now(), "exp": now() + 3600,
    })
}

/// The tests' own PKI in `dir`: a CA (`ca.crt`) and the relay's serving certificate for
/// `127.0.0.1`, `localhost` and `*.relay.test` (`relay.crt`, `relay.key`). Returns the CA (to
/// trust or issue more) and a TLS config with the same certificate, for the loopback identity
/// provider stand-ins the relay then trusts through `ca.crt`.
pub fn test_pki(dir: &Path, ca_name: &str) -> (TestCa, Arc<rustls::ServerConfig>) {
    kube_relay::install_crypto_provider();
    let ca = TestCa::new(ca_name).unwrap();
    let leaf = ca
        .issue(&["127.0.0.1", "localhost", "*.relay.test"])
        .unwrap();
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("relay.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("relay.key"), &leaf.key_pem).unwrap();
    let tls = kube_sim::server::tls_config(&leaf).unwrap();
    (ca, tls)
}

/// The users' tenant: a loopback authority laid out like Entra's for [`TID`] (kube-sim's
/// `serve_entra`), over `tls`. Returns its URL (what the relay's `authority_host` names), the
/// signer of the users' tokens (issuer `{authority}/{TID}/v2.0`) and the server's handle.
pub async fn users_authority(tls: &Arc<rustls::ServerConfig>) -> (String, DevIssuer, IssuerHandle) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let users = DevIssuer::generate(&format!("{authority}/{TID}/v2.0"), KeyAlg::Rs256).unwrap();
    let idp = kube_sim::issuer::serve_entra(l, Some(tls.clone()), &authority, TID, users.clone())
        .await
        .unwrap();
    (authority, users, idp)
}

/// Entra's token endpoint for [`TID`] on loopback, over `tls`, minting v1 tokens (issuer
/// `https://sts.windows.net/{TID}/`); `configure` registers its clients and assertion issuers.
/// Returns its URL (what a credential's `authority_host` names), the signer of the tokens it
/// mints (what their audience trusts) and the server's handle.
pub async fn token_endpoint(
    tls: &Arc<rustls::ServerConfig>,
    configure: impl FnOnce(&mut TokenEndpointConfig),
) -> (String, DevIssuer, TokenEndpointHandle) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let signer =
        DevIssuer::generate(&format!("https://sts.windows.net/{TID}/"), KeyAlg::Rs256).unwrap();
    let mut cfg = TokenEndpointConfig::new(TID, signer.clone());
    configure(&mut cfg);
    let te = kube_sim::token_endpoint::serve(l, Some(tls.clone()), cfg)
        .await
        .unwrap();
    (authority, signer, te)
}

/// A simulated AKS cluster (`aks.privatelink.test`, on a CA of its own) that accepts the
/// relay's ServiceAccount token and lets it impersonate. Writes `aks-ca.crt` and `relay-token`
/// (the token file the relay reads) into `dir`.
pub async fn aks_stand_in(dir: &Path) -> SimHandle {
    let ca = kube_sim::pki::TestCa::new("aks CA").unwrap();
    let leaf = ca.issue(&["aks.privatelink.test", "127.0.0.1"]).unwrap();
    std::fs::write(dir.join("aks-ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("relay-token"), RELAY_SA_TOKEN).unwrap();
    kube_sim::server::start(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        Some(kube_sim::server::tls_config(&leaf).unwrap()),
        SimConfig {
            name: "aks".into(),
            git_version: "v1.31.2".into(),
            auth: SimAuth {
                static_tokens: vec![StaticToken {
                    token: RELAY_SA_TOKEN.into(),
                    user: UserInfo {
                        username: "system:serviceaccount:kube-system:kube-relay".into(),
                        ..UserInfo::default()
                    },
                    can_impersonate: true,
                }],
                jwt: vec![],
            },
        },
    )
    .await
    .unwrap()
}
