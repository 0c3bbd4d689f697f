//! CI checks of everything under deploy/ (and the Dockerfile), with no terraform binary, no
//! Docker daemon and no Azure (docs/validation.md says what each check covers and what it
//! cannot):
//! - Terraform: parsed and cross-referenced by tests/deploy/check_terraform.py (python-hcl2),
//!   then checkov's Azure policies;
//! - Dockerfile: checkov's Dockerfile policies plus the promises (multi-stage, distroless,
//!   non-root);
//! - Kubernetes: `kubectl kustomize` of both overlays, parsed and checked field by field, then
//!   checkov's Kubernetes policies on the rendered objects;
//! - systemd: `systemd-analyze verify` where the machine has it, and the hardening keys always;
//! - Prometheus and Grafana: parsed, and every metric they query exists in the relay.
//!
//! checkov runs offline: `--skip-download`, no external modules, no update check, no platform
//! key. Every child process runs under a deadline (crate::support::run kills it and fails the test).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The virtualenv scripts/install-test-deps.sh fills from tests/deploy/requirements.txt.
fn deploy_venv() -> PathBuf {
    std::env::var_os("KUBE_RELAY_DEPLOY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv-deploy"))
}

fn venv_bin(name: &str) -> PathBuf {
    let p = deploy_venv().join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-test-deps.sh (it installs tests/deploy/requirements.txt)",
        p.display()
    );
    p
}

/// checkov with every network feature off, so it never tries to download anything.
fn checkov(args: &[&str]) -> Json {
    let mut cmd = Command::new(venv_bin("checkov"));
    cmd.current_dir(root())
        .args(args)
        .args([
            "--skip-download",
            "--download-external-modules",
            "false",
            "--quiet",
            "--output",
            "json",
        ])
        .env("CKV_SKIP_PACKAGE_UPDATE_CHECK", "true")
        .env("BC_SKIP_MAPPING", "TRUE")
        .env_remove("BC_API_KEY")
        .env_remove("PRISMA_API_URL");
    let out = crate::support::run(cmd, None, TOOL_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // checkov exits 1 when a check fails; the JSON says which, so parse before judging.
    let doc: Json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "checkov {args:?} printed no JSON ({e}); status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // One framework gives an object, several a list.
    match doc {
        Json::Array(mut v) if v.len() == 1 => v.remove(0),
        other => other,
    }
}

/// Asserts checkov parsed everything and no check failed; returns the number of passed checks.
fn assert_checkov_clean(report: &Json, what: &str) -> u64 {
    let summary = &report["summary"];
    let failed: Vec<String> = report["results"]["failed_checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| format!("{} {} ({})", c["check_id"], c["resource"], c["file_path"]))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        failed.is_empty(),
        "{what}: checkov failures:\n{}",
        failed.join("\n")
    );
    assert_eq!(summary["failed"], 0, "{what}: {summary}");
    assert_eq!(summary["parsing_errors"], 0, "{what}: {summary}");
    let passed = summary["passed"].as_u64().unwrap_or(0);
    assert!(passed > 0, "{what}: checkov ran no checks: {summary}");
    eprintln!("{what}: checkov {summary}");
    passed
}

// === Terraform ===

#[test]
fn terraform_parses_and_every_reference_resolves() {
    let mut cmd = Command::new(venv_bin("python"));
    cmd.current_dir(root())
        .arg("tests/deploy/check_terraform.py")
        .arg("deploy/terraform");
    let out = crate::support::run(cmd, None, TOOL_TIMEOUT);
    let stdout = crate::support::ok(&out, "check_terraform.py");
    let summary: Json = serde_json::from_str(stdout.trim()).expect("summary JSON");
    assert!(
        summary["resources"].as_u64().unwrap_or(0) >= 30,
        "{summary}"
    );
    eprintln!("terraform static check: {summary}");
}

#[test]
fn terraform_passes_checkov() {
    let report = checkov(&["-d", "deploy/terraform", "--framework", "terraform"]);
    assert_checkov_clean(&report, "deploy/terraform");
    assert!(
        report["summary"]["resource_count"].as_u64().unwrap_or(0) >= 30,
        "checkov saw too few resources: {}",
        report["summary"]
    );
}

// === Dockerfile ===

#[test]
fn dockerfile_is_multistage_distroless_nonroot_and_passes_checkov() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let instr: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_ascii_uppercase(), v.trim().to_owned()))
        })
        .collect();
    let froms: Vec<&String> = instr
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, v)| v)
        .collect();
    assert!(froms.len() >= 2, "multi-stage build expected: {froms:?}");
    let last = froms.last().expect("a FROM");
    assert!(
        last.contains("distroless") && last.contains("nonroot"),
        "runtime stage must be distroless :nonroot, is {last}"
    );
    let user = instr
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, v)| v.clone())
        .expect("a USER instruction");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "USER {user}"
    );
    assert!(
        !instr.iter().any(|(k, _)| k == "ADD"),
        "ADD fetches URLs and unpacks archives implicitly; use COPY"
    );
    let entry = instr
        .iter()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, v)| v.clone())
        .expect("ENTRYPOINT");
    assert!(
        entry.starts_with('['),
        "exec-form ENTRYPOINT expected: {entry}"
    );
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    for must in ["target", ".git", "**/*.key", "**/*.pem"] {
        assert!(
            ignore.lines().any(|l| l.trim() == must),
            ".dockerignore lacks {must}"
        );
    }
    let report = checkov(&["-f", "Dockerfile", "--framework", "dockerfile"]);
    assert_checkov_clean(&report, "Dockerfile");
}

