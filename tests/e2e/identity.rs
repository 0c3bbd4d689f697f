//! Identity like Entra shops need it (issue "identity", docs/security.md group B and E rows): v1
//! and
//! v2 tokens each against their own metadata, tenant and scope rules, app-only tokens, group
//! overage, key rollover, IdP outage, refresh amplification, the verified-token cache and the
//! per-source limit on failures. The authority is a loopback stand-in serving Entra's layout.

use crate::support::tenant::{
    now, users_authority, v1_user_claims, AKS_APP, GROUP_OPS, OID_ALICE, OID_BOB, OTHER_TID,
    RELAY_APP, TID,
};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::yaml::{aks_stand_in, contoso, RelayYaml};
use crate::support::*;
use kube_sim::issuer::{DevIssuer, IssuerHandle, KeyAlg};
use kube_sim::server::SimHandle;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MSA_TID: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";
const OID_CI: &str = "c3c3c3c3-0000-0000-0000-000000000003";
const OID_CAROL: &str = "e5e5e5e5-0000-0000-0000-000000000005";
const CI_APP: &str = "d4d4d4d4-0000-0000-0000-000000000004";

struct Entra {
    authority: String,
    issuer: DevIssuer,
    idp: IssuerHandle,
    sim: SimHandle,
    relay: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    audit: std::path::PathBuf,
    ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    _dir: tempfile::TempDir,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for Entra {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.idp.shutdown();
        self.sim.shutdown();
    }
}

async fn entra(issuer_extra: &str, start_idp_failing: bool) -> Entra {
    entra_with(issuer_extra, "", start_idp_failing).await
}

async fn entra_with(issuer_extra: &str, top_extra: &str, start_idp_failing: bool) -> Entra {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = crate::support::tenant::test_pki(dir.path(), "entra test CA");

    let (authority, issuer, idp) = users_authority(&tls).await;
    idp.set_failing(start_idp_failing);

    let sim = crate::support::tenant::aks_stand_in(dir.path()).await;

    let port = sim.addr.port();
    let mut yaml = RelayYaml::new("https://localhost")
        .top("admin: {listen: 127.0.0.1:0}")
        .top("routing: {host_suffix: relay.test}")
        .top("limits: {auth_failures_per_minute: 20}")
        .top("audit: {path: audit.jsonl}");
    if !top_extra.is_empty() {
        yaml = yaml.top(top_extra);
    }
    let yaml = yaml
        .issuer(contoso(
            &authority,
            "ca.crt",
            &format!("api://kube-relay, {AKS_APP}, {RELAY_APP}"),
            &format!(
                "required_scopes: [user_impersonation]\nrequired_roles: [kube-relay.access]\n{}",
                issuer_extra.trim()
            ),
        ))
        .cluster(aks_stand_in(
            port,
            &format!(
                "  - groups: [{GROUP_OPS}]
  - users: [contoso/{OID_BOB}]
    verbs: [get, list, watch]
    namespaces: [default]
  - apps: [{CI_APP}]
    issuer: contoso
  - users: [contoso/{OID_CAROL}]
    allow_impersonation: true"
            ),
        ))
        .build();
    let path = dir.path().join("relay.yaml");
    std::fs::write(&path, yaml).unwrap();
    let cfg = kube_relay::config::load(&path).unwrap();
    let app = kube_relay::server::App::bind(cfg).await.unwrap();
    let relay = app.local_addr().unwrap();
    let admin = app.admin_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone()));
    if !start_idp_failing {
        wait_ready(admin).await;
    }
    let ca = rustls_pki_types::pem::PemObject::pem_slice_iter(ca.cert_pem().as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    Entra {
        authority,
        issuer,
        idp,
        sim,
        relay,
        admin,
        audit: dir.path().join("audit.jsonl"),
        ca,
        _dir: dir,
        shutdown,
    }
}

impl Entra {
    fn v1_user(&self, oid: &str, extra: Value) -> Value {
        let mut c = v1_user_claims(oid);
        merge(&mut c, extra);
        c
    }

