//! GET through the relay to a real kube-apiserver, against the same GET straight to it
//! (`scripts/bench` runs this and puts the result in docs/perf).
//!
//! ```text
//! cargo bench --bench real_apiserver -- [--seconds N] [--rounds N] [--relay-bin PATH]
//! ```
//!
//! `--relay-bin` measures another build of the relay (scripts/bench passes the one the rest of
//! its run measures, such as the profile-guided build); the default is the one built with this
//! bench.
//!
//! The test bed of `tests/support/real.rs` (etcd and kube-apiserver built by `testbed/build.sh`,
//! trusting the tests' Entra-shaped issuer) and the relay built with this bench, as its own
//! process, in front of it with three entries for the one cluster: `bench` (passthrough: the
//! caller's token goes to the API server, as it does on the direct path), `bench-imp`
//! (impersonate, with the relay's client certificate: all 40 groups named upstream) and
//! `bench-few` (the same with `forward_groups` listing the one group RBAC binds). Beside them,
//! when nginx is installed (`scripts/bench` installs it), the fair scenario's peer: nginx as a
//! plain TLS reverse proxy to the same API server (HTTP/1.1 keep-alive upstream, certificate
//! verification, a buffered access log), passing the caller's token on as passthrough does.
//! It shows what any proxy sharing these two cores with the API server costs. Every side gets
//! the same request with the same Entra-sized token (40 groups); h2load runs the sides in turn,
//! `-c 16 -m 4` (64 at once: enough to keep both cores busy, and below what the API server's
//! priority and fairness lets one user have in flight before it answers 429). Printed as one
//! JSON object on standard output: per side the median of the rounds, and its ratio to
//! direct as the median of the rounds' ratios (each round against direct in that round).
// A bench binary has no outside users, so `pub` in its support code means "shared here".
#![allow(unreachable_pub, dead_code)]
// Test code may use std locks: poisoning there only fails the bench that panicked.
#![allow(clippy::disallowed_types)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::real::{Front, Options, RealCluster, Upstream, GROUP_OPS, OID_ALICE, PODS};

