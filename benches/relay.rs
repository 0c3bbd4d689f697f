//! Micro-benchmarks of the request path (issue 6): route resolution, upstream header
//! preparation, token verification (cold: a never-seen token, so a full ES256 signature check;
//! cached: the same token again) and Status rendering.
//!
//! ```text
//! cargo bench -p kube-relay --bench relay
//! ```
//!
//! The relay's configuration and the dev OIDC issuer are real: a `relay.yaml` like the one
//! `kube-relay dev` writes is parsed by the same loader `serve` uses, and the issuer serves its
//! discovery document and JWKS over TLS on 127.0.0.1.
// A test binary has no outside users, so `pub` in its support code means "shared here".
#![allow(unreachable_pub)]
// Test code may use std locks: poisoning there only fails the test that panicked.
#![allow(clippy::disallowed_types)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use kube_relay::auth::Authenticator;
use kube_relay::config::Config;
use kube_relay::error::ProxyError;
use kube_relay::metrics::Metrics;
use kube_relay::proxy::headers;
use kube_relay::route::{self, RouteInput};
use kube_sim::issuer::{DevIssuer, IssuerHandle, KeyAlg};
use kube_sim::pki::TestCa;
use serde_json::json;

const TID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

struct Fixture {
    rt: tokio::runtime::Runtime,
    cfg: Config,
    issuer: DevIssuer,
    _issuer_handle: IssuerHandle,
    /// An Entra-shaped tenant signing with RS256 (what Entra uses), and its token endpoint.
    entra: DevIssuer,
    entra_authority: String,
    _entra_handle: IssuerHandle,
    _token_endpoint: kube_sim::token_endpoint::TokenEndpointHandle,
    auth: Authenticator,
    _dir: tempfile::TempDir,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn mint(issuer: &DevIssuer, jti: u64) -> String {
    let now = now();
    issuer.mint(json!({
        "sub": "alice", "aud": "kube-relay", "name": "alice",
        "groups": ["dev:admins", "team:platform"],
        "iat": now, "nbf": now, "exp": now + 3600, "jti": jti.to_string(),
    }))
}

fn fixture() -> Fixture {
    kube_relay::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("bench CA").expect("ca");
    let leaf = ca
        .issue(&["localhost", "*.relay.localhost", "127.0.0.1"])
        .expect("leaf");
    let cluster_ca = TestCa::new("bench cluster CA").expect("ca");
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).expect("write");
    std::fs::write(dir.path().join("relay.crt"), &leaf.cert_pem).expect("write");
    std::fs::write(dir.path().join("relay.key"), &leaf.key_pem).expect("write");
    std::fs::write(dir.path().join("alpha-ca.crt"), cluster_ca.cert_pem()).expect("write");
    std::fs::write(dir.path().join("relay-token"), "relay-token-0123456789").expect("write");