    fn v2_user(&self, oid: &str, extra: Value) -> Value {
        let mut c = json!({
            "iss": format!("{}/{TID}/v2.0", self.authority), "aud": RELAY_APP, "tid": TID,
            "oid": oid, "preferred_username": "display-only@contoso.test", "scp": "user_impersonation",
            "ver": "2.0", "azp": "04b07795-8ddb-461a-bbee-02f9e1bf7b46",
            "iat": now(), "nbf": now(), "exp": now() + 3600,
        });
        merge(&mut c, extra);
        c
    }

    fn app_only(&self, extra: Value) -> Value {
        let mut c = json!({
            "iss": format!("https://sts.windows.net/{TID}/"), "aud": "api://kube-relay", "tid": TID,
            "oid": OID_CI, "appid": CI_APP, "appidacr": "2", "idtyp": "app",
            "roles": ["kube-relay.access"], "ver": "1.0",
            "iat": now(), "nbf": now(), "exp": now() + 3600,
        });
        merge(&mut c, extra);
        c
    }

    async fn get(&self, token: &str, path: &str) -> (u16, String, String) {
        bearer_request(self.relay, &self.ca, "aks.relay.test", "GET", path, token).await
    }

    async fn metrics(&self) -> String {
        admin_get(self.admin, "/metrics").await
    }

    async fn readyz(&self) -> (u16, String) {
        let (code, _, body) = parse_response(&admin_get(self.admin, "/readyz").await);
        (code, body)
    }

    /// Sends a raw request to the cluster's host and reads the answer (10 s at most).
    async fn exchange(&self, request: &str) -> String {
        tls_exchange(
            self.relay,
            &self.ca,
            "aks.relay.test",
            request.as_bytes(),
            Duration::from_secs(10),
        )
        .await
    }

    /// The last identity the cluster saw.
    fn last_user(&self) -> (String, Vec<String>, Option<String>) {
        let r = self
            .sim
            .record
            .traffic()
            .pop()
            .expect("a request reached the cluster");
        let groups = r
            .header_values("impersonate-group")
            .iter()
            .map(|s| s.to_string())
            .collect();
        (
            r.header("impersonate-user").unwrap_or_default().to_owned(),
            groups,
            r.header("impersonate-extra-oid").map(str::to_owned),
        )
    }
}

fn merge(base: &mut Value, extra: Value) {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
}

