//! Entra at enterprise scale (docs/architecture.md "Identity and upstream credentials",
//! docs/security.md E7, E9, B10): group overage resolved through Microsoft Graph, access by app
//! role, and step-up by Conditional Access authentication context, with kubectl and with raw
//! requests, against loopback stand-ins shaped like Entra (kube-sim's token endpoint, for the
//! relay's own Graph token) and Graph (kube-sim's `graph`, `checkMemberGroups`).
//!
//! The cluster `aks` (kube-sim, impersonate mode) has these rules:
//! - `ops` (GROUP_OPS) may read; with authentication context `c1` they may do everything;
//! - 24 more groups that admit nothing the tests use, so Graph is asked about 25 ids: two calls;
//! - the app role `kube-relay.prod-admin` may get and list;
//! - bob may read (a user rule: works whatever Graph does).

use crate::support::tenant::{
    token_endpoint, users_authority, v1_user_claims, AKS_APP, GROUP_OPS, OID_ALICE, OID_BOB, TID,
};
use std::time::Duration;

use crate::support::yaml::{aks_stand_in, contoso, RelayYaml};
use crate::support::*;
use base64::Engine as _;
use kube_sim::graph::{GraphConfig, GraphFailure, GraphHandle};
use kube_sim::issuer::{DevIssuer, IssuerHandle};
use kube_sim::server::SimHandle;
use kube_sim::token_endpoint::TokenEndpointHandle;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// The relay's app registration for Graph (client credentials).
const GRAPH_APP: &str = "a7a7a7a7-0000-0000-0000-000000000007";
const GRAPH_SECRET: &str = "graph-s3cret-value";
const OID_CAROL: &str = "c4c4c4c4-0000-0000-0000-000000000004";
const OID_DAVE: &str = "d5d5d5d5-0000-0000-0000-000000000005";
const OID_ERIN: &str = "e6e6e6e6-0000-0000-0000-000000000006";
const OID_FRANK: &str = "a8a8a8a8-0000-0000-0000-000000000008";
/// A CI service principal (app-only tokens).
const OID_CI_SP: &str = "f7f7f7f7-0000-0000-0000-000000000007";
const CI_APP: &str = "f8f8f8f8-0000-0000-0000-000000000008";
const PODS: &str = "/api/v1/namespaces/default/pods";
const EXEC: &str = "/api/v1/namespaces/default/pods/web-0/exec?command=echo&command=hi&stdout=true";

fn filler_groups() -> Vec<String> {
    (1..=24)
        .map(|i| format!("9a9a9a9a-0000-0000-0000-{i:012}"))
        .collect()
}

struct World {
    users: DevIssuer,
    idp: IssuerHandle,
    te: TokenEndpointHandle,
    graph: GraphHandle,
    sim: SimHandle,
    relay: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    ca_pem: String,
    dir: tempfile::TempDir,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for World {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.idp.shutdown();
        self.te.shutdown();
        self.graph.shutdown();
        self.sim.shutdown();
    }
}

