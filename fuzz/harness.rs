//! The checks every fuzz input goes through, shared by the cargo-fuzz targets (`fuzz_targets/`,
//! nightly) and by `tests/e2e/fuzz_corpus.rs` (stable), which replays the committed corpora and runs
//! proptest properties through these same functions.
//!
//! Each function takes raw bytes, never panics on its own, and `assert!`s the invariants of the
//! code under test: a panic here is a finding (either the relay panicked or an invariant broke).
//!
//! Input layouts (kept simple so corpus files are readable text):
//! - `route_resolve`: `<sni>\n<host>\n<target>`; an empty SNI or host line means "absent".
//! - `header_sanitize`: one `name: value` per line; lines that are not a valid header are skipped.
//! - `jwt_parse`: the whole input is the bearer token.
//! - `config_parse`: the whole input is YAML, parsed against a directory holding `relay.crt`,
//!   `relay.key`, `ca.crt` and `token`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use kube_relay::config::{is_cluster_name, Routing};
use kube_relay::route::{self, Route, RouteInput, UpstreamTarget};

/// The host suffix and public host every route input is resolved against.
pub const SUFFIX: &str = "relay.example.com";
pub const PREFIX: &str = "/clusters";

pub fn routing() -> Routing {
    Routing {
        host_suffix: Some(SUFFIX.to_owned()),
        path_prefix: PREFIX.to_owned(),
    }
}

/// Splits a route input into (sni, host, target).
///
/// SNI and host are passed as they come, non-ASCII included: `route::resolve` must refuse such
/// hosts without panicking (an earlier `split_at` inside a multi-byte character did).
pub fn split_route_input(data: &[u8]) -> (Option<String>, Option<String>, String) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let opt = |s: Option<&str>| s.map(str::to_owned).filter(|s| !s.is_empty());
    let sni = opt(parts.next());
    let host = opt(parts.next());
    let target = parts.next().unwrap_or("").to_owned();
    (sni, host, target)
}

/// The cluster a host name names under [`SUFFIX`], computed independently of `route.rs`
/// (case-insensitive, one trailing dot and a port ignored).
pub fn named_by_host(host: &str) -> Option<String> {
    let h = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let label = h.strip_suffix(&format!(".{SUFFIX}"))?;
    is_cluster_name(label).then(|| label.to_owned())
}

/// Checks `route::resolve` on one input and returns the cluster it routed to, if any.
pub fn route_resolve(sni: Option<&str>, host: Option<&str>, target: &str) -> Option<String> {
    let routing = routing();
    let result = route::resolve(
        &routing,
        SUFFIX,
        RouteInput {
            sni,
            hosts: [host, None],
            target,
        },
    );
    let Ok(route) = result else {
        return None;
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    // Dot segments (plain or encoded) and backslashes never route anywhere.
    for seg in path.split('/') {
        let l = seg.to_ascii_lowercase();
        assert!(
            !matches!(l.as_str(), "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e."),
            "dot segment routed: {target:?}"
        );
    }
    assert!(!path.contains('\\'), "backslash routed: {target:?}");
    match route {
        Route::Relay { path: p } => {
            // `/-`, `/-/…`, or the portal at exactly `/` (public host only, checked below).
            assert!(
                p == "/-" || p.starts_with("/-/") || p == "/",
                "relay page {p:?}"
            );
            assert!(
                sni.and_then(named_by_host).is_none(),
                "relay page on a cluster SNI: {sni:?}"
            );
            assert!(
                host.and_then(named_by_host).is_none(),
                "relay page on a cluster Host: {host:?}"
            );
            None
        }
        Route::Cluster {
            cluster,
            upstream_target,
        } => {
            assert!(
                is_cluster_name(&cluster),
                "invalid cluster name {cluster:?}"
            );
            // SNI that names a cluster wins or the request is refused: never another cluster.
            if let Some(s) = sni.and_then(named_by_host) {
                assert_eq!(cluster, s, "SNI {sni:?} routed elsewhere ({target:?})");
            }
            if let Some(h) = host.and_then(|h| named_by_host(strip_port(h))) {
                assert_eq!(
                    cluster, h,
                    "Host {host:?} disagrees with route ({target:?})"
                );
            }
            match upstream_target {
                UpstreamTarget::Whole(t) => {
                    assert_eq!(t, target);
                    // No path cluster was named, so the prefix must not have matched.
                    assert!(
                        !target.starts_with(&format!("{PREFIX}/")),
                        "prefix ignored in {target:?}"
                    );
                }
                UpstreamTarget::Suffix(s) => {
                    // The path named the cluster: the upstream target is exactly the raw suffix.
                    let head = target
                        .strip_suffix(s)
                        .unwrap_or_else(|| panic!("{s:?} is not a suffix of {target:?}"));
                    let raw = head
                        .strip_prefix(&format!("{PREFIX}/"))
                        .unwrap_or_else(|| panic!("{head:?} lacks the prefix"));
                    assert!(!raw.contains(['/', '?']), "segment {raw:?}");
                    assert!(s.is_empty() || s.starts_with(['/', '?']), "suffix {s:?}");
                    // The raw segment is the name, or the name with letters percent-encoded.
                    assert_eq!(percent_decode(raw).as_deref(), Some(cluster.as_str()));
                    let pq = UpstreamTarget::Suffix(s).to_path_and_query();
                    assert!(pq.starts_with('/'));
                }
            }
            Some(cluster)
        }
    }
}

fn strip_port(h: &str) -> &str {
    match h.rsplit_once(':') {
        Some((a, p)) if p.bytes().all(|b| b.is_ascii_digit()) => a,
        _ => h,
    }
}

/// Independent percent-decoder (strict: `%` must be followed by two hex digits).
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub fn route_resolve_bytes(data: &[u8]) {
    let (sni, host, target) = split_route_input(data);
    route_resolve(sni.as_deref(), host.as_deref(), &target);
}

// === header_sanitize ===

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "http2-settings",
];