    let (issuer, handle) = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://127.0.0.1:{}", l.local_addr().expect("addr").port());
        let issuer = DevIssuer::generate(&url, KeyAlg::Es256).expect("issuer");
        let tls = kube_sim::server::tls_config(&leaf).expect("tls");
        let handle = kube_sim::issuer::serve(l, Some(tls), issuer.clone())
            .await
            .expect("serve");
        (issuer, handle)
    });
    let (entra, entra_authority, entra_handle, te) = rt.block_on(async {
        let tls = kube_sim::server::tls_config(&leaf).expect("tls");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let authority = format!("https://127.0.0.1:{}", l.local_addr().expect("addr").port());
        let entra =
            DevIssuer::generate(&format!("{authority}/{TID}/v2.0"), KeyAlg::Rs256).expect("issuer");
        let h = kube_sim::issuer::serve_entra(l, Some(tls.clone()), &authority, TID, entra.clone())
            .await
            .expect("serve");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let signer = DevIssuer::generate(&format!("https://sts.windows.net/{TID}/"), KeyAlg::Rs256)
            .expect("signer");
        let mut tcfg = kube_sim::token_endpoint::TokenEndpointConfig::new(TID, signer);
        tcfg.assertion_issuers = vec![entra.clone()];
        tcfg.client_secrets.insert(
            "0b1c8a2e-7d3f-4e5a-9b6c-1d2e3f4a5b6c".into(),
            "s3cret".into(),
        );
        let te = kube_sim::token_endpoint::serve(l, Some(tls), tcfg)
            .await
            .expect("token endpoint");
        (entra, authority, h, te)
    });
    std::fs::write(dir.path().join("obo-secret"), "s3cret").expect("write");
    let te_authority = format!("https://{}", te.addr);
    let yaml = format!(
        r#"listen: 127.0.0.1:0
public_url: https://localhost:8443
tls: {{cert_file: relay.crt, key_file: relay.key}}
routing: {{host_suffix: relay.localhost, path_prefix: /clusters}}
identity:
  issuers:
    - {{name: dev, kind: oidc, issuer: {}, audiences: [kube-relay], ca_file: ca.crt}}
    - {{name: contoso, kind: entra, tenant_id: {TID}, authority_host: "{entra_authority}", ca_file: ca.crt,
        audiences: [api://kube-relay], required_scopes: [user_impersonation]}}
clusters:
  - name: alpha
    server: https://alpha.kube-sim.localhost:6443
    connect: 127.0.0.1:6443
    ca_file: alpha-ca.crt
    upstream_auth: {{mode: impersonate, token_file: relay-token}}
    access: [{{users: [dev/alice]}}]
  - name: obo
    server: https://obo.kube-sim.localhost:6443
    ca_file: alpha-ca.crt
    upstream_auth: {{mode: on_behalf_of, client_id: 0b1c8a2e-7d3f-4e5a-9b6c-1d2e3f4a5b6c,
                    client_secret_file: obo-secret, authority_host: "{te_authority}", ca_file: ca.crt}}
    access: [{{issuer: contoso}}]
"#,
        issuer.issuer_url()
    );
    let path = dir.path().join("relay.yaml");
    std::fs::write(&path, yaml).expect("write");
    let cfg = kube_relay::config::load(&path).expect("relay.yaml loads");
    let auth = Authenticator::new(&cfg.issuers, Arc::new(Metrics::new())).expect("authenticator");
    for (iss, r) in rt.block_on(auth.load_keys()) {
        r.unwrap_or_else(|e| panic!("keys of {iss}: {e}"));
    }
    Fixture {
        rt,
        cfg,
        issuer,
        _issuer_handle: handle,
        entra,
        entra_authority,
        _entra_handle: entra_handle,
        _token_endpoint: te,
        auth,
        _dir: dir,
    }
}

fn kubectl_headers(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "host",
        HeaderValue::from_static("alpha.relay.localhost:8443"),
    );
    h.insert(
        "user-agent",
        HeaderValue::from_static("kubectl/v1.31.2 (linux/amd64) kubernetes/5864a46"),
    );
    h.insert(
        "accept",
        HeaderValue::from_static(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
        ),
    );
    h.insert("accept-encoding", HeaderValue::from_static("gzip"));
    h.insert("kubectl-command", HeaderValue::from_static("kubectl get"));
    h.insert(
        "kubectl-session",
        HeaderValue::from_static("3b7c1c8a-4c3c-4a7e-9b1e-0f1d2e3c4b5a"),
    );
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    h
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    let target = "/clusters/alpha/api/v1/namespaces/default/pods/web-0?timeout=32s";
    c.bench_function("route/path", |b| {
        b.iter(|| {
            route::resolve(
                &f.cfg.routing,
                &f.cfg.public_host,
                RouteInput {
                    sni: Some("alpha.relay.localhost"),
                    hosts: [None, Some("alpha.relay.localhost:8443")],
                    target: black_box(target),
                },
            )
        })
    });
    c.bench_function("route/sni", |b| {
        b.iter(|| {
            route::resolve(
                &f.cfg.routing,
                &f.cfg.public_host,
                RouteInput {
                    sni: Some("alpha.relay.localhost"),
                    hosts: [Some("alpha.relay.localhost:8443"), None],
                    target: black_box("/api/v1/namespaces/default/pods?watch=1"),
                },
            )
        })
    });

    // Token verification. Cold: every iteration verifies a token never seen before (minted
    // outside the timed loop), so any cache misses; cached: the same token every time.
    let mut jti = 0u64;
    c.bench_function("token/cold", |b| {
        b.iter_custom(|iters| {
            let tokens: Vec<String> = (0..iters)
                .map(|_| {
                    jti += 1;
                    mint(&f.issuer, jti)
                })
                .collect();
            f.rt.block_on(async {
                let t0 = Instant::now();
                for t in &tokens {
                    black_box(f.auth.authenticate(t).await.is_ok());
                }
                t0.elapsed()
            })
        })
    });
    // The same with RS256, the algorithm Entra signs with (v2 user token shape).
    let mut uti = 0u64;
    let entra_claims = |uti: u64| {
        json!({
            "iss": format!("{}/{TID}/v2.0", f.entra_authority), "aud": "api://kube-relay",
            "tid": TID, "oid": "a1a1a1a1-0000-0000-0000-000000000001", "scp": "user_impersonation",
            "groups": ["0f0f0f0f-0000-0000-0000-00000000000f"], "ver": "2.0",
            "iat": now(), "nbf": now(), "exp": now() + 3600, "uti": uti.to_string(),
        })
    };
    c.bench_function("token/cold-rs256", |b| {
        b.iter_custom(|iters| {
            let tokens: Vec<String> = (0..iters)
                .map(|_| {
                    uti += 1;
                    f.entra.mint(entra_claims(uti))
                })
                .collect();
            f.rt.block_on(async {
                let t0 = Instant::now();
                for t in &tokens {
                    black_box(f.auth.authenticate(t).await.is_ok());
                }
                t0.elapsed()
            })
        })
    });

    // An on-behalf-of cache hit: the exchanged token for a user already in the cache.
    let obo_cluster = f
        .cfg
        .clusters
        .iter()
        .find(|c| c.name.as_str() == "obo")
        .expect("obo cluster");
    let creds =
        kube_relay::credentials::UpstreamCredentials::new(obo_cluster).expect("credentials");
    let (obo_user, _) =
        f.rt.block_on(f.auth.authenticate(&f.entra.mint(entra_claims(0))))
            .expect("entra token");
    f.rt.block_on(creds.authorization(&obo_user))
        .expect("first exchange");
    c.bench_function("credentials/obo-cache-hit", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let t0 = Instant::now();
                for _ in 0..iters {
                    black_box(creds.authorization(black_box(&obo_user)).await.is_ok());
                }
                t0.elapsed()
            })
        })
    });

    let token = mint(&f.issuer, u64::MAX);
    c.bench_function("token/cached", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let t0 = Instant::now();
                for _ in 0..iters {
                    black_box(f.auth.authenticate(black_box(&token)).await.is_ok());
                }
                t0.elapsed()
            })
        })
    });

    // Header preparation for an impersonated cluster (strip, credential + identity, forwarding).
    let (principal, _) = f.rt.block_on(f.auth.authenticate(&token)).expect("token");
    let relay_credential = HeaderValue::from_static("Bearer relay-token-0123456789");
    let client = kubectl_headers(&token);
    let audit = HeaderValue::from_static("6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f");
    let peer = HeaderValue::from_static("10.1.2.3");
    c.bench_function("headers/prepare", |b| {
        b.iter(|| {
            let mut up = headers::sanitize_request(black_box(&client));
            let id = headers::own_identity_headers(&principal).expect("identity");
            headers::add_identity(&mut up, Some(relay_credential.clone()), id, None);
            headers::add_forwarding(&mut up, &client, &peer, &audit);
            up
        })
    });
    c.bench_function("headers/audit_id", |b| {
        b.iter(|| headers::audit_id(black_box(&client)))
    });

    c.bench_function("status/403", |b| {
        b.iter(|| {
            ProxyError::Forbidden(black_box(
                "user dev/bob may not delete pods in cluster alpha".to_owned(),
            ))
            .into_response()
        })
    });
}

criterion_group! {
    name = relay;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(relay);