/// `overage_extra`: more keys of `group_overage` (e.g. `cache_ttl: 2s`).
async fn world(overage_extra: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = crate::support::tenant::test_pki(dir.path(), "overage test CA");

    let (authority, users, idp) = users_authority(&tls).await;

    // Entra's token endpoint, for the relay's own Graph token (client credentials).
    let (te_authority, te_signer, te) = token_endpoint(&tls, |cfg| {
        cfg.client_secrets
            .insert(GRAPH_APP.into(), GRAPH_SECRET.into());
    })
    .await;

    // Graph, trusting tokens from that endpoint. The relay asks for `<graph_host>/.default`, so
    // the stand-in's resource (the tokens' audience) is its own URL, as Graph's is
    // https://graph.microsoft.com.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let graph_host = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let mut gcfg = GraphConfig::new(TID, te_signer);
    gcfg.audience = graph_host.clone();
    let graph = kube_sim::graph::serve(l, Some(tls), gcfg).await.unwrap();

    let sim = crate::support::tenant::aks_stand_in(dir.path()).await;
    std::fs::write(dir.path().join("graph-secret"), GRAPH_SECRET).unwrap();
    let fillers = filler_groups().join(", ");
    let yaml = RelayYaml::new("https://localhost")
        .top("admin: {listen: 127.0.0.1:0}")
        .top("routing: {host_suffix: relay.test}")
        .top("audit: {path: audit.jsonl}")
        .issuer(contoso(
            &authority,
            "ca.crt",
            &format!("api://kube-relay, {AKS_APP}"),
            &format!(
                "group_overage:
  resolve: graph
  credential: {{azure: {{credential: client_secret, client_id: {GRAPH_APP}, tenant_id: {TID},
                client_secret_file: graph-secret, authority_host: '{te_authority}', ca_file: ca.crt}}}}
  graph_host: '{graph_host}'
  ca_file: ca.crt
  timeout: 2s
  {overage_extra}"
            ),
        ))
        .cluster(aks_stand_in(
            sim.addr.port(),
            &format!(
                "  - groups: [{GROUP_OPS}]
    verbs: [get, list, watch]
  - groups: [{GROUP_OPS}]
    auth_context: [c1]
  - groups: [{fillers}]
    verbs: [deletecollection]
    namespaces: [nowhere]
  - roles: [kube-relay.prod-admin]
    verbs: [get, list]
  - users: [contoso/{OID_BOB}]
    verbs: [get, list, watch]"
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
    wait_ready(admin).await;
    let ca_pem = ca.cert_pem();
    let ca = rustls_pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    World {
        users,
        idp,
        te,
        graph,
        sim,
        relay,
        admin,
        ca,
        ca_pem: ca_pem.to_owned(),
        dir,
        shutdown,
    }
}

impl World {
    /// An Entra v1 user token for the AKS audience; `extra` overrides claims (null removes).
    fn user_token(&self, oid: &str, extra: Value) -> String {
        let mut c = v1_user_claims(oid);
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        self.users.mint(c)
    }

    /// A token whose groups did not fit: `_claim_names` points at a URL the relay must never
    /// fetch (a foreign host).
    fn overage_token(&self, oid: &str) -> String {
        self.user_token(
            oid,
            json!({"_claim_names": {"groups": "src1"},
                   "_claim_sources": {"src1": {"endpoint": "https://evil.example/users/x/getMemberObjects"}}}),
        )
    }

    async fn request(&self, method: &str, token: &str, path: &str) -> (u16, String, String) {
        bearer_request(self.relay, &self.ca, "aks.relay.test", method, path, token).await
    }

    async fn get(&self, token: &str, path: &str) -> (u16, String, String) {
        self.request("GET", token, path).await
    }

    /// Waits (15 s at most) until listing pods with `token` answers `status` with `body_has`
    /// in the body.
    async fn until_pods_answer(&self, what: &str, token: &str, status: u16, body_has: &str) {
        eventually(what, Duration::from_secs(15), || async {
            match self.get(token, PODS).await {
                (c, _, b) if c == status && b.contains(body_has) => Ok(()),
                (c, _, b) => Err(format!("{c} {b}")),
            }
        })
        .await;
    }

    /// A GET on the relay's public host (its own pages and APIs).
    async fn public_get(&self, token: &str, path: &str) -> (u16, String, String) {
        bearer_request(self.relay, &self.ca, "localhost", "GET", path, token).await
    }

    async fn metrics(&self) -> String {
        admin_get(self.admin, "/metrics").await
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// A kubeconfig with one context `aks` using `token`.
    fn kubeconfig(&self, name: &str, token: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(
            &path,
            serde_json::to_string(&json!({
                "apiVersion": "v1", "kind": "Config", "current-context": "aks",
                "clusters": [{"name": "aks", "cluster": {
                    "server": format!("https://127.0.0.1:{}/clusters/aks", self.relay.port()),
                    "tls-server-name": "aks.relay.test",
                    "certificate-authority-data":
                        base64::engine::general_purpose::STANDARD.encode(&self.ca_pem)}}],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "aks", "context": {"cluster": "aks", "user": "u"}}],
            }))
            .unwrap(),
        )
        .unwrap();
        path
    }

    fn kubectl(
        &self,
        version: &str,
        kubeconfig: &std::path::Path,
        args: &[&str],
    ) -> std::process::Command {
        let home = self.dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let mut c = std::process::Command::new(kubectl(version));
        c.arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--request-timeout=30s")
            .env("HOME", &home)
            .env_remove("KUBECONFIG")
            .stdin(std::process::Stdio::null())
            .args(args);
        c
    }
}

/// `relay_<family>_total{issuer="contoso",result="<result>"}`, 0 when absent.
fn counter(metrics: &str, family: &str, result: &str) -> u64 {
    let series = format!("relay_{family}_total{{issuer=\"contoso\",result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_overage_is_resolved_through_graph_for_kubectl() {
    let w = world("").await;
    w.graph.set_user_groups(OID_ALICE, &[GROUP_OPS]);
    let token = w.overage_token(OID_ALICE);
    let kc = w.kubeconfig("alice.kubeconfig", &token);

    // kubectl as a user whose token lists no groups: admitted by the ops group rule.
    let out = ok(
        &run(
            w.kubectl("1.33", &kc, &["get", "pods", "-n", "default"]),
            None,
            Duration::from_secs(60),
        ),
        "kubectl get pods (group overage)",
    );
    assert!(out.contains("web-0"), "{out}");
    let calls = w.graph.requests();
    // 25 group ids named by the rules: 20 in the first call, 5 in the second, for the user.
    assert_eq!(
        calls.len(),
        2,
        "{:?}",
        calls.iter().map(|c| c.group_ids.len()).collect::<Vec<_>>()
    );
    assert_eq!(calls[0].group_ids.len() + calls[1].group_ids.len(), 25);
    for c in &calls {
        assert_eq!(
            (c.kind.as_str(), c.id.as_str(), c.status),
            ("users", OID_ALICE, 200)
        );
        assert!(c.group_ids.len() <= 20);
    }
    let named: std::collections::BTreeSet<String> = calls
        .iter()
        .flat_map(|c| c.group_ids.iter().cloned())
        .collect();
    let mut expected: std::collections::BTreeSet<String> = filler_groups().into_iter().collect();
    expected.insert(GROUP_OPS.to_owned());
    assert_eq!(
        named, expected,
        "only the groups the rules name are asked about"
    );

    // Cached: more requests (and kubectl's discovery) make no Graph call.
    let out = ok(
        &run(
            w.kubectl("1.33", &kc, &["get", "pods", "-n", "default", "-o", "name"]),
            None,
            Duration::from_secs(60),
        ),
        "kubectl get pods again",
    );
    assert!(out.contains("pod/web-0"), "{out}");
    assert_eq!(
        w.graph.request_count(),
        2,
        "cached: zero Graph calls per request"
    );
    // The resolved membership admits reads only: a write needs the step-up rule.
    let (c, _, body) = w.request("DELETE", &token, &format!("{PODS}/web-0")).await;
    assert_eq!(c, 401, "{body}");

    let m = w.metrics().await;
    assert_eq!(counter(&m, "group_overage", "resolved"), 1, "{m}");
    assert!(counter(&m, "group_overage", "cached") >= 2, "{m}");
    assert_eq!(counter(&m, "graph_requests", "ok"), 2, "{m}");
    // The audit writer is asynchronous: wait for the records.
    let resolved: Vec<Value> = eventually("audit records", Duration::from_secs(10), || async {
        let r: Vec<Value> = w
            .audit()
            .into_iter()
            .filter(|r| r["annotations"]["kube-relay.io/group-overage"].is_string())
            .collect();
        if r.len() >= 2 {
            Ok(r)
        } else {
            Err(r.len())
        }
    })
    .await;
    assert!(resolved
        .iter()
        .all(|r| r["annotations"]["kube-relay.io/group-overage"]
            .as_str()
            .unwrap()
            .starts_with("resolved")));

    // A user Graph knows in none of the groups: 403, and the answer is cached too.
    w.graph.set_user_groups(OID_CAROL, &[]);
    let carol = w.overage_token(OID_CAROL);
    let (c, _, body) = w.get(&carol, PODS).await;
    assert_eq!(c, 403, "{body}");
    assert!(body.contains("has no access"), "{body}");
    assert_eq!(w.graph.request_count(), 4);
    assert_eq!(w.get(&carol, PODS).await.0, 403);
    assert_eq!(w.graph.request_count(), 4);

    // An app-only token (a CI service principal) is looked up as a service principal.
    w.graph
        .set_service_principal_groups(OID_CI_SP, &[GROUP_OPS]);
    let ci = w.user_token(
        OID_CI_SP,
        json!({"scp": null, "upn": null, "idtyp": "app", "appid": CI_APP,
               "roles": ["kube-relay.access"], "hasgroups": true}),
    );
    let (c, _, body) = w.get(&ci, PODS).await;
    assert_eq!(c, 200, "{body}");
    let last = w.graph.requests().pop().unwrap();
    assert_eq!(
        (last.kind.as_str(), last.id.as_str()),
        ("servicePrincipals", OID_CI_SP)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_throttling_errors_and_outage_fail_closed_while_other_rules_work() {
    let w = world("").await;
    for oid in [OID_ALICE, OID_CAROL, OID_DAVE, OID_ERIN] {
        w.graph.set_user_groups(oid, &[GROUP_OPS]);
    }

    // Throttled: the 403 says why, and no call goes out until Retry-After has passed.
    w.graph.set_failure(GraphFailure::Throttle {
        retry_after_secs: 2,
    });
    let carol = w.overage_token(OID_CAROL);
    let (c, _, body) = w.get(&carol, PODS).await;
    assert_eq!(c, 403, "{body}");
    assert!(body.contains("could not be resolved"), "{body}");
    assert!(body.contains("throttling"), "{body}");
    let after_429 = w.graph.request_count();
    assert_eq!(after_429, 1);
    let dave = w.overage_token(OID_DAVE);
    let (c, _, body) = w.get(&dave, PODS).await;
    assert_eq!(c, 403, "{body}");
    assert!(body.contains("throttling"), "{body}");
    assert_eq!(w.graph.request_count(), after_429, "Retry-After honoured");
    w.graph.set_failure(GraphFailure::None);
    // Once Retry-After has passed, the same user resolves.
    w.until_pods_answer("carol resolved after Retry-After", &carol, 200, "")
        .await;

    // Graph failing: the status and Graph's error code reach the 403 (and the log). (A user
    // whose lookup failed a moment ago gets that answer again for a few seconds, without a new
    // call: a fresh user here.)
    w.graph.set_failure(GraphFailure::ServerError);
    w.graph.set_user_groups(OID_FRANK, &[GROUP_OPS]);
    let frank = w.overage_token(OID_FRANK);
    let calls_before = w.graph.request_count();
    let (c, _, body) = w.get(&frank, PODS).await;
    assert_eq!(c, 403, "{body}");
    assert!(body.contains("HTTP 503"), "{body}");
    let (c, _, body) = w.get(&frank, PODS).await;
    assert_eq!(c, 403, "{body}");
    assert_eq!(
        w.graph.request_count(),
        calls_before + 1,
        "a failure is remembered briefly: no second call"
    );

    // Graph hanging: the request waits at most `timeout` (2 s), then 403.
    w.graph.set_failure(GraphFailure::Hang);
    let erin = w.overage_token(OID_ERIN);
    let started = tokio::time::Instant::now();
    let (c, _, body) = w.get(&erin, PODS).await;
    assert_eq!(c, 403, "{body}");
    assert!(body.contains("did not answer within"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Meanwhile rules that need no groups answer at once, with no Graph call: a user rule
    // (bob, with an overage token) and an app-role rule.
    let calls = w.graph.request_count();
    let bob = w.overage_token(OID_BOB);
    assert_eq!(w.get(&bob, PODS).await.0, 200);
    let admin = w.user_token(
        OID_DAVE,
        json!({"hasgroups": true, "roles": ["kube-relay.prod-admin"]}),
    );
    let started = tokio::time::Instant::now();
    assert_eq!(w.get(&admin, PODS).await.0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no wait on Graph"
    );
    assert_eq!(
        w.graph.request_count(),
        calls,
        "user and role rules need no Graph call"
    );
    // The role admits get and list only (a delete then needs the groups: Graph hangs, 403).
    assert_eq!(
        w.request("DELETE", &admin, &format!("{PODS}/web-0"))
            .await
            .0,
        403
    );
    // Alice was never resolved while Graph was up: fail closed.
    let alice = w.overage_token(OID_ALICE);
    assert_eq!(w.get(&alice, PODS).await.0, 403);

    let m = w.metrics().await;
    assert_eq!(counter(&m, "graph_requests", "throttled"), 1, "{m}");
    assert!(counter(&m, "graph_requests", "error") >= 1, "{m}");
    assert!(counter(&m, "group_overage", "unresolved") >= 4, "{m}");
    eventually(
        "unresolved memberships audited",
        Duration::from_secs(10),
        || async {
            let n = w
                .audit()
                .into_iter()
                .filter(|r| {
                    r["annotations"]["kube-relay.io/group-overage"]
                        .as_str()
                        .is_some_and(|a| a.starts_with("unresolved"))
                })
                .count();
            if n >= 4 {
                Ok(())
            } else {
                Err(n)
            }
        },
    )
    .await;
    // Every Graph call named a user by its verified `oid`; the token's own pointer
    // (`_claim_sources`, a foreign host) was never used.
    assert!(w.graph.requests().iter().all(|r| r.kind == "users"));
}

/// Membership is cached for `cache_ttl` and refreshed in the background after three quarters
/// of it, so a steady user never waits on Graph; a membership that ends (Entra PIM for Groups
/// deactivating, docs/architecture.md) stops admitting within `cache_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_membership_is_refreshed_off_the_request_path_and_expires() {
    // A TTL long enough that a loaded machine's late wake-up (below) stays inside the windows
    // the test aims at: past three quarters of it (3 s) and before its end (4 s).
    let w = world("cache_ttl: 4s").await;
    w.graph.set_user_groups(OID_ALICE, &[GROUP_OPS]);
    let alice = w.overage_token(OID_ALICE);
    let (c, _, body) = w.get(&alice, PODS).await;
    assert_eq!(c, 200, "{body}");
    let resolved_at = tokio::time::Instant::now();
    assert_eq!(w.graph.request_count(), 2);

    // Graph hangs from now on. Past three quarters of the TTL a request is still answered from
    // the cache at once, and starts a refresh in the background.
    w.graph.set_failure(GraphFailure::Hang);
    tokio::time::sleep(Duration::from_millis(3200).saturating_sub(resolved_at.elapsed())).await;
    let started = tokio::time::Instant::now();
    assert_eq!(w.get(&alice, PODS).await.0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "did not wait on Graph"
    );
    assert!(
        w.graph.wait_for_requests(3, Duration::from_secs(5)).await,
        "a background refresh went out"
    );

    // The refresh never answers: once the TTL has passed the membership is no longer trusted.
    tokio::time::sleep(Duration::from_millis(4100).saturating_sub(resolved_at.elapsed())).await;
    let (c, _, body) = w.get(&alice, PODS).await;
    assert_eq!(c, 403, "{body}");

    // Graph back, alice's membership removed (PIM deactivated): refused after the TTL.
    w.graph.set_failure(GraphFailure::None);
    w.graph.set_user_groups(OID_ALICE, &[]);
    w.until_pods_answer(
        "membership removal takes effect",
        &alice,
        403,
        "has no access",
    )
    .await;
    // And active again.
    w.graph.set_user_groups(OID_ALICE, &[GROUP_OPS]);
    w.until_pods_answer("membership activation takes effect", &alice, 200, "")
        .await;
}

/// Step-up: exec needs the authentication context c1. Without it the relay answers 401 with
/// Entra's claims challenge and a Status naming the command that gets such a token; with it,
/// kubectl exec works (SPDY and WebSocket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_needs_a_step_up_token_and_says_how_to_get_one() {
    let w = world("").await;
    let plain = w.user_token(OID_ALICE, json!({"groups": [GROUP_OPS]}));
    let stepped = w.user_token(OID_ALICE, json!({"groups": [GROUP_OPS], "acrs": ["c1"]}));

    assert_eq!(w.get(&plain, PODS).await.0, 200);
    let (c, head, body) = w.request("POST", &plain, EXEC).await;
    assert_eq!(c, 401, "{body}");
    let claims = base64::engine::general_purpose::STANDARD
        .encode(r#"{"access_token":{"acrs":{"essential":true,"value":"c1"}}}"#);
    assert!(
        head.contains(&format!(
            "www-authenticate: Bearer realm=\"kube-relay\", error=\"insufficient_claims\", claims=\"{claims}\""
        )),
        "{head}"
    );
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["reason"], "Unauthorized");
    let message = status["message"].as_str().unwrap();
    assert!(
        message.contains("kube-relay token --auth-context c1"),
        "{message}"
    );
    assert!(message.contains("aks@c1"), "{message}");
    // The audit writer is asynchronous: wait for the record.
    let record = eventually(
        "the exec's audit record",
        Duration::from_secs(10),
        || async {
            w.audit()
                .into_iter()
                .rev()
                .find(|r| {
                    r["requestURI"]
                        .as_str()
                        .is_some_and(|u| u.contains("/exec"))
                })
                .ok_or("not yet")
        },
    )
    .await;
    assert_eq!(record["responseStatus"]["code"], 401);
    assert_eq!(
        record["annotations"]["authorization.k8s.io/reason"],
        "step-up required: authentication context c1"
    );
    // A context the rule does not name does not help.
    let other = w.user_token(OID_ALICE, json!({"groups": [GROUP_OPS], "acrs": ["c2"]}));
    assert_eq!(w.request("POST", &other, EXEC).await.0, 401);

    // kubectl: reads work on the plain token; exec is refused with the message.
    let kc_plain = w.kubeconfig("plain.kubeconfig", &plain);
    let kc_step = w.kubeconfig("step.kubeconfig", &stepped);
    for version in ["1.27", "1.33"] {
        ok(
            &run(
                w.kubectl(version, &kc_plain, &["get", "pods", "-n", "default"]),
                None,
                Duration::from_secs(60),
            ),
            "get pods, plain token",
        );
        let out = run(
            w.kubectl(
                version,
                &kc_plain,
                &["exec", "-n", "default", "web-0", "--", "echo", "hi"],
            ),
            None,
            Duration::from_secs(60),
        );
        assert!(!out.status.success(), "{version}: exec without step-up");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // kubectl prints the Status message: what to run instead.
        assert!(
            stderr.contains("requires a step-up sign-in (authentication context c1)")
                && stderr.contains("aks@c1"),
            "{version}: {stderr}"
        );
        let out = ok(
            &run(
                w.kubectl(
                    version,
                    &kc_step,
                    &["exec", "-n", "default", "web-0", "--", "echo", "stepped-up"],
                ),
                None,
                Duration::from_secs(60),
            ),
            "exec with the step-up token",
        );
        assert_eq!(out.trim(), "stepped-up", "{version}");
    }

    // /-/clusters tells clients which contexts the caller's rules use.
    let (c, _, body) = w.public_get(&plain, "/-/clusters").await;
    assert_eq!(c, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    let aks = list["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "aks")
        .unwrap();
    assert_eq!(aks["authContexts"], json!(["c1"]), "{aks}");
}

/// `kube-relay doctor` calls Graph once per issuer with `resolve: graph`, with the relay's own
/// token, and shows Graph's error when the call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_calls_graph_once_with_the_relays_token() {
    let w = world("").await;
    let opts = kube_relay::cli::doctor::Options {
        timeout: Duration::from_secs(3),
    };
    let path = w.dir.path().join("relay.yaml");
    let report = kube_relay::cli::doctor::run_file(&path, &opts).await;
    let row = report
        .find("issuer/contoso", "graph")
        .unwrap_or_else(|| panic!("{}", report.render()))
        .clone();
    assert_eq!(
        row.outcome,
        kube_relay::cli::doctor::Outcome::Ok,
        "{}",
        row.detail
    );
    assert!(row.detail.contains("token accepted"), "{}", row.detail);
    let calls = w.graph.requests();
    assert_eq!(calls.len(), 1, "exactly one Graph call");
    assert_eq!(calls[0].group_ids.len(), 20);

    w.graph.set_failure(GraphFailure::ServerError);
    let report = kube_relay::cli::doctor::run_file(&path, &opts).await;
    let row = report.find("issuer/contoso", "graph").unwrap().clone();
    assert_eq!(row.outcome, kube_relay::cli::doctor::Outcome::Fail);
    assert!(row.detail.contains("HTTP 503"), "{}", row.detail);
    assert!(!report.render().contains(GRAPH_SECRET));
}

/// Just-in-time access with Entra PIM for Groups, as the relay sees it: the group claim
/// appears in tokens issued while the membership is active and is gone from the next token
/// after it ends. Each token is judged on its own claims, so access follows the activation
/// (docs/architecture.md "Identity and upstream credentials"; streams opened with a token end
/// when it expires: `tests/e2e/identity.rs`, reason `token_expired`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pim_group_claims_that_appear_and_disappear() {
    let w = world("").await;
    let before = w.user_token(OID_ERIN, json!({"groups": []}));
    let (c, _, body) = w.get(&before, PODS).await;
    assert_eq!(c, 403, "{body}");
    // Activated: the next token carries the group.
    let active = w.user_token(OID_ERIN, json!({"groups": [GROUP_OPS]}));
    assert_eq!(w.get(&active, PODS).await.0, 200);
    // Deactivated: the token issued after that does not.
    let after = w.user_token(
        OID_ERIN,
        json!({"groups": ["11111111-0000-0000-0000-000000000000"]}),
    );
    let (c, _, body) = w.get(&after, PODS).await;
    assert_eq!(c, 403, "{body}");
    assert!(body.contains("has no access"), "{body}");
    assert_eq!(
        w.graph.request_count(),
        0,
        "tokens that list their groups need no Graph call"
    );
}
