//! on_behalf_of end to end: kubectl with a token for the relay → the relay exchanges it at
//! (a loopback stand-in for) Entra's token endpoint → the cluster receives an AKS-audience token
//! for the same user and sees the real user (`kubectl auth whoami`), with no impersonation.

use crate::support::tenant::{
    now, token_endpoint, users_authority, AKS_APP, GROUP_OPS as GROUP, OID_ALICE as OID, RELAY_APP,
    TID,
};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::yaml::{contoso, RelayYaml};
use crate::support::*;
use base64::Engine as _;
use kube_sim::server::{JwtIssuer, SimAuth, SimConfig};
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_whoami_through_on_behalf_of_shows_the_real_user() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = crate::support::tenant::test_pki(dir.path(), "obo e2e CA");
    std::fs::write(dir.path().join("obo-secret"), "s3cret").unwrap();

    // The users' tenant (what the relay validates).
    let (authority, users, idp) = users_authority(&tls).await;

    // Entra's token endpoint: exchanges relay-audience tokens for AKS-audience v1 tokens.
    let (te_authority, aks_signer, te) = token_endpoint(&tls, |cfg| {
        cfg.assertion_issuers = vec![users.clone()];
        cfg.client_secrets.insert(RELAY_APP.into(), "s3cret".into());
    })
    .await;

    // The AKS cluster trusts only AKS-audience tokens from the tenant (like guard).
    let sim_ca = kube_sim::pki::TestCa::new("aks CA").unwrap();
    std::fs::write(dir.path().join("aks-ca.crt"), sim_ca.cert_pem()).unwrap();
    let sim = kube_sim::server::start(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        Some(
            kube_sim::server::tls_config(&sim_ca.issue(&["aks.privatelink.test"]).unwrap())
                .unwrap(),
        ),
        SimConfig {
            name: "aks".into(),
            git_version: "v1.31.2".into(),
            auth: SimAuth {
                static_tokens: vec![],
                jwt: vec![JwtIssuer {
                    issuer: format!("https://sts.windows.net/{TID}/"),
                    audiences: vec![AKS_APP.into()],
                    jwks: aks_signer.jwks(),
                }],
            },
        },
    )
    .await
    .unwrap();

    let port = sim.addr.port();
    let yaml = RelayYaml::new("https://localhost")
        .top("admin: {listen: 127.0.0.1:0}")
        .top("routing: {host_suffix: relay.test}")
        .top("audit: {path: audit.jsonl}")
        .issuer(contoso(
            &format!("\"{authority}\""),
            "ca.crt",
            "\"api://kube-relay\"",
            "required_scopes: [user_impersonation]",
        ))
        .cluster(format!(
            "name: aks
server: https://aks.privatelink.test:{port}
connect: 127.0.0.1:{port}
ca_file: aks-ca.crt
upstream_auth: {{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: obo-secret,
                authority_host: \"{te_authority}\", ca_file: ca.crt}}
access:
  - groups: [{GROUP}]"
        ))
        .build();
    let path = dir.path().join("relay.yaml");
    std::fs::write(&path, yaml).unwrap();
    let app = kube_relay::server::App::bind(kube_relay::config::load(&path).unwrap())
        .await
        .unwrap();
    let relay = app.local_addr().unwrap();
    let admin = app.admin_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone()));
    wait_ready(admin).await;

    // The user's token is for the relay (v2, api://kube-relay), as kube-relay token would get.
    let user_token = users.mint(json!({
        "iss": format!("{authority}/{TID}/v2.0"), "aud": "api://kube-relay", "tid": TID, "oid": OID,
        "preferred_username": "alice@contoso.test", "upn": "alice@contoso.test",
        "scp": "user_impersonation", "groups": [GROUP], "ver": "2.0",
        "iat": now(), "nbf": now(), "exp": now() + 3600,
    }));
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        serde_json::to_string(&json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "aks",
            "clusters": [{"name": "aks", "cluster": {
                "server": format!("https://127.0.0.1:{}/clusters/aks", relay.port()),
                "tls-server-name": "aks.relay.test",
                "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca.cert_pem())}}],
            "users": [{"name": "alice", "user": {"token": user_token}}],
            "contexts": [{"name": "aks", "context": {"cluster": "aks", "user": "alice"}}],
        }))
        .unwrap(),
    )
    .unwrap();

    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let k = |args: &[&str]| {
        let mut c = std::process::Command::new(kubectl("1.33"));
        c.arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .env("HOME", &home);
        c
    };
    let out = ok(
        &run(
            k(&["auth", "whoami", "-o", "json"]),
            None,
            Duration::from_secs(60),
        ),
        "whoami via OBO",
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    // The cluster authenticated the user themself (upn), not the relay, not an impersonation.
    assert_eq!(
        v["status"]["userInfo"]["username"], "alice@contoso.test",
        "{out}"
    );
    let r = sim.record.traffic().pop().unwrap();
    assert!(r.header("impersonate-user").is_none());
    let sent = r
        .header("authorization")
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_owned();
    assert_ne!(
        sent, user_token,
        "the user's relay token never reaches the cluster"
    );
    let payload: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sent.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["aud"], AKS_APP);
    assert_eq!(payload["oid"], OID);
    assert_eq!(payload["iss"], format!("https://sts.windows.net/{TID}/"));

    // More requests reuse the exchanged token: one exchange, then cache hits.
    let out = ok(
        &run(
            k(&["get", "pods", "-n", "default"]),
            None,
            Duration::from_secs(60),
        ),
        "get pods via OBO",
    );
    assert!(out.contains("web-0"), "{out}");
    assert_eq!(te.obo_grants.load(Ordering::SeqCst), 1);
    let metrics = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut m = String::new();
        let _ = c.read_to_string(&mut m).await;
        m
    };
    assert!(
        metrics.contains(r#"relay_credential_fetches_total{cluster="aks"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"relay_credential_cache_hits_total{cluster="aks"}"#),
        "{metrics}"
    );

    // Consent missing at Entra: a 403 that says what to do, not a generic failure.
    te.set_failure(kube_sim::token_endpoint::Failure::ConsentMissing);
    let other = users.mint(json!({
        "iss": format!("{authority}/{TID}/v2.0"), "aud": "api://kube-relay", "tid": TID,
        "oid": "b2b2b2b2-0000-0000-0000-000000000002", "scp": "user_impersonation", "groups": [GROUP],
        "iat": now(), "nbf": now(), "exp": now() + 3600,
    }));
    let mut s = tls_connect(
        relay,
        &[rustls_pki_types::pem::PemObject::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()],
        "aks.relay.test",
        &[b"http/1.1"],
    )
    .await;
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(format!("GET /version HTTP/1.1\r\nHost: aks.relay.test\r\nAuthorization: Bearer {other}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
        let (code, _, body) = parse_response(&String::from_utf8_lossy(&buf));
        assert_eq!(code, 403, "{body}");
        assert!(body.to_ascii_lowercase().contains("consent"), "{body}");
    }
    shutdown.cancel();
    sim.shutdown();
    idp.shutdown();
    te.shutdown();
}