// === Kubernetes ===

fn kustomize(overlay: &str) -> (String, Vec<Yaml>) {
    let mut cmd = Command::new("kubectl");
    cmd.current_dir(root())
        .arg("kustomize")
        .arg(format!("deploy/kubernetes/overlays/{overlay}"));
    let out = crate::support::run(cmd, None, Duration::from_secs(60));
    let text = crate::support::ok(&out, "kubectl kustomize");
    let docs = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("kustomize output is YAML"))
        .collect();
    (text, docs)
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name_prefix: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| {
            d["kind"].as_str() == Some(kind)
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}* in the build"))
}

fn s<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v:?}"))
}

#[test]
fn kustomize_overlays_build_with_the_promised_fields() {
    for (overlay, internal) in [("internal", "true"), ("public", "false")] {
        let (text, docs) = kustomize(overlay);
        let ctx = format!("overlay {overlay}");
        for d in &docs {
            if d["kind"].as_str() != Some("Namespace") {
                assert_eq!(
                    d["metadata"]["namespace"].as_str(),
                    Some("kube-relay"),
                    "{ctx}: {d:?}"
                );
            }
        }

        let dep = find(&docs, "Deployment", "kube-relay");
        assert!(
            dep["spec"]["replicas"].as_u64().unwrap_or(0) >= 2,
            "{ctx}: replicas"
        );
        assert_eq!(
            dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
            Some(0),
            "{ctx}"
        );
        let pod = &dep["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "{ctx}"
        );
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault")
        );
        assert_eq!(
            pod["automountServiceAccountToken"].as_bool(),
            Some(false),
            "{ctx}"
        );
        let c = &pod["containers"][0];
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{ctx}");
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{ctx}"
        );
        assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"), "{ctx}");
        for (probe, path) in [
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
            ("startupProbe", "/healthz"),
        ] {
            assert_eq!(
                c[probe]["httpGet"]["path"].as_str(),
                Some(path),
                "{ctx}: {probe}"
            );
            assert_eq!(
                c[probe]["httpGet"]["port"].as_str(),
                Some("admin"),
                "{ctx}: {probe}"
            );
        }
        let admin_port = c["ports"]
            .as_sequence()
            .and_then(|ps| ps.iter().find(|p| p["name"].as_str() == Some("admin")))
            .expect("admin port");
        assert_eq!(admin_port["containerPort"].as_u64(), Some(9090));

        // Mounts: the generated ConfigMap (name with hash suffix), the TLS Secret, the CAs.
        let cm = find(&docs, "ConfigMap", "kube-relay-config-");
        let cm_name = s(&cm["metadata"]["name"], "ConfigMap name");
        let volumes = pod["volumes"].as_sequence().expect("volumes");
        let by_name = |n: &str| {
            volumes
                .iter()
                .find(|v| v["name"].as_str() == Some(n))
                .unwrap_or_else(|| panic!("{ctx}: no volume {n}"))
        };
        assert_eq!(
            by_name("config")["configMap"]["name"].as_str(),
            Some(cm_name),
            "{ctx}"
        );
        assert_eq!(
            by_name("tls")["secret"]["secretName"].as_str(),
            Some("kube-relay-tls")
        );
        assert!(by_name("cluster-cas")["configMap"]["name"]
            .as_str()
            .is_some());
        let mounts = c["volumeMounts"].as_sequence().expect("mounts");
        assert!(
            mounts.iter().all(|m| m["readOnly"].as_bool() == Some(true)),
            "{ctx}: all mounts read-only"
        );
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        let config_arg = args
            .iter()
            .skip_while(|a| **a != "--config")
            .nth(1)
            .expect("--config");
        assert!(
            config_arg.starts_with("/etc/kube-relay/config/"),
            "{ctx}: {config_arg}"
        );
        // The example relay.yaml in the ConfigMap names the mounted paths.
        let relay_yaml = s(&cm["data"]["relay.yaml"], "relay.yaml");
        for path in [
            "/etc/kube-relay/tls/tls.crt",
            "/etc/kube-relay/tls/tls.key",
            "/etc/kube-relay/clusters/",
        ] {
            assert!(
                relay_yaml.contains(path),
                "{ctx}: relay.yaml does not use {path}"
            );
        }

        let selector = &dep["spec"]["selector"]["matchLabels"];
        let pdb = find(&docs, "PodDisruptionBudget", "kube-relay");
        assert_eq!(
            &pdb["spec"]["selector"]["matchLabels"], selector,
            "{ctx}: PDB selects the pods"
        );
        let svc = find(&docs, "Service", "kube-relay");
        assert_eq!(svc["spec"]["type"].as_str(), Some("LoadBalancer"), "{ctx}");
        assert_eq!(
            svc["metadata"]["annotations"]
                ["service.beta.kubernetes.io/azure-load-balancer-internal"]
                .as_str(),
            Some(internal),
            "{ctx}"
        );
        for (k, v) in selector.as_mapping().expect("selector") {
            assert_eq!(
                &svc["spec"]["selector"][k], v,
                "{ctx}: the Service selects the pods"
            );
        }
        find(&docs, "NetworkPolicy", "kube-relay");
        find(&docs, "Namespace", "kube-relay");

        // checkov's Kubernetes policies on exactly what would be applied.
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &text).expect("write build");
        let report = checkov(&[
            "-f",
            file.to_str().expect("utf-8 path"),
            "--framework",
            "kubernetes",
        ]);
        assert_checkov_clean(&report, &ctx);
    }
}

