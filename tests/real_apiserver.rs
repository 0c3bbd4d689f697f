//! The relay in front of a real kube-apiserver (built from its Go modules by testbed/build.sh).

mod support;

use std::time::Duration;

use support::real::*;
use support::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn smoke_passthrough_get_exec_logs() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let idp = rt.block_on(EntraIdp::start());
    let cluster = RealCluster::start(&rt, Options::new("east").entra(&idp));
    let alice = idp.user_token(OID_ALICE, &[GROUP_OPS]);
    cluster.wait_for_jwt(&alice);
    let front = Front::start(
        &rt,
        &idp,
        &[Upstream {
            cluster: &cluster,
            upstream_auth: "{mode: passthrough}".into(),
            access: format!("[{{groups: [{GROUP_OPS}]}}]"),
        }],
        &[("alice", alice)],
        "",
    );
    let mut c = front.kubectl("1.33", "east");
    c.args(["get", "pods"]);
    let out = ok(&run(c, None, T), "get pods");
    assert!(out.contains("web-0") && out.contains("Running"), "{out}");
    let mut c = front.kubectl("1.33", "east");
    c.args(["exec", "-i", "web-0", "--", "cat"]);
    let out = ok(&run(c, Some(b"hello real apiserver\n"), T), "exec");
    assert_eq!(out, "hello real apiserver\n");
    let mut c = front.kubectl("1.29", "east-sni");
    c.args(["logs", "web-0", "--tail=2"]);
    let out = ok(&run(c, None, T), "logs");
    assert_eq!(out.lines().count(), 2, "{out}");
}
