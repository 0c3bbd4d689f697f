//! Every upstream mode against a real kube-apiserver (v1.34): passthrough with nested
//! impersonation, impersonate with a TokenRequest ServiceAccount token and with a client
//! certificate, on_behalf_of with the API server trusting the exchanged token's issuer, and the
//! audit join (the relay's `auditID` is the API server's).

use std::time::Duration;

use crate::support::real::*;
use crate::support::*;
use kube_sim::token_endpoint::TokenEndpointConfig;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// Groups of alice's that no RBAC binding names.
const EXTRA_GROUPS: [&str; 2] = [
    "0c0ffee0-0000-4000-8000-000000000001",
    "0c0ffee0-0000-4000-8000-000000000002",
];

fn k(front: &Front, ctx: &str, args: &[&str]) -> std::process::Output {
    let mut c = front.kubectl("1.33", ctx);
    c.args(args);
    run(c, None, T)
}

fn whoami(front: &Front, ctx: &str, extra: &[&str]) -> Value {
    let mut args = vec!["auth", "whoami", "-o", "json"];
    args.extend_from_slice(extra);
    let out = ok(&k(front, ctx, &args), &format!("whoami on {ctx}"));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn impersonate_mode_with_a_service_account_token_and_a_client_certificate() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let idp = rt.block_on(EntraIdp::start());
    let cluster = RealCluster::start(&rt, Options::new("imp"));
    let token_file = cluster.dir.path().join("relay-sa-token");
    std::fs::write(&token_file, cluster.relay_sa_token()).unwrap();
    let access = format!("[{{groups: [{GROUP_OPS}]}}, {{users: [contoso/{OID_BOB}]}}]");
    let front = Front::start(
        &rt,
        &idp,
        &[
            Upstream {
                cluster: &cluster,
                alias: Some("imp-sa".into()),
                connect_port: None,
                upstream_auth: format!("{{mode: impersonate, token_file: \"{}\"}}", token_file.display()),
                access: access.clone(),
            },
            Upstream {
                cluster: &cluster,
                alias: Some("imp-cert".into()),
                connect_port: None,
                upstream_auth: "{mode: impersonate, client_cert_file: imp-relay.crt, client_key_file: imp-relay.key}".into(),
                access: access.clone(),
            },
            // Only the group RBAC binds goes upstream (upstream_auth.forward_groups).
            Upstream {
                cluster: &cluster,
                alias: Some("imp-few".into()),
                connect_port: None,
                upstream_auth: format!("{{mode: impersonate, client_cert_file: imp-relay.crt, client_key_file: imp-relay.key, forward_groups: [{GROUP_OPS}]}}"),
                access,
            },
        ],
        &[
            (
                "alice",
                idp.user_token(OID_ALICE, &[GROUP_OPS, EXTRA_GROUPS[0], EXTRA_GROUPS[1]]),
            ),
            ("bob", idp.user_token(OID_BOB, &[])),
        ],
        "",
    );
    for (ctx, relay_user) in [
        ("imp-sa", "system:serviceaccount:kube-system:kube-relay"),
        ("imp-cert", "kube-relay"),
    ] {
        // The API server sees the end user, with the oid extra AKS Azure RBAC needs.
        let who = whoami(&front, ctx, &[]);
        let u = &who["status"]["userInfo"];
        assert_eq!(u["username"], upn(OID_ALICE), "{who}");
        assert!(
            u["groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g == GROUP_OPS),
            "{who}"
        );
        assert_eq!(u["extra"]["oid"], serde_json::json!([OID_ALICE]), "{who}");
        let out = ok(&k(&front, ctx, &["get", "pods"]), "get pods");
        assert!(out.contains("web-0"), "{out}");

        // Audit join: the same auditID in both logs; the API server records the relay's own
        // identity as the user and the end user as the impersonated one.
        let relay_rec = front.last_audit_record("the list", |r| {
            r["requestURI"]
                .as_str()
                .is_some_and(|u| u.contains("/api/v1/namespaces/default/pods"))
                && r["user"]["username"] == upn(OID_ALICE)
        });
        let id = relay_rec["auditID"].as_str().unwrap().to_owned();
        let api = cluster
            .audit_events()
            .into_iter()
            .find(|e| e["auditID"] == id.as_str())
            .unwrap_or_else(|| panic!("no API server audit event with auditID {id}"));
        assert_eq!(api["user"]["username"], relay_user, "{api}");
        assert_eq!(api["impersonatedUser"]["username"], upn(OID_ALICE), "{api}");
        assert_eq!(api["verb"], "list");

        // A user the relay admits but RBAC does not gets the API server's own 403, unchanged.
        let denied = k(&front, &format!("bob@{ctx}"), &["get", "pods"]);
        assert!(!denied.status.success());
        let err = String::from_utf8_lossy(&denied.stderr);
        assert!(
            err.contains(&format!("User \"{}\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\"", upn(OID_BOB))),
            "{err}"
        );
    }

    // forward_groups: the API server sees only the listed group (and the one it adds itself),
    // RBAC through it still admits, and the relay's audit keeps every group of the caller.
    let who = whoami(&front, "imp-few", &[]);
    let u = &who["status"]["userInfo"];
    assert_eq!(u["username"], upn(OID_ALICE), "{who}");
    assert_eq!(
        u["groups"],
        serde_json::json!([GROUP_OPS, "system:authenticated"]),
        "{who}"
    );
    assert_eq!(u["extra"]["oid"], serde_json::json!([OID_ALICE]), "{who}");
    let all = whoami(&front, "imp-cert", &[]);
    for g in EXTRA_GROUPS {
        assert!(
            all["status"]["userInfo"]["groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == g),
            "without forward_groups every group goes: {all}"
        );
    }
    let out = ok(
        &k(&front, "imp-few", &["get", "pods"]),
        "get pods (imp-few)",
    );
    assert!(out.contains("web-0"), "{out}");
    let rec = front.last_audit_record("the list on imp-few", |r| {
        r["requestURI"]
            .as_str()
            .is_some_and(|u| u.contains("/clusters/imp-few/api/v1/namespaces/default/pods"))
    });
    assert_eq!(
        rec["user"]["groups"],
        serde_json::json!([GROUP_OPS, EXTRA_GROUPS[0], EXTRA_GROUPS[1]]),
        "{rec}"
    );

    // Watch and exec join the same way.
    let mut c = front.kubectl("1.33", "imp-sa");
    c.args(["get", "pods", "--watch-only", "--request-timeout=3s"]);
    let _ = run(c, None, T);
    let out = ok(
        &k(&front, "imp-sa", &["exec", "web-0", "--", "echo", "joined"]),
        "exec",
    );
    assert_eq!(out, "joined\n");
    for (what, pred) in [
        (
            "watch",
            Box::new(|r: &Value| {
                r["requestURI"]
                    .as_str()
                    .is_some_and(|u| u.contains("watch=true"))
            }) as Box<dyn Fn(&Value) -> bool>,
        ),
        (
            "exec",
            Box::new(|r: &Value| {
                r["requestURI"]
                    .as_str()
                    .is_some_and(|u| u.contains("/exec?"))
            }),
        ),
    ] {
        let rec = front.last_audit_record(what, pred);
        let id = rec["auditID"].as_str().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(e) = cluster
                .audit_events()
                .into_iter()
                .find(|e| e["auditID"] == id)
            {
                assert_eq!(
                    e["impersonatedUser"]["username"],
                    upn(OID_ALICE),
                    "{what}: {e}"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: no API server event {id}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn passthrough_nested_impersonation_only_where_a_rule_allows_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let idp = rt.block_on(EntraIdp::start());
    let cluster = RealCluster::start(&rt, Options::new("nest").entra(&idp));
    let alice = idp.user_token(OID_ALICE, &[GROUP_OPS]);
    cluster.wait_for_jwt(&alice);
    let front = Front::start(
        &rt,
        &idp,
        &[
            Upstream {
                cluster: &cluster,
                alias: Some("nest-as".into()),
                connect_port: None,
                upstream_auth: "{mode: passthrough}".into(),
                access: format!("[{{users: [contoso/{OID_ALICE}], allow_impersonation: true}}]"),
            },
            Upstream {
                cluster: &cluster,
                alias: Some("nest-plain".into()),
                connect_port: None,
                upstream_auth: "{mode: passthrough}".into(),
                access: format!("[{{users: [contoso/{OID_ALICE}]}}]"),
            },
        ],
        &[("alice", alice)],
        "",
    );
    // The API server validates alice's own token and her RBAC right to impersonate.
    let who = whoami(
        &front,
        "nest-as",
        &["--as=carol@contoso.test", "--as-group=auditors"],
    );
    assert_eq!(
        who["status"]["userInfo"]["username"], "carol@contoso.test",
        "{who}"
    );
    assert!(
        who["status"]["userInfo"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == "auditors"),
        "{who}"
    );
    let who = whoami(&front, "nest-plain", &[]);
    assert_eq!(
        who["status"]["userInfo"]["username"],
        upn(OID_ALICE),
        "{who}"
    );
    // Without the rule the relay refuses `--as` before the cluster sees it.
    let before = cluster.audit_events().len();
    let denied = k(
        &front,
        "nest-plain",
        &["get", "pods", "--as=carol@contoso.test"],
    );
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("Forbidden"), "{err}");
    assert!(
        !cluster.audit_events()[before..]
            .iter()
            .any(|e| e["impersonatedUser"]["username"] == "carol@contoso.test"),
        "a refused impersonation reached the API server"
    );
}

#[test]
fn on_behalf_of_the_api_server_sees_the_real_user() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let idp = rt.block_on(EntraIdp::start());
    // Entra's token endpoint: exchanges relay-audience tokens for AKS-audience v1 tokens signed
    // by keys it publishes in the tenant's metadata, which the API server discovers.
    let aks_signer = kube_sim::issuer::DevIssuer::generate(
        &format!("https://sts.windows.net/{TID}/"),
        kube_sim::issuer::KeyAlg::Rs256,
    )
    .unwrap();
    let (te, te_authority) = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
        let mut cfg = TokenEndpointConfig::new(TID, aks_signer.clone());
        cfg.assertion_issuers = vec![idp.issuer.clone()];
        cfg.client_secrets.insert(RELAY_APP.into(), "s3cret".into());
        cfg.metadata_authority = Some(authority.clone());
        let te = kube_sim::token_endpoint::serve(l, Some(idp.tls.clone()), cfg)
            .await
            .unwrap();
        (te, authority)
    });
    let mut opts = Options::new("obo");
    opts.entra = Some(EntraTrust {
        issuer: format!("https://sts.windows.net/{TID}/"),
        discovery_url: format!("{te_authority}/{TID}/.well-known/openid-configuration"),
        ca_pem: idp.ca.cert_pem().to_owned(),
        audience: AKS_APP.into(),
    });
    let cluster = RealCluster::start(&rt, opts);
    // The API server trusts the exchanged tokens' issuer, not the relay-audience ones.
    let probe = aks_signer.mint(serde_json::json!({
        "aud": AKS_APP, "tid": TID, "oid": OID_ALICE, "upn": upn(OID_ALICE), "ver": "1.0"}));
    cluster.wait_for_jwt(&probe);
    let secret = cluster.dir.path().join("obo-secret");
    std::fs::write(&secret, "s3cret").unwrap();
    let front = Front::start(
        &rt,
        &idp,
        &[Upstream {
            cluster: &cluster,
            alias: None,
            connect_port: None,
            upstream_auth: format!(
                "{{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: \"{}\", authority_host: \"{te_authority}\", ca_file: idp-ca.crt}}",
                secret.display()
            ),
            access: format!("[{{groups: [{GROUP_OPS}]}}]"),
        }],
        &[("alice", idp.relay_token(OID_ALICE, &[GROUP_OPS]))],
        "",
    );
    let who = whoami(&front, "obo", &[]);
    assert_eq!(
        who["status"]["userInfo"]["username"],
        upn(OID_ALICE),
        "{who}"
    );
    assert_eq!(who["status"]["userInfo"]["uid"], OID_ALICE, "{who}");
    let out = ok(&k(&front, "obo", &["get", "pods"]), "get pods via OBO");
    assert!(out.contains("web-0"), "{out}");
    // No impersonation anywhere: the API server authenticated the user's exchanged token.
    let events = cluster.audit_events();
    let e = events
        .iter()
        .rev()
        .find(|e| e["verb"] == "list" && e["objectRef"]["resource"] == "pods")
        .expect("the list reached the API server");
    assert_eq!(e["user"]["username"], upn(OID_ALICE), "{e}");
    assert!(e.get("impersonatedUser").is_none(), "{e}");
    drop(te);
}

/// The relay's reason to exist: one relay, three private clusters, each with its own CA, its
/// own credential mode and its own access rules. Every request lands on the cluster its
/// context names (by path and by SNI), the API server it reached audits it under the relay's
/// auditID and the others never see it, a rule on one cluster admits nothing on another, and one
/// cluster going down leaves the other two answering and their watches open.
#[test]
fn one_relay_in_front_of_three_clusters_with_different_modes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let idp = rt.block_on(EntraIdp::start());
    let mut weu = RealCluster::start(&rt, Options::new("weu").entra(&idp));
    let eus = RealCluster::start(&rt, Options::new("eus"));
    let sea = RealCluster::start(&rt, Options::new("sea"));
    let alice = idp.user_token(OID_ALICE, &[GROUP_OPS]);
    weu.wait_for_jwt(&alice);
    let sa_file = eus.dir.path().join("relay-sa-token");
    std::fs::write(&sa_file, eus.relay_sa_token()).unwrap();
    for c in [&weu, &eus, &sea] {
        c.admin_ok(
            &[
                "create",
                "configmap",
                "where",
                &format!("--from-literal=cluster={}", c.name),
            ],
            None,
        );
    }
    let ops = format!("[{{groups: [{GROUP_OPS}]}}, {{users: [contoso/{OID_BOB}]}}]");
    let front = Front::start(
        &rt,
        &idp,
        &[
            Upstream {
                cluster: &weu,
                alias: None,
                connect_port: None,
                upstream_auth: "{mode: passthrough}".into(),
                access: ops,
            },
            Upstream {
                cluster: &eus,
                alias: None,
                connect_port: None,
                upstream_auth: format!(
                    "{{mode: impersonate, token_file: \"{}\"}}",
                    sa_file.display()
                ),
                access: format!("[{{groups: [{GROUP_OPS}]}}]"),
            },
            Upstream {
                cluster: &sea,
                alias: None,
                connect_port: None,
                upstream_auth:
                    "{mode: impersonate, client_cert_file: sea-relay.crt, client_key_file: sea-relay.key}"
                        .into(),
                access: format!("[{{groups: [{GROUP_OPS}]}}]"),
            },
        ],
        &[("alice", alice), ("bob", idp.user_token(OID_BOB, &[]))],
        "",
    );

    let clusters = [&weu, &eus, &sea];
    for c in clusters {
        for ctx in [c.name.clone(), format!("{}-sni", c.name)] {
            let got = ok(
                &k(
                    &front,
                    &ctx,
                    &[
                        "get",
                        "configmap",
                        "where",
                        "-o",
                        "jsonpath={.data.cluster}",
                    ],
                ),
                &format!("get configmap on {ctx}"),
            );
            assert_eq!(got, c.name, "context {ctx} reached the wrong cluster");
        }
        // The relay's audit record names the cluster's request; only that API server has it.
        let rec = front.last_audit_record(&format!("the get on {}", c.name), |r| {
            r["requestURI"].as_str().is_some_and(|u| {
                u.contains(&format!(
                    "/{}/api/v1/namespaces/default/configmaps/where",
                    c.name
                ))
            })
        });
        let id = rec["auditID"].as_str().unwrap().to_owned();
        for other in clusters {
            let seen = other
                .audit_events()
                .iter()
                .any(|e| e["auditID"] == id.as_str());
            assert_eq!(
                seen,
                other.name == c.name,
                "request {id} for {} seen by {}: {seen}",
                c.name,
                other.name
            );
        }
        let out = ok(
            &k(&front, &c.name, &["exec", "web-0", "--", "echo", &c.name]),
            "exec",
        );
        assert_eq!(out.trim(), c.name);
    }

    // bob's rule is on weu only: there the API server's RBAC answers; elsewhere the relay does.
    let there = k(&front, "bob@weu", &["get", "pods"]);
    let err = String::from_utf8_lossy(&there.stderr);
    assert!(err.contains("cannot list resource \"pods\""), "{err}");
    for c in ["eus", "sea"] {
        let before = clusters
            .iter()
            .find(|x| x.name == c)
            .unwrap()
            .audit_events()
            .len();
        let refused = k(&front, &format!("bob@{c}"), &["get", "pods"]);
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(
            err.contains(&format!("has no access to cluster {c} through kube-relay")),
            "{err}"
        );
        let cluster = clusters.iter().find(|x| x.name == c).unwrap();
        assert!(
            !cluster.audit_events()[before..]
                .iter()
                .any(|e| e["user"]["username"] == upn(OID_BOB)
                    || e["impersonatedUser"]["username"] == upn(OID_BOB)),
            "a request the relay refused reached {c}"
        );
    }

    // One cluster down: the others keep answering, and a watch open on one of them survives.
    let mut watch = front.kubectl("1.33", "eus");
    watch
        .args([
            "get",
            "configmaps",
            "--watch-only",
            "-o",
            "name",
            "--request-timeout=0",
        ])
        .stdout(std::process::Stdio::piped());
    let mut watch = watch.spawn().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let expect = |want: &str| {
        let got = lines
            .recv_timeout(T)
            .unwrap_or_else(|e| panic!("watch on eus, waiting for {want}: {e}"));
        assert_eq!(got, want);
    };
    // The watch is open once the API server has audited it; then events flow. Only kubectl's
    // watch counts: the API server's own controllers watch configmaps too (in kube-system),
    // and creating the configmap before kubectl's watch starts would hide its event.
    let deadline = tokio::time::Instant::now() + T;
    while !eus.audit_events().iter().any(|e| {
        e["verb"] == "watch"
            && e["objectRef"]["resource"] == "configmaps"
            && e["objectRef"]["namespace"] == "default"
            && e["userAgent"]
                .as_str()
                .is_some_and(|ua| ua.starts_with("kubectl"))
            && e["stage"] == "ResponseStarted"
    }) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch on eus never opened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eus.admin_ok(&["create", "configmap", "before"], None);
    expect("configmap/before");
    weu.stop_apiserver();
    let down = k(&front, "weu", &["get", "pods", "--request-timeout=10s"]);
    assert!(!down.status.success(), "weu answered while stopped");
    for c in ["eus", "sea"] {
        let out = ok(
            &k(&front, c, &["get", "pods"]),
            "get pods beside a down cluster",
        );
        assert!(out.contains("web-0"), "{out}");
    }
    eus.admin_ok(&["create", "configmap", "after"], None);
    expect("configmap/after");
    let _ = watch.kill();
    let _ = watch.wait();
    weu.start_apiserver();
    let out = ok(&k(&front, "weu", &["get", "pods"]), "weu back");
    assert!(out.contains("web-0"), "{out}");
}