/// The example relay.yaml shipped in the base loads with the relay's own loader once the
/// mounted files exist (paths rewritten into a temporary directory).
#[test]
fn example_relay_yaml_is_a_valid_configuration() {
    kube_relay::install_crypto_provider();
    let text = std::fs::read_to_string(root().join("deploy/kubernetes/base/relay.yaml"))
        .expect("relay.yaml");
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path();
    let ca = kube_sim::pki::TestCa::new("example").expect("ca");
    let leaf = ca
        .issue(&["relay.example.com", "*.relay.example.com"])
        .expect("leaf");
    std::fs::create_dir_all(base.join("tls")).expect("mkdir");
    std::fs::create_dir_all(base.join("clusters")).expect("mkdir");
    std::fs::write(base.join("tls/tls.crt"), &leaf.cert_pem).expect("write");
    std::fs::write(base.join("tls/tls.key"), &leaf.key_pem).expect("write");
    std::fs::write(base.join("clusters/prod-weu-ca.crt"), ca.cert_pem()).expect("write");
    let rewritten = text.replace("/etc/kube-relay/", &format!("{}/", base.display()));
    match kube_relay::config::parse(&rewritten, base) {
        Ok(cfg) => assert_eq!(cfg.clusters.len(), 1),
        Err(e) => panic!("deploy/kubernetes/base/relay.yaml does not load:\n{e}"),
    }
}

