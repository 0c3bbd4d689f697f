//! The stage for `scripts/bench`: everything the relay needs around it, in one process, with the
//! files the relay, nginx and the load generators read.
//!
//! ```text
//! cargo run --release --example bench_stage -- DIR
//! ```
//!
//! Starts the dev OIDC issuer (ES256, TLS) and one simulated cluster `alpha` (TLS, its own CA),
//! writes into DIR: the relay's CA and serving certificate (`ca.crt`, `relay.crt`, `relay.key`),
//! a certificate for nginx's static upstream (`static.crt`, `static.key`, CA `static-ca.crt`),
//! the cluster's CA (`alpha-ca.crt`), `relay.yaml` (clusters `alpha` → kube-sim and `static` →
//! nginx static upstream, both `impersonate`, and `static-pt` → the same upstream in
//! `passthrough`; audit records to `audit.log`), `alice.jwt` (a token valid for two hours),
//! `entra.jwt` (the same user with an Entra-sized token, ~3 KB), `relay-token` and
//! `direct-token` (static tokens kube-sim accepts), and `stage.json` with the addresses. Ports for the relay, its admin listener and nginx are picked free here.
//!
//! Shared by the example's `main.rs` and `tests/e2e/bench_harness.rs` (which runs the stage in its
//! own process and the harness against it).

use std::net::SocketAddr;
use std::path::Path;
use std::time::SystemTime;

use kube_sim::issuer::{DevIssuer, KeyAlg};
use kube_sim::pki::TestCa;
use kube_sim::record::UserInfo;
use kube_sim::server::{JwtIssuer, SimAuth, SimConfig, StaticToken};
use serde_json::json;
use tokio::net::TcpListener;

const AUDIENCE: &str = "kube-relay";
const SIM_HOST: &str = "alpha.kube-sim.localhost";
const STATIC_HOST: &str = "static.bench.localhost";

/// A free loopback port below the kernel's ephemeral range (32768 and up by default), so no
/// outgoing connection or `bind(0)` elsewhere on the machine (tests run beside the stage) takes
/// it between now and the moment nginx or the relay binds it.
fn free_port() -> anyhow::Result<u16> {
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    let start = (uuid::Uuid::new_v4().as_u128() % u128::from(SPAN)) as u16;
    for i in 0..SPAN {
        let port = FIRST + (start + i) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port in {FIRST}-{}", FIRST + SPAN - 1)
}

fn write(dir: &Path, name: &str, contents: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join(name), contents)?;
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The running stage: the issuer and the simulated cluster; dropping it stops both.
pub struct Stage {
    pub info: serde_json::Value,
    sim: kube_sim::server::SimHandle,
    issuer: kube_sim::issuer::IssuerHandle,
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.sim.shutdown();
        self.issuer.shutdown();
    }
}