const PODS: &str = "/api/v1/namespaces/default/pods";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_user_tokens_v1_and_v2_map_to_the_right_identity() {
    let e = entra("", false).await;
    // v1 (what the AKS server app receives): upn is the username, oid goes along as extra.
    let t = e
        .issuer
        .mint(e.v1_user(OID_ALICE, json!({"groups": [GROUP_OPS]})));
    let (c, h, b) = e.get(&t, PODS).await;
    assert_eq!(c, 200, "{h}{b}");
    assert_eq!(
        e.last_user(),
        (
            format!("{OID_ALICE}@contoso.test"),
            vec![GROUP_OPS.to_owned()],
            Some(OID_ALICE.to_owned())
        )
    );
    // v2: no upn, so the oid is the username (preferred_username is display only).
    let t = e
        .issuer
        .mint(e.v2_user(OID_ALICE, json!({"groups": [GROUP_OPS]})));
    assert_eq!(e.get(&t, PODS).await.0, 200);
    assert_eq!(e.last_user().0, OID_ALICE);
    // A guest: the upn Entra gives guests is used as is.
    let t = e.issuer.mint(e.v1_user(
        OID_ALICE,
        json!({"groups": [GROUP_OPS], "upn": "alice_fabrikam.test#EXT#@contoso.onmicrosoft.com"}),
    ));
    assert_eq!(e.get(&t, PODS).await.0, 200);
    assert_eq!(
        e.last_user().0,
        "alice_fabrikam.test#EXT#@contoso.onmicrosoft.com"
    );
    // Identity is (issuer, oid): the same upn with another oid is another user (nOAuth, B8).
    let t = e
        .issuer
        .mint(e.v1_user(OID_BOB, json!({"upn": format!("{OID_ALICE}@contoso.test")})));
    let (c, _, _) = e.get(&t, "/api/v1/namespaces/kube-system/pods").await;
    assert_eq!(
        c, 403,
        "bob's rule is namespace-limited, whatever his upn says"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_only_and_managed_identity_tokens_need_a_role() {
    let e = entra("", false).await;
    let t = e.issuer.mint(e.app_only(json!({})));
    assert_eq!(e.get(&t, PODS).await.0, 200);
    assert_eq!(
        e.last_user(),
        (OID_CI.to_owned(), vec![], Some(OID_CI.to_owned()))
    );
    // A managed identity's token: app-only, no idtyp, no scp, no upn.
    let t = e.issuer.mint(e.app_only(json!({"idtyp": null})));
    assert_eq!(e.get(&t, PODS).await.0, 200);
    // Without the required role: refused at authentication.
    for extra in [json!({"roles": ["something.else"]}), json!({"roles": null})] {
        let t = e.issuer.mint(e.app_only(extra));
        assert_eq!(e.get(&t, PODS).await.0, 401);
    }
    // A delegated token without the required scope.
    let t = e.issuer.mint(e.v1_user(
        OID_ALICE,
        json!({"groups": [GROUP_OPS], "scp": "Directory.Read"}),
    ));
    assert_eq!(e.get(&t, PODS).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_mismatched_tenants_are_refused() {
    let e = entra("", false).await;
    let cases = [
        (
            "foreign tenant",
            json!({"iss": format!("https://sts.windows.net/{OTHER_TID}/"), "tid": OTHER_TID}),
        ),
        ("iss tenant X, tid Y", json!({"tid": OTHER_TID})),
        (
            "consumer tenant",
            json!({"iss": format!("https://sts.windows.net/{MSA_TID}/"), "tid": MSA_TID}),
        ),
        ("tid not a GUID", json!({"tid": "contoso.onmicrosoft.com"})),
        ("no tid", json!({"tid": null})),
        (
            "common in iss",
            json!({"iss": "https://sts.windows.net/common/"}),
        ),
        (
            "Graph audience",
            json!({"aud": "00000003-0000-0000-c000-000000000000"}),
        ),
        ("no oid", json!({"oid": null})),
        // Entra always sends `nbf`, so `kind: entra` requires it (docs/security.md E4).
        ("no nbf", json!({"nbf": null})),
    ];
    for (what, extra) in cases {
        let mut claims = e.v1_user(OID_ALICE, json!({"groups": [GROUP_OPS]}));
        merge(&mut claims, extra);
        let t = e.issuer.mint(claims);
        assert_eq!(e.get(&t, PODS).await.0, 401, "{what}");
    }
    // A v2 token claiming the v1 issuer form is checked against v1 metadata and still needs to
    // satisfy every rule; with a v2-only audience the relay accepts it only if configured.
    assert!(
        e.sim.record.traffic().is_empty(),
        "nothing reached the cluster"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_overage_fails_closed_for_group_rules() {
    let e = entra("", false).await;
    let overage = json!({"groups": null, "_claim_names": {"groups": "src1"},
        "_claim_sources": {"src1": {"endpoint": "https://graph.windows.net/x/users/y/getMemberObjects"}}});
    let t = e.issuer.mint(e.v1_user(OID_ALICE, overage.clone()));
    let (c, _, b) = e.get(&t, PODS).await;
    assert_eq!(c, 403, "{b}");
    assert!(b.contains("overage"), "{b}");
    let t = e
        .issuer
        .mint(e.v1_user(OID_ALICE, json!({"groups": null, "hasgroups": true})));
    assert_eq!(e.get(&t, PODS).await.0, 403);
    // A user rule still admits an overage user (bob, read-only in default).
    let mut claims = e.v1_user(OID_BOB, overage);
    merge(&mut claims, json!({}));
    let t = e.issuer.mint(claims);
    assert_eq!(e.get(&t, PODS).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rollover_is_followed_after_one_refresh() {
    let e = entra("      key_refresh_cooldown: 1s", false).await;
    let t = e
        .issuer
        .mint(e.v1_user(OID_ALICE, json!({"groups": [GROUP_OPS]})));
    assert_eq!(e.get(&t, PODS).await.0, 200);
    // Microsoft may roll keys at any moment: a token signed by a new key arrives.
    let before = e.idp.jwks_fetches.load(Ordering::SeqCst);
    e.issuer.rotate(KeyAlg::Rs256).unwrap();
    let t2 = e
        .issuer
        .mint(e.v1_user(OID_ALICE, json!({"groups": [GROUP_OPS]})));
    assert_eq!(e.get(&t2, PODS).await.0, 200);
    assert_eq!(
        e.idp.jwks_fetches.load(Ordering::SeqCst) - before,
        1,
        "exactly one refresh"
    );
    // The old key still verifies while it is published.
    let old = e.get(&t, PODS).await.0;
    assert_eq!(old, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_outage_keeps_cached_keys_and_bounds_unknown_kid_fetches() {
    let e = entra("", false).await;
    let t = e
        .issuer
        .mint(e.v1_user(OID_ALICE, json!({"groups": [GROUP_OPS]})));
    assert_eq!(e.get(&t, PODS).await.0, 200);
    e.idp.set_failing(true);
    // A new token signed by a cached key keeps working, with no IdP call.
    let before =
        e.idp.jwks_fetches.load(Ordering::SeqCst) + e.idp.discovery_fetches.load(Ordering::SeqCst);
    let t2 = e
        .issuer
        .mint(e.v1_user(OID_ALICE, json!({"groups": [GROUP_OPS], "uti": "second"})));
    assert_eq!(e.get(&t2, PODS).await.0, 200);
    // A flood of unknown kids: fast 401s, at most one IdP fetch per cooldown (5 min default).
    let started = tokio::time::Instant::now();
    for i in 0..40 {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        h.kid = Some(format!("random-kid-{i}"));
        let bad = e
            .issuer
            .mint_with_header(h, e.v1_user(OID_ALICE, json!({})))
            .unwrap();
        let (c, _, _) = e.get(&bad, PODS).await;
        assert!(c == 401 || c == 429, "{c}");
    }
    assert!(
        // Each waiting on a fetch would take ~80 s.
        started.elapsed() < Duration::from_secs(40),
        "unknown kids are refused fast"
    );
    let after =
        e.idp.jwks_fetches.load(Ordering::SeqCst) + e.idp.discovery_fetches.load(Ordering::SeqCst);
    assert!(
        after - before <= 1,
        "refreshes under a flood: {}",
        after - before
    );
    // Readiness still reports the keys it has.
    assert_eq!(e.readyz().await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_with_the_idp_down_is_not_ready_until_keys_load() {
    let e = entra("", true).await;
    let (code, body) = e.readyz().await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no usable signing keys"), "{body}");
    e.idp.set_failing(false);
    // The background loader retries with backoff (1 s, 2 s, ...): bounded wait.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if e.readyz().await.0 == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = e
        .issuer
        .mint(e.v1_user(OID_ALICE, json!({"groups": [GROUP_OPS]})));
    assert_eq!(e.get(&t, PODS).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_older_than_max_staleness_are_not_trusted() {
    let e = entra("      max_key_staleness: 2s", false).await;
    let t = e
        .issuer
        .mint(e.v1_user(OID_ALICE, json!({"groups": [GROUP_OPS]})));
    assert_eq!(e.get(&t, PODS).await.0, 200);
    e.idp.set_failing(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        // A fresh token each time (the verified-token cache would answer for a known one).
        let t = e.issuer.mint(e.v1_user(
            OID_ALICE,
            json!({"groups": [GROUP_OPS], "uti": format!("{:?}", tokio::time::Instant::now())}),
        ));
        if e.get(&t, PODS).await.0 == 401 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stale keys still trusted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(e.readyz().await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_tokens_are_cached_and_failures_limited_per_source() {
    let e = entra("", false).await;
    let t = e
        .issuer
        .mint(e.v1_user(OID_ALICE, json!({"groups": [GROUP_OPS]})));
    assert_eq!(e.get(&t, PODS).await.0, 200);
    assert_eq!(e.get(&t, PODS).await.0, 200);
    let m = e.metrics().await;
    assert!(
        m.contains(r#"relay_authn_total{result="success",reason="cached"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"relay_authn_total{result="success",reason="verified"} 1"#),
        "{m}"
    );
    // 20 failures per minute per source (configured), then 429 before any verification.
    let mut codes = Vec::new();
    for i in 0..25 {
        let bad = format!("{}x{i}", &t[..t.len() - 4]);
        codes.push(e.get(&bad, PODS).await.0);
    }
    assert!(codes[..20].iter().all(|c| *c == 401), "{codes:?}");
    assert!(codes[20..].iter().all(|c| *c == 429), "{codes:?}");
    let (c, head, body) = e.get("a.b.c", PODS).await;
    assert_eq!(c, 429);
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    assert!(body.contains("retryAfterSeconds"), "{body}");
    // The already verified user behind the same address keeps working.
    assert_eq!(e.get(&t, PODS).await.0, 200);
}

impl Entra {
    /// Audit records written so far: complete lines only (the writer may be mid-line).
    fn audit_records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).expect("each audit line is JSON"))
            .collect()
    }

    /// Waits (bounded) for a record matching `pred`.
    async fn audit_record(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(r) = self.audit_records().into_iter().find(|r| pred(r)) {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no audit record for {what}:\n{:#?}",
                self.audit_records()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kubeconfig(&self, dir: &std::path::Path, token: &str) -> std::path::PathBuf {
        use base64::Engine as _;
        let ca = std::fs::read_to_string(self._dir.path().join("ca.crt")).unwrap();
        let doc = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "aks",
            "clusters": [{"name": "aks", "cluster": {
                "server": format!("https://127.0.0.1:{}/clusters/aks", self.relay.port()),
                "tls-server-name": "aks.relay.test",
                "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca)}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "aks", "context": {"cluster": "aks", "user": "u", "namespace": "default"}}],
        });
        let p = dir.join("kubeconfig");
        std::fs::write(&p, serde_json::to_string(&doc).unwrap()).unwrap();
        p
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_mirror_kubernetes_events_and_never_hold_tokens() {
    let e = entra("", false).await;
    let t = e.issuer.mint(e.v1_user(
        OID_ALICE,
        json!({"groups": [GROUP_OPS], "uti": "token-id-1"}),
    ));
    let answer = e
        .exchange(&format!(
            "GET {PODS}?limit=500 HTTP/1.1\r\nHost: aks.relay.test\r\nAuthorization: Bearer {t}\r\nAudit-ID: audit-abc-1\r\nUser-Agent: kubectl/v1.33.0 (linux/amd64)\r\nKubectl-Command: kubectl get\r\nX-Forwarded-For: 203.0.113.9\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let r = e
        .audit_record("the list", |r| r["auditID"] == "audit-abc-1")
        .await;
    assert_eq!(r["apiVersion"], "audit.k8s.io/v1");
    assert_eq!(r["kind"], "Event");
    assert_eq!(r["level"], "Metadata");
    assert_eq!(r["stage"], "ResponseComplete");
    assert_eq!(
        r["requestURI"],
        format!("/api/v1/namespaces/default/pods?limit=500")
    );
    assert_eq!(r["verb"], "list");
    assert_eq!(r["user"]["username"], format!("{OID_ALICE}@contoso.test"));
    assert_eq!(r["user"]["uid"], OID_ALICE);
    assert_eq!(r["user"]["groups"], json!([GROUP_OPS]));
    assert_eq!(r["user"]["extra"]["oid"], json!([OID_ALICE]));
    assert_eq!(
        r["user"]["extra"]["kube-relay.io/issuer"],
        json!(["contoso"])
    );
    assert_eq!(r["user"]["extra"]["kube-relay.io/tid"], json!([TID]));
    assert_eq!(
        r["user"]["extra"]["kube-relay.io/app-id"],
        json!(["04b07795-8ddb-461a-bbee-02f9e1bf7b46"])
    );
    assert_eq!(r["sourceIPs"], json!(["203.0.113.9", "127.0.0.1"]));
    assert_eq!(r["userAgent"], "kubectl/v1.33.0 (linux/amd64)");
    assert_eq!(
        r["objectRef"],
        json!({"resource": "pods", "namespace": "default", "apiVersion": null})
            .as_object()
            .map(|o| {
                let mut o = o.clone();
                o.remove("apiVersion");
                Value::Object(o)
            })
            .unwrap()
    );
    assert_eq!(r["responseStatus"]["code"], 200);
    assert_eq!(r["annotations"]["kube-relay.io/cluster"], "aks");
    assert_eq!(r["annotations"]["authorization.k8s.io/decision"], "allow");
    assert_eq!(
        r["annotations"]["kube-relay.io/kubectl-command"],
        "kubectl get"
    );
    assert_eq!(r["annotations"]["kube-relay.io/token-id"], "token-id-1");
    assert!(r["annotations"]["kube-relay.io/latency-ms"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    for ts in ["requestReceivedTimestamp", "stageTimestamp"] {
        assert!(
            r[ts].as_str().unwrap().ends_with('Z') && r[ts].as_str().unwrap().contains('.'),
            "{ts}: {}",
            r[ts]
        );
    }
    // The cluster saw the same audit id, so AKS rows join relay rows.
    assert_eq!(
        e.sim.record.traffic().last().unwrap().header("audit-id"),
        Some("audit-abc-1")
    );

    // A denial carries the decision and its reason; a 401 its failure class.
    let bob = e.issuer.mint(e.v1_user(OID_BOB, json!({})));
    assert_eq!(
        e.get(
            &bob,
            "/api/v1/namespaces/default/pods/web-0/exec?command=sh"
        )
        .await
        .0,
        403
    );
    let r = e
        .audit_record("the denial", |r| r["responseStatus"]["code"] == 403)
        .await;
    assert_eq!(r["annotations"]["authorization.k8s.io/decision"], "forbid");
    assert!(
        r["annotations"]["authorization.k8s.io/reason"]
            .as_str()
            .unwrap()
            .contains("may not create pods/exec"),
        "{r}"
    );
    assert_eq!(r["verb"], "create");
    assert_eq!(r["objectRef"]["subresource"], "exec");
    assert_eq!(e.get("x.y.z", PODS).await.0, 401);
    let r = e
        .audit_record("the 401", |r| r["responseStatus"]["code"] == 401)
        .await;
    assert_eq!(
        r["annotations"]["kube-relay.io/authentication-failure"],
        "malformed"
    );
    assert!(r["user"]["username"]
        .as_str()
        .unwrap_or_default()
        .is_empty());

    let text = std::fs::read_to_string(&e.audit).unwrap();
    for token in [&t, &bob] {
        assert!(
            !text.contains(token.as_str()),
            "a token reached the audit log"
        );
        let signature = token.rsplit('.').next().unwrap();
        assert!(!text.contains(signature));
    }
    assert!(
        !text.contains("relay-sa-token"),
        "the relay's credential reached the audit log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_when_the_token_expires_plus_grace() {
    let e = entra_with("", "timeouts: {token_grace: 1s}", false).await;
    // Valid for 2 more seconds: accepted, then the watch must end about 3 s later.
    let short = |e: &Entra| {
        e.issuer
            .mint(e.v1_user(OID_ALICE, json!({"groups": [GROUP_OPS], "exp": now() + 2})))
    };
    let t = short(&e);
    let mut s = tls_connect(e.relay, &e.ca, "aks.relay.test", &[b"http/1.1"]).await;
    let req = format!("GET {PODS}?watch=true HTTP/1.1\r\nHost: aks.relay.test\r\nAuthorization: Bearer {t}\r\nAudit-ID: watch-1\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let started = tokio::time::Instant::now();
    // The relay ends the watch cleanly (last chunk), as the API server ends a watch.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        let mut tail = Vec::new();
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    if tail.ends_with(b"0\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch outlived its token by far");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed too early: {:?}",
        started.elapsed()
    );
    let r = e
        .audit_record("watch close", |r| {
            r["auditID"] == "watch-1" && r["stage"] == "ResponseComplete"
        })
        .await;
    assert_eq!(
        r["annotations"]["kube-relay.io/close-reason"],
        "token_expired"
    );
    assert_eq!(r["annotations"]["kube-relay.io/protocol"], "watch");
    assert!(e
        .audit_records()
        .iter()
        .any(|r| r["auditID"] == "watch-1" && r["stage"] == "ResponseStarted"));

    // exec with kubectl (WebSocket, 1.33): stdin stays open, the relay ends the session and
    // tells kubectl why on the error channel.
    let tmp = tempfile::tempdir().unwrap();
    let kc = e.kubeconfig(tmp.path(), &short(&e));
    let mut child = std::process::Command::new(kubectl("1.33"))
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["exec", "-i", "web-0", "--", "cat"])
        .env("HOME", tmp.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _stdin = child.stdin.take();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("kubectl exec outlived its token");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        !status.success() && stderr.contains("the token it was opened with expired"),
        "{status:?}: {stderr}"
    );
    let r = e
        .audit_record("exec close", |r| {
            r["objectRef"]["subresource"] == "exec"
                && r["stage"] == "ResponseComplete"
                && r["responseStatus"]["code"] == 101
        })
        .await;
    assert_eq!(
        r["annotations"]["kube-relay.io/close-reason"],
        "token_expired"
    );
    assert_eq!(r["annotations"]["kube-relay.io/protocol"], "websocket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_as_needs_a_rule_and_is_recorded() {
    let e = entra("", false).await;
    let as_admin = |token: &str| {
        format!(
            "POST /apis/authentication.k8s.io/v1/selfsubjectreviews HTTP/1.1\r\nHost: aks.relay.test\r\nAuthorization: Bearer {token}\r\nImpersonate-User: ops-robot\r\nImpersonate-Group: ops\r\nContent-Type: application/json\r\nContent-Length: 67\r\nConnection: close\r\n\r\n{{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"SelfSubjectReview\"}}"
        )
    };
    let send = |raw: String| {
        let e = &e;
        async move { parse_response(&e.exchange(&raw).await) }
    };
    // alice is admitted by a group rule that does not allow impersonation.
    let alice = e
        .issuer
        .mint(e.v1_user(OID_ALICE, json!({"groups": [GROUP_OPS]})));
    let (c, _, b) = send(as_admin(&alice)).await;
    assert_eq!(c, 403, "{b}");
    assert!(b.contains("may not impersonate"), "{b}");
    assert!(e.sim.record.traffic().is_empty());
    // carol's rule allows it: the cluster sees the requested identity.
    let carol = e.issuer.mint(e.v1_user(OID_CAROL, json!({})));
    let (c, _, b) = send(as_admin(&carol)).await;
    assert_eq!(c, 201, "{b}");
    let v: Value = serde_json::from_str(&b[b.find('{').unwrap()..=b.rfind('}').unwrap()]).unwrap();
    assert_eq!(v["status"]["userInfo"]["username"], "ops-robot");
    let r = e.sim.record.traffic().pop().unwrap();
    assert_eq!(r.header_values("impersonate-user"), vec!["ops-robot"]);
    assert_eq!(r.header_values("impersonate-group"), vec!["ops"]);
    assert_eq!(
        r.header_values("authorization"),
        vec!["Bearer relay-sa-token"]
    );
    // The audit log keeps the real caller and the impersonated identity apart.
    let a = e
        .audit_record("impersonated request", |r| {
            r["impersonatedUser"]["username"] == "ops-robot" && r["responseStatus"]["code"] == 201
        })
        .await;
    assert_eq!(a["user"]["username"], format!("{OID_CAROL}@contoso.test"));
    assert_eq!(a["impersonatedUser"]["groups"], json!(["ops"]));
    // The refused attempt is audited too, with who asked for whom.
    let denied = e
        .audit_record("refused impersonation", |r| {
            r["impersonatedUser"]["username"] == "ops-robot" && r["responseStatus"]["code"] == 403
        })
        .await;
    assert_eq!(
        denied["user"]["username"],
        format!("{OID_ALICE}@contoso.test")
    );
}
