use super::*;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = kube_sim::pki::TestCa::new("test").unwrap();
        let leaf = ca.issue(&["relay.example.com"]).unwrap();
        std::fs::write(dir.path().join("relay.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.path().join("relay.key"), &leaf.key_pem).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("token"), "relay-token\n").unwrap();
        std::fs::write(dir.path().join("garbage.crt"), "not a certificate").unwrap();
        Self { dir }
    }

    fn parse(&self, yaml: &str) -> Result<Config, ConfigErrors> {
        parse(yaml, self.dir.path())
    }
}

const GOOD: &str = r#"
listen: 0.0.0.0:8443
public_url: https://relay.example.com
tls: {cert_file: relay.crt, key_file: relay.key}
admin: {listen: 127.0.0.1:9090}
routing: {host_suffix: relay.example.com, path_prefix: /clusters}
identity:
  issuers:
    - name: contoso
      kind: entra
      tenant_id: 00000000-0000-0000-0000-000000000000
      audiences: [api://kube-relay, 6dae42f8-4368-4678-94ff-3960e28e3630]
      required_scopes: [user_impersonation]
      required_roles: [kube-relay.access]
    - name: github
      kind: oidc
      issuer: https://token.actions.githubusercontent.com
      audiences: [api://kube-relay]
      username_claim: sub
clusters:
  - name: prod-weu
    server: https://prod-weu-1a2b.privatelink.westeurope.azmk8s.io:443
    connect: 10.20.0.4:443
    ca_file: ca.crt
    upstream_auth: {mode: passthrough}
    access:
      - groups: [11111111-1111-1111-1111-111111111111]
      - users: [contoso/22222222-2222-2222-2222-222222222222]
        verbs: [get, list, watch]
      - issuer: github
        claims: {repository: contoso/infra, ref: refs/heads/main}
  - name: prod-eus
    server: https://prod-eus-9f8e.privatelink.eastus.azmk8s.io
    ca_file: ca.crt
    upstream_auth: {mode: impersonate, token_file: token}
    access:
      - groups: [11111111-1111-1111-1111-111111111111]
"#;

fn messages(e: ConfigErrors) -> Vec<String> {
    e.0.iter().map(ToString::to_string).collect()
}

#[test]
fn the_design_example_loads() {
    let f = Fixture::new();
    let cfg = f.parse(GOOD).unwrap();
    assert_eq!(cfg.listen.port(), 8443);
    assert_eq!(cfg.public_host, "relay.example.com");
    assert_eq!(
        cfg.routing.host_suffix.as_deref(),
        Some("relay.example.com")
    );
    assert_eq!(cfg.clusters.len(), 2);
    let weu = &cfg.clusters[0];
    assert_eq!(weu.dial, "10.20.0.4:443");
    assert_eq!(
        weu.server_name.to_str(),
        "prod-weu-1a2b.privatelink.westeurope.azmk8s.io"
    );
    let eus = &cfg.clusters[1];
    assert_eq!(eus.dial, "prod-eus-9f8e.privatelink.eastus.azmk8s.io:443");
    assert!(
        matches!(&eus.upstream_auth, UpstreamAuth::Impersonate(RelayCredential::TokenFile { token, .. }) if token == "relay-token")
    );
    assert_eq!(weu.access.len(), 3);
    assert_eq!(cfg.timeouts.stream_idle, Duration::from_secs(7200));
}

#[test]
fn every_error_is_reported_with_its_key_path() {
    let f = Fixture::new();
    let yaml = r#"
listen: nowhere
public_url: http://relay.example.com
tls: {cert_file: missing.crt, key_file: relay.crt}
routing: {host_suffix: "bad suffix!", path_prefix: "clusters"}
colour: blue
timeouts: {connect: soon}
identity:
  issuers:
    - name: contoso
      kind: entra
      tenant_id: not-a-guid
      audiences: []
    - name: contoso
      kind: oidc
      audiences: [x]
clusters:
  - name: Prod_WEU
    server: https://a.example.com
    ca_file: garbage.crt
    upstream_auth: {mode: passthrough, token_file: token}
    access:
      - users: [nobody/123]
        verbs: [get, destroy]
      - verbs: [get]
  - name: prod
    server: https://b.example.com
    ca_file: ca.crt
    upstream_auth: {mode: impersonate}
    surprise: true
  - name: prod
    server: not a url
    ca_file: ca.crt
    upstream_auth: {mode: passthrough}
"#;
    let errs = messages(f.parse(yaml).unwrap_err());
    let joined = errs.join("\n");
    for expected in [
        "listen: `nowhere` is not an IP:port",
        "public_url: `http://relay.example.com` must be an https:// URL",
        "tls.cert_file: cannot read",
        "tls.key_file:",
        "routing.host_suffix:",
        "routing.path_prefix:",
        "colour: unknown key",
        "timeouts.connect: `soon` is not a duration",
        "identity.issuers[0].tenant_id:",
        "identity.issuers[0].audiences:",
        "identity.issuers[1].name: duplicate issuer name",
        "identity.issuers[1].issuer: missing",
        "clusters[0].name: `Prod_WEU` is not a valid cluster name",
        "clusters[0].ca_file:",
        "clusters[0].upstream_auth.token_file: not used with mode passthrough",
        "clusters[0].access[0].users[0]: `nobody/123`: no issuer named `nobody`",
        "clusters[0].access[0].verbs[1]: unknown verb `destroy`",
        "clusters[0].access[1]: a rule must name groups, users or an issuer",
        "clusters[1].surprise: unknown field `surprise`",
        "clusters[2].server: `not a url` is not a valid URL",
    ] {
        assert!(
            joined.contains(expected),
            "missing {expected:?} in:\n{joined}"
        );
    }
}

#[test]
fn unknown_nested_keys_name_their_path() {
    let f = Fixture::new();
    let yaml = GOOD.replace(
        "upstream_auth: {mode: passthrough}",
        "upstream_auth: {mode: passthrough, colour: red}",
    );
    let errs = messages(f.parse(&yaml).unwrap_err());
    assert!(
        errs.iter()
            .any(|e| e.starts_with("clusters[0].upstream_auth.colour")
                || e.contains("clusters[0].upstream_auth") && e.contains("colour")),
        "{errs:?}"
    );
}

#[test]
fn impersonate_needs_a_credential_and_obo_is_refused_clearly() {
    let f = Fixture::new();
    let yaml = GOOD.replace(
        "upstream_auth: {mode: impersonate, token_file: token}",
        "upstream_auth: {mode: impersonate}",
    );
    let errs = messages(f.parse(&yaml).unwrap_err());
    assert!(
        errs.iter()
            .any(|e| e.contains("clusters[1].upstream_auth") && e.contains("token_file")),
        "{errs:?}"
    );
    let yaml = GOOD.replace(
        "upstream_auth: {mode: impersonate, token_file: token}",
        "upstream_auth: {mode: on_behalf_of, client_id: x}",
    );
    let errs = messages(f.parse(&yaml).unwrap_err());
    assert!(
        errs.iter()
            .any(|e| e.contains("clusters[1].upstream_auth.mode") && e.contains("not supported")),
        "{errs:?}"
    );
}

#[test]
fn invalid_yaml_and_non_mapping() {
    let f = Fixture::new();
    assert!(messages(f.parse("listen: [").unwrap_err())[0].contains("invalid YAML"));
    assert!(messages(f.parse("- a\n- b").unwrap_err())[0].contains("mapping"));
}

#[test]
fn cluster_names() {
    for ok in ["a", "prod-weu", "a1", &"a".repeat(63)] {
        assert!(is_cluster_name(ok), "{ok}");
    }
    for bad in [
        "",
        "-a",
        "a-",
        "A",
        "a_b",
        "a.b",
        "a/b",
        &"a".repeat(64),
        "..",
        "%2f",
    ] {
        assert!(!is_cluster_name(bad), "{bad}");
    }
}

#[test]
fn duplicate_clusters_are_refused() {
    let f = Fixture::new();
    let yaml = GOOD.replace("name: prod-eus", "name: prod-weu");
    let errs = messages(f.parse(&yaml).unwrap_err());
    assert!(
        errs.iter()
            .any(|e| e == "clusters[1].name: duplicate cluster `prod-weu`"),
        "{errs:?}"
    );
}
