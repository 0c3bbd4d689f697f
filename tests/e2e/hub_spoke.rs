//! Hub/spoke topology (issue 5 item 8): clients live in an "internet" network namespace and can
//! reach only the relay in the "hub"; only the hub reaches the two "spokes" where the simulated
//! private API servers live. kubectl crosses the relay; the spokes stay unreachable from outside.
//!
//! The namespaces and veth links are created by this test and removed when it ends. Addresses
//! come from the documentation range 198.51.100.0/24 and exist only on those links. The test
//! needs root and `ip netns`; without them it fails and says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;
use base64::Engine as _;
use serde_json::json;

const INET_IP: &str = "198.51.100.1";
const HUB_IP: &str = "198.51.100.2";
const HUB_S1: &str = "198.51.100.5";
const S1_IP: &str = "198.51.100.6";
const HUB_S2: &str = "198.51.100.9";
const S2_IP: &str = "198.51.100.10";

struct Topology {
    tag: String,
    children: Vec<Child>,
}

impl Topology {
    fn ns(&self, role: &str) -> String {
        format!("kr{}-{role}", self.tag)
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "`ip {}` failed: {}\nThe hub/spoke test needs root and iproute2 network namespaces.",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn link(&mut self, a: &str, a_ip: &str, b: &str, b_ip: &str, n: u8) {
        let (va, vb) = (format!("k{}a{n}", self.tag), format!("k{}b{n}", self.tag));
        self.ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        let (na, nb) = (self.ns(a), self.ns(b));
        self.ip(&["link", "set", &va, "netns", &na]);
        self.ip(&["link", "set", &vb, "netns", &nb]);
        self.ip(&["-n", &na, "addr", "add", &format!("{a_ip}/30"), "dev", &va]);
        self.ip(&["-n", &nb, "addr", "add", &format!("{b_ip}/30"), "dev", &vb]);
        self.ip(&["-n", &na, "link", "set", &va, "up"]);
        self.ip(&["-n", &nb, "link", "set", &vb, "up"]);
    }

    fn build() -> Self {
        // Short and unique per run: interface names are limited to 15 characters.
        let tag = format!("{}", std::process::id() % 100_000);
        let mut t = Self {
            tag,
            children: Vec::new(),
        };
        for role in ["inet", "hub", "s1", "s2"] {
            let ns = t.ns(role);
            t.ip(&["netns", "add", &ns]);
            t.ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        t.link("inet", INET_IP, "hub", HUB_IP, 0);
        t.link("hub", HUB_S1, "s1", S1_IP, 1);
        t.link("hub", HUB_S2, "s2", S2_IP, 2);
        // The hub forwards nothing: clients reach the relay's socket, never the spokes.
        let hub = t.ns("hub");
        t.ip(&[
            "netns",
            "exec",
            &hub,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=0",
        ]);
        t
    }

    fn spawn(&mut self, role: &str, program: &Path, args: &[&str], log: &Path) {
        let err = std::fs::File::create(log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn in namespace");
        self.children.push(child);
    }

    fn exec(
        &self,
        role: &str,
        program: &Path,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> std::process::Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(role)])
            .arg(program)
            .args(args);
        run(c, stdin, Duration::from_secs(60))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for role in ["inet", "hub", "s1", "s2"] {
            // Deleting a namespace removes its veth ends (and their peers).
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(role)])
                .status();
        }
    }
}

fn sibling_binary(name: &str) -> PathBuf {
    // Integration tests live in target/<profile>/deps; workspace binaries one level up.
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} not built (cargo test --workspace builds it)",
        p.display()
    );
    p
}

fn wait_for(path: &Path) {
    let what = format!("{} appears", path.display());
    crate::support::eventually_blocking(
        &what,
        Duration::from_secs(20),
        Duration::from_millis(20),
        || path.exists().then_some(()).ok_or("missing"),
    )
}