// === systemd ===

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit_path = root().join("deploy/systemd/kube-relay.service");
    let unit = std::fs::read_to_string(&unit_path).expect("unit");

    // The keys that make it hardened, checked on every machine.
    let mut section = String::new();
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        keys.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    let sections: BTreeSet<&str> = keys.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(sections, BTreeSet::from(["Install", "Service", "Unit"]));
    let has = |k: &str, v: &str| {
        keys.iter()
            .any(|(s, kk, vv)| s == "Service" && kk == k && vv == v)
    };
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LoadCredential", "relay.pem:/etc/kube-relay/tls/relay.pem"),
    ] {
        assert!(has(k, v), "[Service] {k}={v} missing");
    }
    assert!(
        keys.iter()
            .any(|(_, k, v)| k == "ExecStart" && v.contains("serve --config")),
        "ExecStart runs serve"
    );

    // The real verifier where the machine has it (Debian's systemd package ships it).
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze not on this machine: only the key checks above ran");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    // verify insists every Exec* binary exists: point them at the binary cargo just built.
    let exe = env!("CARGO_BIN_EXE_kube-relay");
    let copy = tmp.path().join("kube-relay.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/kube-relay", exe)).expect("write");
    let mut cmd = Command::new(analyze);
    cmd.arg("verify").arg("--man=no").arg(&copy);
    let out = crate::support::run(cmd, None, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings (exit 0), so read what it says about us.
    let about_us: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("kube-relay.service"))
        .collect();
    assert!(
        out.status.success() && about_us.is_empty(),
        "systemd-analyze verify: {:?}\n{}",
        out.status,
        about_us.join("\n")
    );
}

