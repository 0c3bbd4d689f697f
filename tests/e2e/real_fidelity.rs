//! kube-sim against the real thing: the same kubectl commands through the relay to kube-sim
//! (`kube-relay dev`) and to a real kube-apiserver, comparing what kubectl shows (exit codes
//! and the shape of the output). Where kube-sim deliberately does less, its answer must say so.

use std::time::Duration;

use crate::support::real::*;
use crate::support::*;

const T: Duration = Duration::from_secs(60);

struct Shown {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn show(mut c: std::process::Command, args: &[&str], stdin: Option<&str>) -> Shown {
    c.args(args);
    let out = run(c, stdin.map(str::as_bytes), T);
    Shown {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The first line's column names (a table header).
fn header(s: &str) -> Vec<String> {
    s.lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn kubectl_shows_the_same_through_kube_sim_and_the_real_api_server() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(dev_env());
    let bed = Bed::passthrough(Options::new("real"));
    let front = &bed.front;
    let both = |args: &[&str], stdin: Option<&str>| {
        (
            show(sim.kubectl("1.33", "alpha"), args, stdin),
            show(front.kubectl("1.33", "real"), args, stdin),
        )
    };

    // Same exit code and the same table header. Events about the pod only: the real API server
    // records events of its own at moments no test controls (a Warning that the `kubernetes`
    // service's IP is not allocated when its repair loop runs before the allocator is ready).
    for args in [
        &["get", "pods"][..],
        &["get", "pods", "-o", "wide"],
        &["get", "configmaps"],
        &["get", "namespaces"],
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=web-0",
        ],
        &["events", "--for", "pod/web-0"],
        &["api-resources", "--api-group="],
        &["auth", "whoami"],
    ] {
        let (s, r) = both(args, None);
        assert_eq!(
            s.code, r.code,
            "{args:?}: kube-sim {} / real {}",
            s.stderr, r.stderr
        );
        assert_eq!(s.code, Some(0), "{args:?}: {}", s.stderr);
        assert_eq!(
            header(&s.stdout),
            header(&r.stdout),
            "{args:?}:\n{}\n{}",
            s.stdout,
            r.stdout
        );
        assert_eq!(s.stderr.trim(), r.stderr.trim(), "{args:?}");
    }
    let (s, r) = both(&["api-resources", "--api-group="], None);
    for kind in ["pods", "configmaps", "namespaces", "events"] {
        assert!(s.stdout.contains(kind) && r.stdout.contains(kind), "{kind}");
    }

    // The same objects in the same JSON shape.
    let (s, r) = both(&["get", "pod", "web-0", "-o", "json"], None);
    let (s, r): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&s.stdout).unwrap(),
        serde_json::from_str(&r.stdout).unwrap(),
    );
    for key in ["apiVersion", "kind", "metadata", "spec", "status"] {
        assert!(s.get(key).is_some() && r.get(key).is_some(), "{key}");
    }
    assert_eq!(s["status"]["phase"], r["status"]["phase"]);

    // Streams and exit codes.
    let (s, r) = both(&["logs", "web-0", "--tail=2"], None);
    assert_eq!(
        (s.code, s.stdout.lines().count()),
        (r.code, r.stdout.lines().count())
    );
    let (s, r) = both(&["exec", "web-0", "--", "echo", "same"], None);
    assert_eq!((s.code, &s.stdout), (r.code, &r.stdout));
    let (s, r) = both(&["exec", "web-0", "--", "sh", "-c", "exit 3"], None);
    assert_eq!((s.code, r.code), (Some(3), Some(3)));
    let (s, r) = both(&["exec", "-i", "web-0", "--", "cat"], Some("round trip\n"));
    assert_eq!((s.code, &s.stdout), (r.code, &r.stdout));
    let (s, r) = both(&["get", "--raw", "/version"], None);
    assert!(s.stdout.contains("gitVersion") && r.stdout.contains("gitVersion"));