/// Builds a header map from `name: value` lines, skipping lines that are not valid headers.
pub fn parse_headers(data: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        let value = value.strip_suffix(b"\r").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            map.append(n, v);
        }
    }
    map
}

/// Checks the header functions on one header map.
pub fn header_sanitize(input: &HeaderMap) {
    let out = kube_relay::proxy::headers::sanitize_request(input);
    let named: Vec<String> = input
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for (name, value) in &out {
        let n = name.as_str();
        assert!(!n.starts_with("impersonate-"), "{n} forwarded");
        assert!(!n.starts_with("x-remote-"), "{n} forwarded");
        assert!(!HOP_BY_HOP.contains(&n), "hop-by-hop {n} forwarded");
        assert!(
            !named.iter().any(|t| t == n),
            "{n} named in Connection forwarded"
        );
        assert!(n != "authorization" && n != "host", "{n} forwarded");
        if name == http::header::SEC_WEBSOCKET_PROTOCOL {
            // kube-apiserver splits on `,`, trims, and takes entries *starting* with the prefix
            // as bearer tokens; no forwarded entry may (the prefix inside another entry is inert).
            let v = value.to_str().expect("rebuilt from text");
            assert!(
                !v.split(',').any(|p| p
                    .trim()
                    .starts_with(kube_relay::proxy::headers::WS_BEARER_PREFIX)),
                "bearer subprotocol forwarded: {v:?}"
            );
        } else {
            // Everything else is copied, never invented or altered.
            assert!(
                input.get_all(name).iter().any(|v| v == value),
                "{n} value not from the client"
            );
        }
    }
    match kube_relay::proxy::headers::requested_impersonation(input) {
        Ok(Some(imp)) => {
            assert!(!imp.user.is_empty());
            assert!(input.contains_key("impersonate-user"));
        }
        Ok(None) => assert!(!input.keys().any(|k| k.as_str().starts_with("impersonate-"))),
        Err(_) => {}
    }
    if let Some(tok) = kube_relay::proxy::headers::ws_bearer_token(input) {
        assert!(input.contains_key(http::header::SEC_WEBSOCKET_PROTOCOL));
        let _ = tok.len();
    }
    let _ = kube_relay::proxy::headers::reject_underscore_identity_headers(input);
    let _ = kube_relay::proxy::headers::total_size(input);
}

pub fn header_sanitize_bytes(data: &[u8]) {
    header_sanitize(&parse_headers(data));
}

// === jwt_parse and config_parse ===

/// A directory with the files the configs refer to, created once per process and kept (a
/// static is never dropped). Under the test suite it goes in cargo's directory for test files
/// (`CARGO_TARGET_TMPDIR`), so runs leave nothing in the system's temporary directory; a fuzz
/// run, which has no such directory, uses the system's.
pub fn fixture_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        kube_relay::install_crypto_provider();
        let parent = option_env!("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("kube-relay-fuzz")
            .tempdir_in(parent)
            .expect("tempdir")
            .keep();
        let ca = kube_sim::pki::TestCa::new("fuzz").expect("ca");
        let leaf = ca.issue(&["relay.example.com"]).expect("leaf");
        std::fs::write(dir.join("relay.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.join("relay.key"), &leaf.key_pem).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("token"), "relay-token\n").unwrap();
        dir
    })
}

/// The issuer tokens are checked against. Nothing listens on its port (9, discard), so any key
/// fetch fails fast on loopback and the authenticator never has keys: no token may pass.
pub const ISSUER: &str = "https://127.0.0.1:9";

