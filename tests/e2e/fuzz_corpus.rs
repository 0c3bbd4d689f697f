//! The fuzz targets on stable (issue 5 item 7; docs/architecture.md "Invariants"): every committed
//! seed under `fuzz/corpus/<target>/` replays through the same checks the cargo-fuzz targets run
//! (`fuzz/harness.rs`), and proptest properties generate structured inputs for routing
//! (docs/security.md
//! D1–D3) and header hygiene (B1, B4, B5, B7, D4).

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

use proptest::prelude::*;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "{target}: the seed corpus is missing ({} files)",
        files.len()
    );
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    for (path, data) in corpus(target) {
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{target}: {} fails", path.display());
    }
}

#[test]
fn route_resolve_corpus() {
    replay("route_resolve", harness::route_resolve_bytes);
}

#[test]
fn header_sanitize_corpus() {
    replay("header_sanitize", harness::header_sanitize_bytes);
}

#[test]
fn http1_framing_corpus() {
    replay("http1_framing", harness::http1_framing_bytes);
}

#[test]
fn jwt_parse_corpus() {
    replay("jwt_parse", harness::jwt_parse_bytes);
}

#[test]
fn config_parse_corpus() {
    replay("config_parse", harness::config_parse_bytes);
    // The base seed is the harness's own valid config: it must keep parsing, or the config
    // corpus silently stops reaching the validators.
    kube_relay::config::parse(&harness::base_config(), harness::fixture_dir())
        .expect("the base config seed parses");
}

#[test]
fn known_route_outcomes() {
    use harness::route_resolve as r;
    let s = |c: &str| format!("{c}.{}", harness::SUFFIX);
    assert_eq!(r(None, None, "/clusters/alpha/api"), Some("alpha".into()));
    assert_eq!(r(Some(&s("alpha")), None, "/api"), Some("alpha".into()));
    // Encoded separators and dot segments never move a request to another cluster.
    for t in [
        "/clusters/alpha%2F..%2Fbeta/api",
        "/clusters/alpha/../beta/api",
        "/clusters/alpha/%2e%2e/beta",
        "/clusters/..%2Fbeta",
        "/clusters/alpha%252Fbeta",
        "/clusters/alpha\\..\\beta",
    ] {
        assert_eq!(r(Some(&s("alpha")), None, t), None, "{t}");
    }
    // `//clusters/beta` is not the prefix: on an alpha connection it goes to alpha, whole.
    assert_eq!(
        r(Some(&s("alpha")), None, "//clusters/beta/api"),
        Some("alpha".into())
    );
    assert_eq!(r(None, None, "//clusters/beta/api"), None);
}

// === properties ===

/// Path segments biased towards the characters that matter for routing.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{1,8}",
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("%2e%2e".to_owned()),
        Just("%2E.".to_owned()),
        Just("%2F".to_owned()),
        Just("%2f".to_owned()),
        Just("%252F".to_owned()),
        Just("%5C".to_owned()),
        Just("\\".to_owned()),
        Just(";x=y".to_owned()),
        Just("alpha".to_owned()),
        Just("beta".to_owned()),
        Just("clusters".to_owned()),
        Just("%61lpha".to_owned()),
        Just(String::new()),
        "[ -~]{0,6}",
    ]
}

fn target() -> impl Strategy<Value = String> {
    (
        prop::bool::ANY,
        prop::collection::vec(segment(), 0..6),
        prop::option::of("[ -~]{0,8}"),
    )
        .prop_map(|(prefixed, segs, query)| {
            let mut t = if prefixed {
                "/clusters".to_owned()
            } else {
                String::new()
            };
            for s in segs {
                t.push('/');
                t.push_str(&s);
            }
            if t.is_empty() {
                t.push('/');
            }
            if let Some(q) = query {
                t.push('?');
                t.push_str(&q);
            }
            t
        })
}

fn host() -> impl Strategy<Value = Option<String>> {
    let label = prop_oneof![
        Just("alpha".to_owned()),
        Just("beta".to_owned()),
        Just("ALPHA".to_owned()),
        Just("a.b".to_owned()),
        Just("-x".to_owned()),
        "[a-z0-9-]{1,70}",
    ];
    prop::option::of(prop_oneof![
        label
            .clone()
            .prop_map(|l| format!("{l}.{}", harness::SUFFIX)),
        label.prop_map(|l| format!("{l}.{}.", harness::SUFFIX)),
        Just(harness::SUFFIX.to_owned()),
        Just("127.0.0.1".to_owned()),
        Just("[::1]".to_owned()),
        "[ -~]{0,20}",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// route::resolve never panics; a cluster route always has a valid name, follows the SNI
    /// when the SNI names a cluster, and forwards exactly the raw suffix (harness checks).
    #[test]
    fn route_resolve_properties(sni in host(), host in host(), t in target()) {
        let routed = harness::route_resolve(sni.as_deref(), host.as_deref(), &t);
        // An SNI naming a cluster routes there or nowhere, whatever the path says.
        if let (Some(c), Some(s)) = (&routed, sni.as_deref().and_then(harness::named_by_host)) {
            prop_assert_eq!(c, &s);
        }
    }

    /// Arbitrary text in any of the three inputs never panics.
    #[test]
    fn route_resolve_arbitrary(data in prop::collection::vec(any::<u8>(), 0..200)) {
        harness::route_resolve_bytes(&data);
    }

    /// sanitize_request never forwards identity, hop-by-hop or Connection-named headers, and
    /// copies everything else unaltered (harness checks).
    #[test]
    fn header_sanitize_properties(headers in prop::collection::vec(header_line(), 0..12)) {
        harness::header_sanitize_bytes(headers.join("\n").as_bytes());
    }

    /// Arbitrary bearer strings are refused without panicking.
    #[test]
    fn jwt_parse_arbitrary(token in prop_oneof![
        "[ -~]{0,64}",
        "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,20}",
    ]) {
        harness::jwt_parse(&token);
    }

    /// Mutated configs never panic the parser.
    #[test]
    fn config_parse_mutations(cut in 0usize..1000, insert in "[ -~\n]{0,12}") {
        let base = harness::base_config();
        let at = cut % (base.len() + 1);
        let at = (0..=at).rev().find(|i| base.is_char_boundary(*i)).unwrap_or(0);
        harness::config_parse(&format!("{}{insert}{}", &base[..at], &base[at..]));
    }
}

fn header_line() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("impersonate-user"),
        Just("Impersonate-Group"),
        Just("IMPERSONATE-EXTRA-scopes"),
        Just("impersonate-uid"),
        Just("Impersonate_Group"),
        Just("x-remote-user"),
        Just("X-Remote-Extra-a"),
        Just("connection"),
        Just("keep-alive"),
        Just("te"),
        Just("transfer-encoding"),
        Just("upgrade"),
        Just("authorization"),
        Just("host"),
        Just("sec-websocket-protocol"),
        Just("x-forwarded-host"),
        Just("x-original-url"),
        Just("accept"),
        Just("x-custom"),
    ]
    .prop_map(str::to_owned);
    let value = prop_oneof![
        Just("keep-alive, Authorization, Impersonate-Group, x-custom".to_owned()),
        Just("v5.channel.k8s.io, base64url.bearer.authorization.k8s.io.dG9r".to_owned()),
        Just("base64url.bearer.authorization.k8s.io.!!".to_owned()),
        Just("system:masters".to_owned()),
        "[ -~]{0,24}",
    ];
    (prop_oneof![name, "[a-zA-Z0-9_-]{1,12}"], value).prop_map(|(n, v)| format!("{n}: {v}"))
}