const POD: &str = "/api/v1/namespaces/default/pods";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seconds = arg("--seconds", 8);
    let relay_bin: PathBuf = args
        .iter()
        .position(|a| a == "--relay-bin")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| env!("CARGO_BIN_EXE_kube-relay").into(), PathBuf::from);
    let rounds = arg("--rounds", 3);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let idp = rt.block_on(support::real::EntraIdp::start());
    let cluster = RealCluster::start(&rt, Options::new("bench").entra(&idp));
    // An Entra-sized token: 40 groups (ops, which RBAC makes cluster-admin, and 39 more).
    let extra: Vec<String> = (1..40)
        .map(|i| format!("{i:08x}-5b1f-4c2e-9d3a-00002a17{i:04x}"))
        .collect();
    let mut groups: Vec<&str> = vec![GROUP_OPS];
    groups.extend(extra.iter().map(String::as_str));
    let token = idp.user_token(OID_ALICE, &groups);
    cluster.wait_for_jwt(&token);
    let access = format!("[{{groups: [{GROUP_OPS}]}}]");
    // The in-process relay of `Front` writes the configuration and certificates; the relay
    // measured is the built binary, started on that configuration with its own listeners.
    let front = Front::start(
        &rt,
        &idp,
        &[
            Upstream {
                cluster: &cluster,
                alias: None,
                connect_port: None,
                upstream_auth: "{mode: passthrough}".into(),
                access: access.clone(),
            },
            Upstream {
                cluster: &cluster,
                alias: Some("bench-imp".into()),
                connect_port: None,
                upstream_auth: "{mode: impersonate, client_cert_file: bench-relay.crt, client_key_file: bench-relay.key}".into(),
                access: access.clone(),
            },
            // Impersonation naming only the group RBAC binds (upstream_auth.forward_groups).
            Upstream {
                cluster: &cluster,
                alias: Some("bench-few".into()),
                connect_port: None,
                upstream_auth: format!("{{mode: impersonate, client_cert_file: bench-relay.crt, client_key_file: bench-relay.key, forward_groups: [{GROUP_OPS}]}}"),
                access,
            },
        ],
        &[("alice", token.clone())],
        "",
    );
    let relay = Relay::start(&relay_bin, front.dir());
    let nginx = Nginx::start(front.dir(), &cluster);

    let pod = format!("{POD}/{}", PODS[0]);
    let relay_group = vec![relay.child.id()];
    // (name, URL, the proxy's processes whose CPU is measured)
    let mut sides = vec![(
        "direct",
        format!("https://127.0.0.1:{}{pod}", cluster.port),
        Vec::new(),
    )];
    match &nginx {
        Some(n) => sides.push((
            "nginx",
            format!("https://127.0.0.1:{}{pod}", n.port),
            vec![n.child.id()],
        )),
        None => eprintln!("real apiserver: nginx is not installed; its side is left out"),
    }
    sides.extend([
        (
            "relay passthrough",
            format!("https://127.0.0.1:{}/clusters/bench{pod}", relay.port),
            relay_group.clone(),
        ),
        (
            "relay impersonate",
            format!("https://127.0.0.1:{}/clusters/bench-imp{pod}", relay.port),
            relay_group.clone(),
        ),
        (
            "relay impersonate, forward_groups",
            format!("https://127.0.0.1:{}/clusters/bench-few{pod}", relay.port),
            relay_group,
        ),
    ]);
    let header = format!("authorization: Bearer {token}");
    for (name, url, _) in &sides {
        // Warm-up, and a check that every side answers 200.
        let r = h2load(url, &header, 2);
        assert!(r.done > 0 && r.not_2xx == 0, "{name}: {r:?}");
    }
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); sides.len()];
    let groups = cluster.control_plane_groups();
    for round in 0..rounds {
        for (i, (name, url, proxy)) in sides.iter().enumerate() {
            let (cp0, proxy0) = (cpu_ticks(&groups), cpu_ticks(proxy));
            let mut r = h2load(url, &header, seconds);
            // Per request of the whole run (h2load's warm-up second included).
            let reqs = r.done as f64 * (seconds + 1) as f64 / seconds as f64;
            let per_req = |ticks: u64| ticks as f64 / ticks_per_second() / reqs.max(1.0) * 1e6;
            r.control_plane_us = per_req(cpu_ticks(&groups) - cp0);
            r.proxy_us = per_req(cpu_ticks(proxy) - proxy0);
            eprintln!(
                "real apiserver round {} {name:34} {:8.0} req/s ({} done; {}); CPU per request: \
                 API server and etcd {:.0} µs, proxy {:.0} µs",
                round + 1,
                r.rps,
                r.done,
                r.codes,
                r.control_plane_us,
                r.proxy_us,
            );
            runs[i].push(r);
        }
    }
    let median = |runs: &[Run], f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut out = serde_json::Map::new();
    for (i, (name, _, _)) in sides.iter().enumerate() {
        let rps = median(&runs[i], |r| r.rps);
        let proxy_us = median(&runs[i], |r| r.proxy_us);
        // Each round against direct in the same round: the API server's own speed drifts
        // over a run (its CPU per request moved between 330 and 430 µs in one), so medians
        // taken apart would compare different moments.
        let mut ratios: Vec<f64> = runs[i]
            .iter()
            .zip(&runs[0])
            .map(|(r, d)| r.rps / d.rps.max(1.0))
            .collect();
        let round_ratios = ratios.clone();
        ratios.sort_by(f64::total_cmp);
        let ratio = ratios[ratios.len() / 2];
        let mut side = serde_json::json!({"rps": rps, "ratio_to_direct": ratio,
                               "round_ratios": round_ratios,
                               "control_plane_cpu_us_per_req": median(&runs[i], |r| r.control_plane_us),
                               "proxy_cpu_us_per_req": proxy_us,
                               "rounds": runs[i].iter().map(|r| r.rps).collect::<Vec<_>>(),
                               "not_2xx": runs[i].iter().map(|r| r.not_2xx).sum::<u64>()});
        if name.starts_with("relay") {
            side["relay_cpu_us_per_req"] = proxy_us.into();
        }
        out.insert((*name).to_owned(), side);
    }
    out.insert("token_bytes".into(), token.len().into());
    out.insert("seconds".into(), seconds.into());
    println!("{}", serde_json::Value::Object(out));
    drop(nginx);
    drop(relay);
}