    // Where kube-sim does less, it says so (the real server does it).
    let (s, r) = both(
        &[
            "create",
            "deployment",
            "fid",
            "--image=registry.k8s.io/pause:3.10",
        ],
        None,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_ne!(s.code, Some(0));
    assert!(
        s.stderr.contains("kube-sim simulates only") && s.stderr.contains("apps"),
        "{}",
        s.stderr
    );
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fid-ssa\ndata:\n  k: v\n";
    let (s, r) = both(&["apply", "--server-side", "-f", "-"], Some(cm));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_ne!(s.code, Some(0));
    assert!(
        s.stderr.contains("does not simulate server-side apply"),
        "{}",
        s.stderr
    );
    rt.block_on(sim.dev.stop());
}

/// `kube-relay dev --add-context`: the dev relay in front of a real cluster from the user's
/// kubeconfig, its token becoming the relay's impersonating credential.
#[test]
fn dev_add_context_puts_the_relay_in_front_of_your_own_cluster() {
    use base64::Engine as _;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = RealCluster::start(&rt, Options::new("mine"));
    // What the dev user alice may do on "your" cluster: you grant it, as the banner says.
    let grant = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "pod-reader"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "kube-relay-dev-alice"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "pod-reader"},
         "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "alice"}]}]});
    cluster.admin_ok(&["apply", "-f", "-"], Some(&grant.to_string()));
    let tmp = tempfile::tempdir().unwrap();
    let mine = tmp.path().join("my-kubeconfig");
    let ca = base64::engine::general_purpose::STANDARD.encode(&cluster.ca_pem);
    std::fs::write(
        &mine,
        serde_json::json!({"apiVersion": "v1", "kind": "Config", "current-context": "kind-mine",
            "clusters": [{"name": "kind-mine", "cluster": {
                "server": format!("https://127.0.0.1:{}", cluster.port),
                "certificate-authority-data": ca}}],
            "users": [{"name": "kind-mine", "user": {"token": cluster.relay_sa_token()}}],
            "contexts": [{"name": "kind-mine", "context": {"cluster": "kind-mine", "user": "kind-mine"}}]})
        .to_string(),
    )
    .unwrap();
    let dev = rt
        .block_on(kube_relay::dev::start(kube_relay::dev::DevOptions {
            dir: tmp.path().join("dev"),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            exe: std::path::PathBuf::from(env!("CARGO_BIN_EXE_kube-relay")),
            add_contexts: vec!["kind-mine".into()],
            contexts_from: Some(mine.clone()),
        }))
        .expect("dev starts with the added context");
    rt.block_on(wait_ready(dev.admin_addr.unwrap()));
    let banner = kube_relay::dev::banner(&dev);
    assert!(
        banner.contains("kubectl --context kind-mine auth whoami"),
        "{banner}"
    );
    let k = |args: &[&str]| {
        let mut c = std::process::Command::new(kubectl("1.33"));
        c.arg("--kubeconfig")
            .arg(&dev.kubeconfig)
            .args(["--context", "kind-mine"])
            .args(args)
            .env("HOME", tmp.path());
        run(c, None, T)
    };
    let out = ok(&k(&["get", "pods"]), "get pods on the added context");
    assert!(out.contains("web-0") && out.contains("Running"), "{out}");
    let who: serde_json::Value =
        serde_json::from_str(&ok(&k(&["auth", "whoami", "-o", "json"]), "whoami")).unwrap();
    assert_eq!(who["status"]["userInfo"]["username"], "alice", "{who}");
    assert!(
        who["status"]["userInfo"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == "dev:admins"),
        "{who}"
    );
    // RBAC of the real cluster still applies to the impersonated dev user.
    let denied = k(&["delete", "pod", "web-0"]);
    assert!(
        String::from_utf8_lossy(&denied.stderr)
            .contains("User \"alice\" cannot delete resource \"pods\""),
        "{denied:?}"
    );
    // The simulated clusters are still there beside it.
    ok(
        &k(&["--context", "alpha", "get", "pods"]),
        "alpha beside it",
    );
    // A context the relay cannot use is refused before anything starts, with the reason.
    let err = rt
        .block_on(kube_relay::dev::start(kube_relay::dev::DevOptions {
            dir: tmp.path().join("dev2"),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            exe: std::path::PathBuf::from(env!("CARGO_BIN_EXE_kube-relay")),
            add_contexts: vec!["nope".into()],
            contexts_from: Some(mine),
        }))
        .err()
        .expect("an unknown context is refused");
    assert!(
        format!("{err:#}").contains("no context named \"nope\""),
        "{err:#}"
    );
    rt.block_on(dev.stop());
}