#[test]
fn kubectl_crosses_the_hub_and_the_spokes_stay_private() {
    kube_relay::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut t = Topology::build();
    let sim = sibling_binary("kube-sim");
    let relay_bin = PathBuf::from(env!("CARGO_BIN_EXE_kube-relay"));

    for (role, ip, name) in [("s1", S1_IP, "alpha"), ("s2", S2_IP, "beta")] {
        let tls_dir = d.join(name);
        let listen = format!("{ip}:6443");
        let san = format!("{name}.spoke.test");
        let tls_dir_s = tls_dir.display().to_string();
        t.spawn(
            role,
            &sim,
            &[
                "serve",
                "--listen",
                &listen,
                "--name",
                name,
                "--tls-dir",
                &tls_dir_s,
                "--san",
                &san,
                "--token",
                "relay-sa-token:kube-relay:impersonator",
            ],
            &d.join(format!("{name}.log")),
        );
        wait_for(&tls_dir.join("ca.crt"));
    }
    let issuer_dir = d.join("issuer");
    let issuer_dir_s = issuer_dir.display().to_string();
    t.spawn(
        "hub",
        &sim,
        &[
            "issuer",
            "--listen",
            "127.0.0.1:9443",
            "--dir",
            &issuer_dir_s,
        ],
        &d.join("issuer.log"),
    );
    wait_for(&issuer_dir.join("issuer.json"));

    // The relay in the hub.
    let ca = kube_sim::pki::TestCa::new("hub relay CA").unwrap();
    let leaf = ca.issue(&[HUB_IP, "relay.test", "*.relay.test"]).unwrap();
    std::fs::write(d.join("relay.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(d.join("relay.key"), &leaf.key_pem).unwrap();
    std::fs::write(d.join("relay-token"), "relay-sa-token").unwrap();
    let yaml = format!(
        r#"listen: {HUB_IP}:8443
public_url: https://relay.test
tls: {{cert_file: relay.crt, key_file: relay.key}}
admin: {{listen: 127.0.0.1:9090}}
audit: {{path: audit.jsonl}}
routing: {{host_suffix: relay.test}}
identity:
  issuers:
    - {{name: dev, kind: oidc, issuer: "https://127.0.0.1:9443", audiences: [kube-relay], ca_file: issuer/ca.crt}}
clusters:
  - {{name: alpha, server: "https://alpha.spoke.test:6443", connect: "{S1_IP}:6443", ca_file: alpha/ca.crt,
      upstream_auth: {{mode: impersonate, token_file: relay-token}}, access: [{{users: [dev/alice]}}]}}
  - {{name: beta, server: "https://beta.spoke.test:6443", connect: "{S2_IP}:6443", ca_file: beta/ca.crt,
      upstream_auth: {{mode: impersonate, token_file: relay-token}}, access: [{{users: [dev/alice]}}]}}
"#
    );
    let cfg = d.join("relay.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let cfg_s = cfg.display().to_string();
    t.spawn(
        "hub",
        &relay_bin,
        &["serve", "--config", &cfg_s],
        &d.join("relay.log"),
    );

    // A client in the "internet" namespace with a kubeconfig for the relay only.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(issuer_dir.join("issuer.json")).unwrap())
            .unwrap();
    let issuer = kube_sim::issuer::DevIssuer::from_pkcs8_pem(
        meta["issuer"].as_str().unwrap(),
        kube_sim::issuer::KeyAlg::Es256,
        &std::fs::read_to_string(issuer_dir.join("issuer.key")).unwrap(),
    )
    .unwrap();
    let token = issuer.mint(json!({"sub": "alice", "aud": "kube-relay"}));
    let ca_b64 = base64::engine::general_purpose::STANDARD.encode(ca.cert_pem());
    let cluster = |name: &str, server: String| json!({"name": name, "cluster": {"server": server, "tls-server-name": format!("{}.relay.test", name.trim_end_matches("-sni")), "certificate-authority-data": ca_b64}});
    let kubeconfig = d.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        serde_json::to_string(&json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "alpha",
            "clusters": [cluster("alpha", format!("https://{HUB_IP}:8443/clusters/alpha")), cluster("beta-sni", format!("https://{HUB_IP}:8443"))],
            "users": [{"name": "alice", "user": {"token": token}}],
            "contexts": [
                {"name": "alpha", "context": {"cluster": "alpha", "user": "alice", "namespace": "default"}},
                {"name": "beta-sni", "context": {"cluster": "beta-sni", "user": "alice", "namespace": "default"}}],
        }))
        .unwrap(),
    )
    .unwrap();
    let kc = kubectl("1.33");
    let home = d.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let home_s = home.display().to_string();
    let kcfg = kubeconfig.display().to_string();
    let k = |args: &[&str], stdin: Option<&[u8]>| {
        let mut all = vec!["env".to_string(), format!("HOME={home_s}")];
        all.push(kc.display().to_string());
        all.extend(["--kubeconfig".to_string(), kcfg.clone()]);
        all.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        t.exec("inet", Path::new(refs[0]), &refs[1..], stdin)
    };

    // Wait (bounded) for the relay to answer through the hub.
    let out = crate::support::eventually_blocking(
        "the relay answers across the hub",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let out = k(&["get", "pods", "--request-timeout=5s"], None);
            if out.status.success() {
                Ok(out)
            } else {
                Err(format!(
                    "{}\nrelay log:\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(d.join("relay.log")).unwrap_or_default()
                ))
            }
        },
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("web-0"));
    // Path routing to alpha, SNI routing to beta, exec and whoami across the topology.
    let out = ok(
        &k(&["--context", "beta-sni", "get", "pods"], None),
        "beta via SNI",
    );
    assert!(out.contains("web-0"));
    let out = ok(
        &k(
            &["exec", "-i", "web-0", "--", "cat"],
            Some(b"across the hub\n"),
        ),
        "exec",
    );
    assert_eq!(out, "across the hub\n");
    let out = ok(&k(&["auth", "whoami", "-o", "json"], None), "whoami");
    assert!(out.contains("\"alice\""), "{out}");

    // The spokes are unreachable from the internet namespace: no route at all.
    for target in [S1_IP, S2_IP] {
        let out = t.exec(
            "inet",
            Path::new("bash"),
            &["-c", &format!("exec 3<>/dev/tcp/{target}/6443")],
            None,
        );
        assert!(
            !out.status.success(),
            "{target} reachable from the internet namespace"
        );
    }
    // ...while the hub reaches them (the relay's path).
    let out = t.exec(
        "hub",
        Path::new("bash"),
        &["-c", &format!("exec 3<>/dev/tcp/{S1_IP}/6443")],
        None,
    );
    assert!(out.status.success(), "the hub cannot reach spoke 1");
}