/// nginx in front of the API server, configured as the fair scenario's peer (scripts/bench).
struct Nginx {
    child: std::process::Child,
    exe: PathBuf,
    conf: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    /// None when nginx is not installed.
    fn start(dir: &Path, cluster: &RealCluster) -> Option<Self> {
        let exe = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())?;
        let port = free_port();
        let d = dir.display();
        std::fs::create_dir_all(dir.join("nginx-tmp")).expect("nginx-tmp");
        std::fs::write(dir.join("nginx-upstream-ca.crt"), &cluster.ca_pem).expect("CA file");
        // `user root`: the files are in a directory only this user reads (nginx ignores the
        // line, with a warning, when not started as root).
        let conf = format!(
            r#"daemon off;
user root;
worker_processes 2;
error_log {d}/nginx-error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {d}/nginx-tmp;
    proxy_temp_path {d}/nginx-tmp;
    fastcgi_temp_path {d}/nginx-tmp;
    uwsgi_temp_path {d}/nginx-tmp;
    scgi_temp_path {d}/nginx-tmp;
    keepalive_requests 10000000;
    ssl_protocols TLSv1.2 TLSv1.3;
    upstream apiserver {{ server 127.0.0.1:{up}; keepalive 128; keepalive_requests 10000000; }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {d}/relay.crt;
        ssl_certificate_key {d}/relay.key;
        access_log {d}/nginx-access.log combined buffer=64k flush=1s;
        location / {{
            proxy_pass https://apiserver;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {d}/nginx-upstream-ca.crt;
            proxy_ssl_name {name};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_buffering off;
        }}
    }}
}}
"#,
            up = cluster.port,
            name = cluster.server_name,
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("nginx.conf");
        let log = std::fs::File::create(dir.join("nginx.stderr")).expect("log");
        let child = Command::new(&exe)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: the workers' CPU is counted with the master's.
            .process_group(0)
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx {
            child,
            exe,
            conf: conf_path,
            dir: dir.to_owned(),
            port,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!(
                    "nginx exited ({status}):
{}",
                    std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(nginx)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // `-s stop` reaches the workers too (killing the master alone would leave them).
        let _ = Command::new(&self.exe)
            .arg("-c")
            .arg(&self.conf)
            .arg("-p")
            .arg(&self.dir)
            .args(["-s", "stop"])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// The relay binary built with this bench, on `dir/relay.yaml` with fixed loopback ports.
struct Relay {
    child: std::process::Child,
    port: u16,
}

impl Relay {
    /// The relay at `bin`, as its own process.
    fn start(bin: &Path, dir: &Path) -> Self {
        let port = free_port();
        let admin = free_port();
        let text = std::fs::read_to_string(dir.join("relay.yaml")).expect("relay.yaml");
        let text = text.replacen(
            "listen: 127.0.0.1:0",
            &format!("listen: 127.0.0.1:{port}\nadmin: {{listen: 127.0.0.1:{admin}}}"),
            1,
        );
        let config = dir.join("bench-relay.yaml");
        std::fs::write(&config, text).expect("bench-relay.yaml");
        let log = std::fs::File::create(dir.join("bench-relay.log")).expect("log");
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the relay");
        let mut relay = Relay { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !ready(admin) {
            if let Ok(Some(status)) = relay.child.try_wait() {
                panic!(
                    "the relay exited ({status}):\n{}",
                    std::fs::read_to_string(dir.join("bench-relay.log")).unwrap_or_default()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay was not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        relay.port = port;
        relay
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `GET /readyz` on the admin listener answers 200.
fn ready(admin: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

/// user + system clock ticks of every process in these process groups.
fn cpu_ticks(groups: &[u32]) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command name (which may hold spaces): state, ppid, pgrp, ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let pid: u32 = entry.file_name().to_string_lossy().parse().unwrap_or(0);
        let pgrp: u32 = f.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
        if groups.contains(&pgrp) || groups.contains(&pid) {
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            total += t(11) + t(12);
        }
    }
    total
}

fn ticks_per_second() -> f64 {
    // The kernel's USER_HZ; 100 on every Linux this runs on (getconf CLK_TCK).
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

#[derive(Clone, Debug)]
struct Run {
    rps: f64,
    done: u64,
    /// Answers other than 2xx (warm-up included), from h2load's `status codes:` line.
    not_2xx: u64,
    codes: String,
    /// CPU per request of kube-apiserver with etcd, and of the proxy (none for direct), in µs.
    control_plane_us: f64,
    proxy_us: f64,
}

/// `h2load -c 16 -m 4` for `seconds` after a one-second warm-up.
fn h2load(url: &str, header: &str, seconds: u64) -> Run {
    let out = Command::new("h2load")
        .args(["-c", "16", "-m", "4", "-D"])
        .arg(seconds.to_string())
        .args(["--warm-up-time", "1", "-H", header, url])
        .stdin(Stdio::null())
        .output()
        .expect("h2load (Debian nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    let number_before = |marker: &str| -> Option<f64> {
        let at = text.find(marker)?;
        text[..at].split_whitespace().last()?.parse().ok()
    };
    let done = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(", ").find(|p| p.ends_with(" done")))
        .and_then(|p| p.trim_end_matches(" done").trim().parse().ok())
        .unwrap_or(0);
    Run {
        rps: number_before(" req/s").unwrap_or(0.0),
        done,
        not_2xx: [" 3xx", " 4xx", " 5xx"]
            .iter()
            .map(|m| number_before(m).unwrap_or(0.0) as u64)
            .sum(),
        codes: text
            .lines()
            .find(|l| l.starts_with("status codes:"))
            .unwrap_or("")
            .to_owned(),
        control_plane_us: 0.0,
        proxy_us: 0.0,
    }
}