/// Starts the issuer and the simulated cluster, writes every file into `dir` (also
/// `stage.json`, the addresses) and returns the running stage.
pub async fn start(dir: &Path) -> anyhow::Result<Stage> {
    kube_relay::install_crypto_provider();
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;

    let relay_ca = TestCa::new("kube-relay bench CA")?;
    let relay_leaf = relay_ca.issue(&[
        "localhost",
        "relay.localhost",
        "*.relay.localhost",
        "127.0.0.1",
    ])?;
    write(&dir, "ca.crt", relay_ca.cert_pem())?;
    write(&dir, "relay.crt", &relay_leaf.cert_pem)?;
    write(&dir, "relay.key", &relay_leaf.key_pem)?;

    let static_ca = TestCa::new("bench static upstream CA")?;
    let static_leaf = static_ca.issue(&[STATIC_HOST, "127.0.0.1"])?;
    write(&dir, "static-ca.crt", static_ca.cert_pem())?;
    write(&dir, "static.crt", &static_leaf.cert_pem)?;
    write(&dir, "static.key", &static_leaf.key_pem)?;

    let issuer_listener = TcpListener::bind("127.0.0.1:0").await?;
    let issuer_url = format!("https://127.0.0.1:{}", issuer_listener.local_addr()?.port());
    let issuer = DevIssuer::generate(&issuer_url, KeyAlg::Es256)?;
    let issuer_leaf = relay_ca.issue(&["127.0.0.1", "localhost"])?;
    let issuer_handle = kube_sim::issuer::serve(
        issuer_listener,
        Some(kube_sim::server::tls_config(&issuer_leaf)?),
        issuer.clone(),
    )
    .await?;

    let relay_token = uuid::Uuid::new_v4().simple().to_string();
    let direct_token = uuid::Uuid::new_v4().simple().to_string();
    write(&dir, "relay-token", &relay_token)?;
    write(&dir, "direct-token", &direct_token)?;
    let now = unix_now();
    let jwt = issuer.mint(json!({
        "sub": "alice", "aud": AUDIENCE, "name": "alice", "groups": ["dev:admins"],
        "iat": now, "nbf": now, "exp": now + 7200,
    }));
    write(&dir, "alice.jwt", &jwt)?;
    // An Entra-sized token for the fair scenario: a real Entra access token with ~40 groups and
    // the usual claims is 2-4 KB, and its size is what the relay parses, verifies, hashes for
    // its cache and (in passthrough) sends upstream on every request.
    let groups: Vec<String> = (0..40)
        .map(|i| format!("{i:08x}-5b1f-4c2e-9d3a-{:012x}", 0x2a17_0000_u64 + i))
        .collect();
    let entra = issuer.mint(json!({
        "sub": "alice", "aud": AUDIENCE, "name": "Alice Example", "groups": groups,
        "iat": now, "nbf": now, "exp": now + 7200,
        "oid": "a1a1a1a1-0000-4000-8000-000000000001",
        "tid": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "upn": "alice@contoso.example", "unique_name": "alice@contoso.example",
        "scp": "user_impersonation", "ver": "1.0", "appid": "04b07795-8ddb-461a-bbee-02f9e1bf7b46",
        "amr": ["pwd", "mfa"], "ipaddr": "203.0.113.7", "family_name": "Example",
        "given_name": "Alice", "idtyp": "user", "acr": "1",
        "aio": "AVQAq/8ZAAAAbWZr0M2x7Lq8w9kq3nV4cJd1pR6tYs5eXo2uGfHi7jK1lN0mBv9cQ3wZ4aS8dF2gH5jK7lP0oI9uY6tR3eW1qA==",
        "rh": "0.AXwAv4j5cvGGr0GRqy180BHbR5V3sATbjRpGu-4C-eG_e0Z8AAA.",
        "uti": "k3J9mQ2xR0aV7bN4cL8dPw", "wids": ["b79fbf4d-3ef9-4689-8143-76b194e85509"],
        "xms_tcdt": 1_600_000_000u64,
    }));
    write(&dir, "entra.jwt", &entra)?;

    let sim_ca = TestCa::new("kube-sim alpha bench CA")?;
    let sim_leaf = sim_ca.issue(&[SIM_HOST, "localhost", "127.0.0.1"])?;
    write(&dir, "alpha-ca.crt", sim_ca.cert_pem())?;
    let sim = kube_sim::server::start(
        TcpListener::bind("127.0.0.1:0").await?,
        Some(kube_sim::server::tls_config(&sim_leaf)?),
        SimConfig {
            name: "alpha".to_owned(),
            git_version: "v1.31.2".to_owned(),
            auth: SimAuth {
                static_tokens: vec![
                    StaticToken {
                        token: relay_token.clone(),
                        user: UserInfo {
                            username: "system:serviceaccount:kube-system:kube-relay".to_owned(),
                            ..UserInfo::default()
                        },
                        can_impersonate: true,
                    },
                    StaticToken {
                        token: direct_token.clone(),
                        user: UserInfo {
                            username: "alice".to_owned(),
                            groups: vec!["dev:admins".to_owned()],
                            ..UserInfo::default()
                        },
                        can_impersonate: false,
                    },
                ],
                jwt: vec![JwtIssuer {
                    issuer: issuer.issuer_url(),
                    audiences: vec![AUDIENCE.to_owned()],
                    jwks: issuer.jwks(),
                }],
            },
        },
    )
    .await?;

    let relay: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let static_port = free_port()?;
    let nginx_static_proxy = free_port()?;
    let nginx_sim_proxy = free_port()?;
    let relay_yaml = format!(
        r#"# Written by examples/bench_stage.rs for scripts/bench.
listen: {relay}
public_url: https://localhost:{relay_port}
tls: {{cert_file: relay.crt, key_file: relay.key}}
admin: {{listen: {admin}}}
routing: {{host_suffix: relay.localhost, path_prefix: /clusters}}
identity:
  issuers:
    - {{name: dev, kind: oidc, issuer: {issuer_url}, audiences: [{AUDIENCE}], ca_file: ca.crt}}
clusters:
  - name: alpha
    server: https://{SIM_HOST}:{sim_port}
    connect: 127.0.0.1:{sim_port}
    ca_file: alpha-ca.crt
    upstream_auth: {{mode: impersonate, token_file: relay-token}}
    access: [{{users: [dev/alice]}}]
  - name: static
    server: https://{STATIC_HOST}:{static_port}
    connect: 127.0.0.1:{static_port}
    ca_file: static-ca.crt
    upstream_auth: {{mode: impersonate, token_file: relay-token}}
    access: [{{users: [dev/alice]}}]
  # The fair scenario's cluster: the caller's own token goes upstream (the static upstream
  # ignores it), as for an AKS cluster in passthrough mode.
  - name: static-pt
    server: https://{STATIC_HOST}:{static_port}
    connect: 127.0.0.1:{static_port}
    ca_file: static-ca.crt
    upstream_auth: {{mode: passthrough}}
    access: [{{users: [dev/alice]}}]
# Every request gets its audit record, written to a file (as nginx writes its access log).
audit: {{path: audit.log}}
# One benchmark identity sends everything: per-identity limits stay on, out of reach.
limits:
  max_connections: 20000
  per_identity_requests_per_second: 10000000
  per_identity_burst: 10000000
  per_identity_streams: 20000
"#,
        relay_port = relay.port(),
        sim_port = sim.addr.port(),
    );
    write(&dir, "relay.yaml", &relay_yaml)?;
    // Fail here, not in the relay, if the file does not load.
    kube_relay::config::load(&dir.join("relay.yaml"))
        .map_err(|e| anyhow::anyhow!("relay.yaml: {e}"))?;

    let info = json!({
        "dir": dir.display().to_string(),
        "issuer": issuer_url,
        "sim": sim.addr.to_string(),
        "sim_host": SIM_HOST,
        "static_host": STATIC_HOST,
        "relay": relay.to_string(),
        "admin": admin.to_string(),
        "static_port": static_port,
        "nginx_static_proxy": nginx_static_proxy,
        "nginx_sim_proxy": nginx_sim_proxy,
    });
    write(&dir, "stage.json", &info.to_string())?;
    Ok(Stage {
        info,
        sim,
        issuer: issuer_handle,
    })
}