/// A minimal valid configuration (also the first seed of the config corpus).
pub fn base_config() -> String {
    format!(
        "listen: 127.0.0.1:0\npublic_url: https://relay.example.com\n\
         tls: {{cert_file: relay.crt, key_file: relay.key}}\naudit: {{path: \"off\"}}\n\
         routing: {{host_suffix: relay.example.com}}\nidentity:\n  issuers:\n    \
         - {{name: dev, kind: oidc, issuer: \"{ISSUER}\", audiences: [kube-relay], ca_file: ca.crt}}\n\
         clusters:\n  - {{name: alpha, server: \"https://alpha.internal:443\", ca_file: ca.crt, \
         upstream_auth: {{mode: passthrough}}, access: [{{users: [dev/alice]}}]}}\n"
    )
}

struct JwtRig {
    rt: tokio::runtime::Runtime,
    auth: kube_relay::auth::Authenticator,
}

fn jwt_rig() -> &'static JwtRig {
    static RIG: OnceLock<JwtRig> = OnceLock::new();
    RIG.get_or_init(|| {
        let cfg = kube_relay::config::parse(&base_config(), fixture_dir()).expect("base config");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let auth = {
            let _g = rt.enter();
            kube_relay::auth::Authenticator::new(
                &cfg.issuers,
                Arc::new(kube_relay::metrics::Metrics::new()),
            )
            .expect("authenticator")
        };
        JwtRig { rt, auth }
    })
}

/// Feeds one bearer token to the relay's authenticator (no keys reachable): it must refuse it,
/// quickly, without panicking.
pub fn jwt_parse(token: &str) {
    let rig = jwt_rig();
    let r = rig.rt.block_on(rig.auth.authenticate(token));
    assert!(r.is_err(), "a token was accepted without any signing key");
    assert!(rig.auth.cached(token).is_none());
}

pub fn jwt_parse_bytes(data: &[u8]) {
    jwt_parse(&String::from_utf8_lossy(data));
}

/// Parses one configuration text. Inputs naming device or proc files are skipped: the parser
/// reads the files a config names, and `/dev/zero` would only test the filesystem.
pub fn config_parse(text: &str) {
    if text.contains("/dev") || text.contains("/proc") || text.contains("/sys") {
        return;
    }
    if let Err(errs) = kube_relay::config::parse(text, fixture_dir()) {
        assert!(!errs.0.is_empty(), "an error result names no error");
        let _ = errs.to_string();
    }
}

pub fn config_parse_bytes(data: &[u8]) {
    config_parse(&String::from_utf8_lossy(data));
}

// === http1_framing ===

/// Input: byte 0 picks how the stream is cut into writes (1 to 64 bytes), the rest is what a
/// client sends on an HTTP/1.1 connection. Invariants of `kube_relay::framing::StrictHttp1`:
/// it never panics; without a refusal hyper receives exactly the client's bytes; with one it
/// receives a prefix of them, cut at a head boundary, followed by the stand-in request only.
pub fn http1_framing_bytes(data: &[u8]) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Some((&cut, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut % 64) + 1;
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
    }
    RT.with(|rt| {
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let refused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let r = refused.clone();
            let mut strict = kube_relay::framing::StrictHttp1::new(
                server,
                true,
                true,
                std::time::Duration::from_secs(3600),
                move |_| r.store(true, std::sync::atomic::Ordering::SeqCst),
            );
            for piece in input.chunks(step) {
                client.write_all(piece).await.expect("write");
            }
            client.shutdown().await.expect("shutdown");
            let mut out = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                // After a refusal the wrapper reads no further and reports no end: once it has
                // nothing ready, one poll says so.
                let n = if refused.load(std::sync::atomic::Ordering::SeqCst) {
                    match tokio::time::timeout(std::time::Duration::ZERO, strict.read(&mut chunk))
                        .await
                    {
                        Ok(r) => r.expect("read"),
                        Err(_) => break,
                    }
                } else {
                    strict.read(&mut chunk).await.expect("read")
                };
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
            if refused.load(std::sync::atomic::Ordering::SeqCst) {
                let at = rfind(&out, b"GET /-/refused HTTP/1.1\r\n").expect("the stand-in follows");
                assert!(
                    input.starts_with(&out[..at]),
                    "a prefix of the input reached hyper"
                );
                assert!(
                    out[at..].starts_with(
                        b"GET /-/refused HTTP/1.1\r\nhost: kube-relay\r\nconnection: close\r\n"
                    ),
                    "only the stand-in follows the prefix"
                );
            } else {
                assert_eq!(out, input, "without a refusal the bytes pass unchanged");
            }
        })
    });
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}