fn which(name: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

// === Prometheus and Grafana ===

/// Metric names (as exported) that PromQL in `text` uses.
fn metrics_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("relay_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if boundary {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// Families registered in src/metrics.rs (prefix `relay_`).
fn registered_families() -> BTreeSet<String> {
    let src = std::fs::read_to_string(root().join("src/metrics.rs")).expect("metrics.rs");
    let mut out = BTreeSet::new();
    let mut rest = src.as_str();
    while let Some(pos) = rest.find("register(") {
        rest = &rest[pos + "register(".len()..];
        if let Some(q) = rest.find('"') {
            let after = &rest[q + 1..];
            if let Some(end) = after.find('"') {
                out.insert(format!("relay_{}", &after[..end]));
            }
        }
    }
    out
}

fn family_of(metric: &str, families: &BTreeSet<String>) -> Option<String> {
    [metric, metric.trim_end_matches("_total")]
        .into_iter()
        .chain(
            ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| metric.strip_suffix(s)),
        )
        .find(|m| families.contains(*m))
        .map(str::to_owned)
}

#[test]
fn prometheus_and_grafana_query_only_metrics_the_relay_exports() {
    let families = registered_families();
    for required in [
        "relay_requests",
        "relay_request_duration_seconds",
        "relay_longrunning_requests",
        "relay_upstream_errors",
        "relay_authn",
        "relay_stream_bytes",
        "relay_ws_fallback",
    ] {
        assert!(
            families.contains(required),
            "src/metrics.rs no longer registers {required}"
        );
    }

    let dash_text =
        std::fs::read_to_string(root().join("deploy/grafana/kube-relay-dashboard.json"))
            .expect("dashboard");
    let dash: Json = serde_json::from_str(&dash_text).expect("dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut exprs = String::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            exprs.push_str(t["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
        assert_eq!(
            p["datasource"]["uid"].as_str(),
            Some("${datasource}"),
            "panel {}",
            p["title"]
        );
    }
    let used = metrics_in(&exprs);
    for m in &used {
        assert!(
            family_of(m, &families).is_some(),
            "dashboard queries {m}, which the relay does not export"
        );
    }
    for required in [
        "relay_requests_total",
        "relay_request_duration_seconds_bucket",
        "relay_longrunning_requests",
        "relay_upstream_errors_total",
        "relay_authn_total",
        "relay_stream_bytes_total",
        "relay_ws_fallback_total",
    ] {
        assert!(
            used.contains(required),
            "the dashboard does not chart {required}"
        );
    }

    let scrape: Yaml = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/scrape.yaml"))
            .expect("scrape.yaml"),
    )
    .expect("scrape.yaml is YAML");
    let jobs = scrape["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    assert!(jobs.iter().all(|j| j["job_name"]
        .as_str()
        .is_some_and(|n| n.starts_with("kube-relay"))));
    let rules_text =
        std::fs::read_to_string(root().join("deploy/prometheus/rules.yaml")).expect("rules.yaml");
    let rules: Yaml = serde_yaml_ng::from_str(&rules_text).expect("rules.yaml is YAML");
    let mut rule_exprs = String::new();
    for g in rules["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            assert!(
                r["alert"].as_str().is_some(),
                "rule without alert name: {r:?}"
            );
            rule_exprs.push_str(s(&r["expr"], "expr"));
            rule_exprs.push('\n');
        }
    }
    for m in metrics_in(&rule_exprs) {
        assert!(
            family_of(&m, &families).is_some(),
            "rules.yaml queries {m}, which the relay does not export"
        );
    }
}

/// The naming rule above (family + `_total` / `_bucket`) checked against a live relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_names_follow_the_rule_the_dashboard_assumes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = crate::support::dev_env().await;
    let token = env.dev.token("alice");
    let auth = format!("Bearer {token}");
    let (code, _, _) = crate::support::request(
        &env,
        "localhost",
        "GET",
        "/clusters/alpha/api/v1/namespaces/default/pods",
        &[("Authorization", auth.as_str())],
    )
    .await;
    assert_eq!(code, 200);
    let admin = env.dev.admin_addr.expect("admin listener");
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("metrics within 10s")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    for sample in [
        "relay_requests_total{",
        "relay_request_duration_seconds_bucket{",
        "relay_authn_total{",
    ] {
        assert!(text.contains(sample), "no {sample} in /metrics:\n{text}");
    }
    env.dev.stop().await;
}

#[test]
fn no_private_keys_are_tracked_or_unignored() {
    // Every key-like file in the tree is ignored by git; certs/ holds documentation only.
    let out = crate::support::run(
        {
            let mut c = Command::new("git");
            c.current_dir(root())
                .args(["ls-files", "--cached", "--others", "--exclude-standard"]);
            c
        },
        None,
        Duration::from_secs(60),
    );
    let files = crate::support::ok(&out, "git ls-files");
    let offenders: Vec<&str> = files
        .lines()
        .filter(|f| {
            let p = Path::new(f);
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("key" | "pem" | "p12" | "pfx")
            ) || f.ends_with(".tfvars")
                || f.contains(".tfstate")
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "key or state files not ignored by git: {offenders:?}"
    );
    for text in files
        .lines()
        .filter(|f| f.starts_with("deploy/") || f.starts_with("certs/") || f.starts_with("docs/"))
    {
        let body = std::fs::read_to_string(root().join(text)).unwrap_or_default();
        assert!(
            !body.contains("-----BEGIN PRIVATE KEY-----")
                && !body.contains("-----BEGIN RSA PRIVATE KEY-----")
                && !body.contains("-----BEGIN EC PRIVATE KEY-----"),
            "{text} contains a private key"
        );
    }
}
