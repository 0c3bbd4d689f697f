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
    assert_eq!(cfg.timeouts.write_stall, Duration::from_secs(300));
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
timeouts: {connect: soon, write_stall: 0s}
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
        "timeouts.write_stall: must be greater than zero",
        "identity.issuers[0].tenant_id:",
        "identity.issuers[0].audiences:",
        "identity.issuers[1].name: duplicate issuer name",
        "identity.issuers[1].issuer: missing",
        "clusters[0].name: `Prod_WEU` is not a valid cluster name",
        "clusters[0].ca_file:",
        "clusters[0].upstream_auth.token_file: not used with mode passthrough",
        "clusters[0].access[0].users[0]: `nobody/123`: no issuer named `nobody`",
        "clusters[0].access[0].verbs[1]: unknown verb `destroy`",
        "clusters[0].access[1]: a rule must name groups, users, apps, roles or an issuer",
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
fn impersonate_and_obo_each_need_a_credential() {
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
        errs.iter().any(|e| e.contains("clusters[1].upstream_auth")
            && e.contains("exactly one client credential")),
        "{errs:?}"
    );
}

const RELAY_APP: &str = "0b1c8a2e-7d3f-4e5a-9b6c-1d2e3f4a5b6c";
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

fn with_auth(f: &Fixture, auth: &str) -> Result<Config, ConfigErrors> {
    f.parse(&GOOD.replace(
        "upstream_auth: {mode: impersonate, token_file: token}",
        &format!("upstream_auth: {auth}"),
    ))
}

#[test]
fn on_behalf_of_parses_each_client_credential() {
    let f = Fixture::new();
    std::fs::write(f.dir.path().join("obo-secret"), "s3cr3t-value\n").unwrap();
    let cfg = with_auth(
        &f,
        &format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: obo-secret}}"),
    )
    .unwrap();
    let UpstreamAuth::OnBehalfOf(obo) = &cfg.clusters[1].upstream_auth else {
        panic!("not OBO");
    };
    assert_eq!(obo.client_id, RELAY_APP);
    assert!(matches!(&obo.client_auth, OboClientAuth::Secret(s) if s.expose() == "s3cr3t-value"));
    assert_eq!(
        obo.endpoint.authority_host.as_str(),
        "https://login.microsoftonline.com/"
    );
    assert_eq!(obo.endpoint.scope, format!("{AKS_SERVER_APP}/.default"));
    assert!(obo.endpoint.ca.is_none() && obo.endpoint.tenant_id.is_none());
    // Debug output never shows the secret.
    assert!(!format!("{:?}", cfg.clusters[1]).contains("s3cr3t"));

    let cfg = with_auth(
        &f,
        &format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_certificate_file: relay.crt, client_key_file: relay.key, tenant_id: {TENANT}, authority_host: 'https://127.0.0.1:8443', ca_file: ca.crt, scope: api://aks/.default}}"),
    )
    .unwrap();
    let UpstreamAuth::OnBehalfOf(obo) = &cfg.clusters[1].upstream_auth else {
        panic!("not OBO");
    };
    assert!(matches!(obo.client_auth, OboClientAuth::Certificate { .. }));
    assert_eq!(obo.endpoint.tenant_id.as_deref(), Some(TENANT));
    assert_eq!(obo.endpoint.scope, "api://aks/.default");
    assert_eq!(obo.endpoint.ca.as_ref().map(Vec::len), Some(1));

    let cfg = with_auth(
        &f,
        &format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, federated: {{credential: workload_identity, federated_token_file: token}}}}"),
    )
    .unwrap();
    let UpstreamAuth::OnBehalfOf(obo) = &cfg.clusters[1].upstream_auth else {
        panic!("not OBO");
    };
    assert!(matches!(
        obo.client_auth,
        OboClientAuth::FederatedTokenFile { .. }
    ));

    let cfg = with_auth(
        &f,
        &format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, federated: {{credential: managed_identity, client_id: {TENANT}}}}}"),
    )
    .unwrap();
    let UpstreamAuth::OnBehalfOf(obo) = &cfg.clusters[1].upstream_auth else {
        panic!("not OBO");
    };
    assert!(
        matches!(&obo.client_auth, OboClientAuth::FederatedManagedIdentity { client_id: Some(c) } if c == TENANT)
    );
}

#[test]
fn on_behalf_of_mistakes_are_reported_by_key() {
    let f = Fixture::new();
    std::fs::write(f.dir.path().join("obo-secret"), "s3cr3t").unwrap();
    let cases = [
        ("{mode: on_behalf_of, client_id: nope, client_secret_file: obo-secret}".to_owned(), "upstream_auth.client_id: must be a GUID"),
        ("{mode: on_behalf_of, client_secret_file: obo-secret}".to_owned(), "upstream_auth.client_id: is required"),
        (format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: obo-secret, federated: {{credential: managed_identity}}}}"), "exactly one client credential"),
        (format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: obo-secret, authority_host: 'http://login'}}"), "upstream_auth.authority_host"),
        (format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: obo-secret, tenant_id: contoso.com}}"), "upstream_auth.tenant_id: must be a GUID"),
        (format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: missing}}"), "upstream_auth.client_secret_file: cannot read"),
        (format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_secret_file: obo-secret, token_file: token}}"), "upstream_auth.token_file: belongs to mode impersonate"),
        (format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, federated: {{credential: client_secret}}}}"), "federated.credential"),
        (format!("{{mode: on_behalf_of, client_id: {RELAY_APP}, client_certificate_file: relay.crt}}"), "given together"),
        (format!("{{mode: passthrough, client_id: {RELAY_APP}}}"), "upstream_auth.client_id: not used with mode passthrough"),
        ("{mode: impersonate, token_file: token, scope: x/.default}".to_owned(), "upstream_auth.scope: belongs to mode on_behalf_of"),
    ];
    for (auth, want) in cases {
        let errs = messages(with_auth(&f, &auth).unwrap_err());
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "{auth}: want {want:?} in {errs:?}"
        );
        assert!(!errs.iter().any(|e| e.contains("s3cr3t")), "{errs:?}");
    }
}

#[test]
fn impersonate_with_azure_credentials() {
    let f = Fixture::new();
    std::fs::write(f.dir.path().join("app-secret"), "app-s3cr3t").unwrap();
    let cfg = with_auth(
        &f,
        "{mode: impersonate, azure: {credential: managed_identity}}",
    )
    .unwrap();
    let UpstreamAuth::Impersonate(RelayCredential::Azure(a)) = &cfg.clusters[1].upstream_auth
    else {
        panic!("not azure");
    };
    assert!(matches!(a.kind, AzureCredentialKind::ManagedIdentity));
    assert!(a.client_id.is_none());
    assert_eq!(a.endpoint.scope, format!("{AKS_SERVER_APP}/.default"));

    let cfg = with_auth(
        &f,
        &format!("{{mode: impersonate, azure: {{credential: workload_identity, client_id: {RELAY_APP}, tenant_id: {TENANT}, federated_token_file: token}}}}"),
    )
    .unwrap();
    let UpstreamAuth::Impersonate(RelayCredential::Azure(a)) = &cfg.clusters[1].upstream_auth
    else {
        panic!("not azure");
    };
    assert!(
        matches!(&a.kind, AzureCredentialKind::WorkloadIdentity { federated_token_file } if federated_token_file.ends_with("token"))
    );

    let cfg = with_auth(
        &f,
        &format!("{{mode: impersonate, azure: {{credential: client_secret, client_id: {RELAY_APP}, tenant_id: {TENANT}, client_secret_file: app-secret, authority_host: 'https://127.0.0.1:9443', ca_file: ca.crt}}}}"),
    )
    .unwrap();
    assert!(!format!("{:?}", cfg.clusters[1]).contains("app-s3cr3t"));

    for (auth, want) in [
        (format!("{{mode: impersonate, azure: {{credential: client_secret, client_id: {RELAY_APP}, client_secret_file: app-secret}}}}"), "azure.tenant_id: is required"),
        (format!("{{mode: impersonate, azure: {{credential: workload_identity, tenant_id: {TENANT}, federated_token_file: token}}}}"), "azure.client_id: is required"),
        ("{mode: impersonate, azure: {credential: managed_identity, tenant_id: x}}".to_owned(), "azure.tenant_id: not used"),
        ("{mode: impersonate, azure: {credential: managed_identity, colour: red}}".to_owned(), "colour"),
        ("{mode: impersonate, token_file: token, azure: {credential: managed_identity}}".to_owned(), "exactly one credential"),
    ] {
        let errs = messages(with_auth(&f, &auth).unwrap_err());
        assert!(errs.iter().any(|e| e.contains(want)), "{auth}: want {want:?} in {errs:?}");
    }
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

/// GOOD plus a `login` section (`portal` lines appended as given).
fn with_login(f: &Fixture, portal: &str) -> Result<Config, ConfigErrors> {
    std::fs::write(f.dir.path().join("portal-secret"), "s3cret\n").unwrap();
    std::fs::write(
        f.dir.path().join("cookie.key"),
        "0123456789abcdef0123456789abcdef-long-enough\n",
    )
    .unwrap();
    std::fs::write(f.dir.path().join("short.key"), "too short\n").unwrap();
    f.parse(&format!(
        "{GOOD}login:\n  issuer: contoso\n  client_id: 11111111-2222-3333-4444-555555555555\n  scopes: [api://kube-relay/user_impersonation]\n{portal}"
    ))
}

#[test]
fn login_and_portal_load_with_their_defaults() {
    let f = Fixture::new();
    let cfg = with_login(&f, "").unwrap();
    let login = cfg.login.as_ref().unwrap();
    assert_eq!(login.issuer.name, "contoso");
    assert!(login.portal.is_none());
    // Entra: passthrough clusters get the AKS server application's scope by default.
    assert_eq!(
        login.passthrough_scopes,
        [format!("{AKS_SERVER_APP}/.default")]
    );

    let cfg = with_login(
        &f,
        "  portal: {client_id: web-app, client_secret_file: portal-secret, cookie_key_file: cookie.key}\n",
    )
    .unwrap();
    let portal = cfg.login.unwrap().portal.unwrap();
    assert_eq!(portal.session_lifetime, Duration::from_secs(3600));
    assert!(
        !portal.sign_out_at_provider,
        "sign-out is local unless asked"
    );
    assert_eq!(portal.client_secret.expose(), "s3cret");
    // Debug never shows the secret or the key.
    let dump = format!("{portal:?}");
    assert!(!dump.contains("s3cret"), "{dump}");

    let cfg = with_login(
        &f,
        "  portal: {client_id: web-app, client_secret_file: portal-secret, cookie_key_file: cookie.key, session_lifetime: 15m, sign_out_at_provider: true}\n",
    )
    .unwrap();
    let portal = cfg.login.unwrap().portal.unwrap();
    assert_eq!(portal.session_lifetime, Duration::from_secs(900));
    assert!(portal.sign_out_at_provider);
}

#[test]
fn login_and_portal_mistakes_name_their_key() {
    let f = Fixture::new();
    for (portal, key, reason) in [
        (
            "  portal: {client_id: ' ', client_secret_file: portal-secret, cookie_key_file: cookie.key}\n",
            "login.portal.client_id",
            "must not be empty",
        ),
        (
            "  portal: {client_id: web, client_secret_file: nope, cookie_key_file: cookie.key}\n",
            "login.portal.client_secret_file",
            "cannot read",
        ),
        (
            "  portal: {client_id: web, client_secret_file: portal-secret, cookie_key_file: short.key}\n",
            "login.portal.cookie_key_file",
            "at least 32 random bytes",
        ),
        (
            "  portal: {client_id: web, client_secret_file: portal-secret, cookie_key_file: cookie.key, session_lifetime: 7d}\n",
            "login.portal.session_lifetime",
            "between 1m and 24h",
        ),
        (
            "  portal: {client_id: web, client_secret_file: portal-secret, cookie_key_file: cookie.key, session_lifetime: soon}\n",
            "login.portal.session_lifetime",
            "not a duration",
        ),
        (
            "  portal: {client_id: web, client_secret_file: portal-secret, cookie_key_file: cookie.key, sign_out_at_provider: sometimes}\n",
            "login.portal",
            "sign_out_at_provider",
        ),
        (
            "  portal: {client_id: web, client_secret_file: portal-secret, cookie_key_file: cookie.key, logout: yes}\n",
            "login.portal",
            "logout",
        ),
    ] {
        let errs = messages(with_login(&f, portal).unwrap_err());
        assert!(
            errs.iter().any(|e| e.contains(key) && e.contains(reason)),
            "{portal}: want {key}: …{reason}…, got {errs:?}"
        );
    }
    let errs = messages(
        f.parse(&format!(
            "{GOOD}login:\n  issuer: nobody\n  client_id: cli\n  scopes: [x]\n"
        ))
        .unwrap_err(),
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("login.issuer") && e.contains("contoso, github")),
        "{errs:?}"
    );
    let errs = messages(
        f.parse(&format!(
            "{GOOD}login:\n  issuer: contoso\n  client_id: cli\n"
        ))
        .unwrap_err(),
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("login") && e.contains("scopes")),
        "{errs:?}"
    );
}

/// GOOD with `extra` added to the `contoso` issuer and `rules` replacing prod-eus's access.
fn with_enterprise(f: &Fixture, extra: &str, rules: &str) -> Result<Config, ConfigErrors> {
    let yaml = GOOD
        .replace(
            "      required_roles: [kube-relay.access]\n",
            &format!("      required_roles: [kube-relay.access]\n{extra}"),
        )
        .replace(
            "    upstream_auth: {mode: impersonate, token_file: token}\n    access:\n      - groups: [11111111-1111-1111-1111-111111111111]\n",
            &format!("    upstream_auth: {{mode: impersonate, token_file: token}}\n    access:\n{rules}"),
        );
    f.parse(&yaml)
}

#[test]
fn group_overage_roles_and_auth_context_load() {
    let f = Fixture::new();
    std::fs::write(f.dir.path().join("graph-secret"), "s").unwrap();
    let cfg = with_enterprise(
        &f,
        "      group_overage:
        resolve: graph
        credential: {azure: {credential: client_secret, client_id: 33333333-3333-3333-3333-333333333333,
                     tenant_id: 00000000-0000-0000-0000-000000000000, client_secret_file: graph-secret}}
        cache_ttl: 5m
",
        "      - groups: [11111111-1111-1111-1111-111111111111]
        auth_context: [c1]
      - roles: [kube-relay.prod-admin]
        verbs: [get]
",
    )
    .unwrap();
    let g = cfg.issuers[0].group_overage.as_ref().unwrap();
    assert_eq!(g.graph_host.as_str(), "https://graph.microsoft.com/");
    assert_eq!(
        g.credential.endpoint.scope,
        "https://graph.microsoft.com/.default"
    );
    assert_eq!(g.cache_ttl, Duration::from_secs(300));
    assert_eq!(g.timeout, Duration::from_secs(5));
    let rules = &cfg.clusters[1].access;
    assert_eq!(rules[0].auth_context, ["c1"]);
    assert_eq!(rules[1].roles, ["kube-relay.prod-admin"]);
    // `resolve: deny` is the default and needs nothing else.
    let cfg = with_enterprise(
        &f,
        "      group_overage: {resolve: deny}\n",
        "      - users: [contoso/x]\n",
    )
    .unwrap();
    assert!(cfg.issuers[0].group_overage.is_none());
}

#[test]
fn group_overage_and_rule_mistakes_name_their_key() {
    let f = Fixture::new();
    let errs = messages(
        with_enterprise(
            &f,
            "      group_overage:
        resolve: graph
        graph_host: http://graph.example
        cache_ttl: 0s
        timeout: 2m
        colour: blue
",
            "      - auth_context: []
        groups: [x]
      - roles: ['']
        auth_context: ['c1\"']
      - verbs: [get]
",
        )
        .unwrap_err(),
    );
    let joined = errs.join("\n");
    for expected in [
        "identity.issuers[0].group_overage.colour: unknown field `colour`",
        "clusters[1].access[0].auth_context: an empty list would admit nothing",
        "clusters[1].access[1].roles[0]: must be an app role value",
        "clusters[1].access[1].auth_context[0]: `c1\"` is not an authentication context id",
        "clusters[1].access[2]: a rule must name groups, users, apps, roles or an issuer",
    ] {
        assert!(
            joined.contains(expected),
            "missing {expected:?} in:\n{joined}"
        );
    }
    let errs = messages(
        with_enterprise(
            &f,
            "      group_overage:
        resolve: graph
        graph_host: http://graph.example
        cache_ttl: 25h
        timeout: 2m
",
            "      - users: [contoso/x]\n",
        )
        .unwrap_err(),
    );
    let joined = errs.join("\n");
    for expected in [
        "identity.issuers[0].group_overage.graph_host: must be an https:// URL",
        "identity.issuers[0].group_overage.cache_ttl: must be between 1s and 24h",
        "identity.issuers[0].group_overage.timeout: must be between",
        "identity.issuers[0].group_overage.credential: resolve: graph needs the relay's credential",
    ] {
        assert!(
            joined.contains(expected),
            "missing {expected:?} in:\n{joined}"
        );
    }
    let errs = messages(
        with_enterprise(
            &f,
            "      group_overage: {resolve: deny, cache_ttl: 5m}\n",
            "      - users: [contoso/x]\n",
        )
        .unwrap_err(),
    );
    assert!(
        errs.join("\n")
            .contains("identity.issuers[0].group_overage.cache_ttl: only used with resolve: graph"),
        "{errs:?}"
    );
    // An OIDC issuer has no Graph; Entra issuers always require nbf.
    let yaml = GOOD.replace(
        "      username_claim: sub\n",
        "      username_claim: sub\n      group_overage: {resolve: deny}\n",
    );
    let errs = messages(f.parse(&yaml).unwrap_err());
    assert!(
        errs.join("\n")
            .contains("identity.issuers[1].group_overage: only valid for kind: entra"),
        "{errs:?}"
    );
    let errs = messages(
        with_enterprise(
            &f,
            "      require_nbf: false\n",
            "      - users: [contoso/x]\n",
        )
        .unwrap_err(),
    );
    assert!(
        errs.join("\n")
            .contains("identity.issuers[0].require_nbf: only valid for kind: oidc"),
        "{errs:?}"
    );
}

#[test]
fn audit_mode_defaults_to_best_effort_and_blocking_needs_a_sink() {
    let f = Fixture::new();
    let cfg = f.parse(GOOD).unwrap();
    assert_eq!(cfg.audit_mode, AuditMode::BestEffort);
    let cfg = f
        .parse(&format!(
            "{GOOD}audit: {{path: audit.jsonl, mode: blocking}}\n"
        ))
        .unwrap();
    assert_eq!(cfg.audit_mode, AuditMode::Blocking);
    let errs = messages(
        f.parse(&format!("{GOOD}audit: {{path: \"off\", mode: blocking}}\n"))
            .unwrap_err(),
    );
    assert!(
        errs.join("\n")
            .contains("audit.mode: blocking needs an audit sink"),
        "{errs:?}"
    );
    let errs = messages(
        f.parse(&format!("{GOOD}audit: {{mode: sometimes}}\n"))
            .unwrap_err(),
    );
    assert!(errs.join("\n").contains("audit"), "{errs:?}");
}

/// GOOD with prod-eus recording sessions `mode`, and `recording` (top-level text) appended.
fn with_recording(f: &Fixture, mode: &str, recording: &str) -> Result<Config, ConfigErrors> {
    let yaml = GOOD.replace(
        "    upstream_auth: {mode: impersonate, token_file: token}\n    access:\n",
        &format!("    upstream_auth: {{mode: impersonate, token_file: token}}\n    recording: {mode}\n    access:\n"),
    );
    f.parse(&format!("{yaml}{recording}"))
}

#[test]
fn recording_loads_for_a_directory_and_for_azure_blob() {
    let f = Fixture::new();
    let cfg = with_recording(
        &f,
        "required",
        "recording:\n  store: {kind: file, dir: recordings}\n  auditors: {groups: [g1], users: [contoso/u1]}\n",
    )
    .unwrap();
    assert_eq!(cfg.clusters[1].recording, RecordingMode::Required);
    assert_eq!(cfg.clusters[0].recording, RecordingMode::Off);
    let r = cfg.recording.as_ref().unwrap();
    assert!(matches!(&r.store, RecordingStoreConfig::Dir(d) if d.ends_with("recordings")));
    assert!(r.is_auditor("contoso/u1", &[]) && r.is_auditor("x/y", &["g1".to_owned()]));
    assert!(!r.is_auditor("contoso/u2", &["g2".to_owned()]));
    assert_eq!(r.max_session_bytes, DEFAULT_MAX_SESSION_BYTES);
    for (written, bytes) in [
        ("512Mi", 512u64 << 20),
        ("65536", 65536),
        ("2Gi", 2 << 30),
        ("64Ki", 64 << 10),
    ] {
        let cfg = with_recording(
            &f,
            "required",
            &format!(
                "recording:\n  store: {{kind: file, dir: r}}\n  max_session_size: {written}\n"
            ),
        )
        .unwrap();
        assert_eq!(cfg.recording.unwrap().max_session_bytes, bytes, "{written}");
    }

    let cfg = with_recording(
        &f,
        "optional",
        "recording:\n  store:\n    kind: azure_blob\n    account_url: https://contoso.blob.core.windows.net\n    container: kube-relay-recordings\n    credential: {azure: {credential: managed_identity}}\n",
    )
    .unwrap();
    match &cfg.recording.unwrap().store {
        RecordingStoreConfig::AzureBlob(b) => {
            assert_eq!(b.container, "kube-relay-recordings");
            assert_eq!(b.credential.endpoint.scope, STORAGE_SCOPE);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn recording_mistakes_name_their_key() {
    let f = Fixture::new();
    let cases = [
        ("required", "", "recording: cluster `prod-eus` records sessions but no recording store is configured"),
        ("sometimes", "recording:\n  store: {kind: file, dir: r}\n", "clusters[1]"),
        ("optional", "recording:\n  store: {kind: file}\n", "recording.store.dir: is required"),
        ("optional", "recording:\n  store: {kind: file, dir: r, container: c}\n", "recording.store.container: not used with kind: file"),
        ("optional", "recording:\n  store: {kind: azure_blob, container: c}\n", "recording.store.account_url: is required"),
        ("optional", "recording:\n  store: {kind: azure_blob, account_url: https://a.blob.core.windows.net, container: Bad_Name, credential: {azure: {credential: managed_identity}}}\n", "recording.store.container: `Bad_Name` is not a container name"),
        ("optional", "recording:\n  store: {kind: azure_blob, account_url: https://a.blob.core.windows.net, container: recs}\n", "recording.store.credential: kind: azure_blob needs"),
        ("optional", "recording:\n  store: {kind: azure_blob, account_url: http://a.blob.core.windows.net, container: recs, credential: {azure: {credential: managed_identity}}}\n", "recording.store.account_url"),
        ("optional", "recording:\n  store: {kind: file, dir: r}\n  auditors: {users: [nobody/x]}\n", "recording.auditors.users[0]: `nobody/x`"),
        ("optional", "recording:\n  store: {kind: file, dir: r}\n  colour: blue\n", "recording"),
        ("optional", "recording:\n  store: {kind: file, dir: r}\n  max_session_size: 1GB\n", "recording.max_session_size: `1GB` is not a size"),
        ("optional", "recording:\n  store: {kind: file, dir: r}\n  max_session_size: 1.5Gi\n", "recording.max_session_size: `1.5Gi` is not a size"),
        ("optional", "recording:\n  store: {kind: file, dir: r}\n  max_session_size: 1000\n", "recording.max_session_size: must be at least 64Ki"),
        ("optional", "recording:\n  store: {kind: file, dir: r}\n  max_session_size: 99999999999Ti\n", "recording.max_session_size: is too large"),
        // Both mistakes are reported, not only the store's.
        ("optional", "recording:\n  store: {kind: file}\n  max_session_size: lots\n", "recording.max_session_size: `lots` is not a size"),
    ];
    for (mode, recording, expected) in cases {
        let errs = messages(with_recording(&f, mode, recording).unwrap_err()).join("\n");
        assert!(
            errs.contains(expected),
            "{mode} / {recording:?}: missing {expected:?} in:\n{errs}"
        );
    }
}

#[test]
fn upstream_protocol_is_mixed_unless_chosen_and_a_wrong_value_names_its_cluster() {
    let f = Fixture::new();
    let cfg = f.parse(GOOD).unwrap();
    assert!(cfg
        .clusters
        .iter()
        .all(|c| c.upstream_protocol == UpstreamProtocol::Mixed));
    let with = |value: &str| {
        f.parse(&GOOD.replace(
            "    upstream_auth: {mode: impersonate, token_file: token}\n    access:\n",
            &format!("    upstream_auth: {{mode: impersonate, token_file: token}}\n    upstream_protocol: {value}\n    access:\n"),
        ))
    };
    for (value, want) in [
        ("http2", UpstreamProtocol::Http2),
        ("http1", UpstreamProtocol::Http1),
        ("mixed", UpstreamProtocol::Mixed),
    ] {
        assert_eq!(with(value).unwrap().clusters[1].upstream_protocol, want);
    }
    let errs = messages(with("h3").unwrap_err()).join("\n");
    assert!(
        errs.contains("clusters[1]") && errs.contains("upstream_protocol"),
        "{errs}"
    );
}

#[test]
fn forward_groups_narrow_impersonate_mode_and_are_refused_elsewhere() {
    let f = Fixture::new();
    let cfg = f.parse(GOOD).unwrap();
    assert!(cfg.clusters.iter().all(|c| c.forward_groups.is_none()));
    let with = |auth: &str| {
        f.parse(&GOOD.replace(
            "    upstream_auth: {mode: impersonate, token_file: token}\n",
            &format!("    upstream_auth: {auth}\n"),
        ))
    };
    let cfg = with("{mode: impersonate, token_file: token, forward_groups: [AAAAAAAA-1111-2222-3333-444444444444, platform-admins]}").unwrap();
    let g = cfg.clusters[1].forward_groups.as_ref().unwrap();
    // Object ids as Entra writes them in tokens (lower case); other names exactly.
    assert!(g.admits(b"aaaaaaaa-1111-2222-3333-444444444444"));
    assert!(g.admits(b"platform-admins"));
    assert!(!g.admits(b"Platform-Admins"));
    assert!(!g.admits(b"other"));
    let cfg = with("{mode: impersonate, token_file: token, forward_groups: []}").unwrap();
    assert!(!cfg.clusters[1]
        .forward_groups
        .as_ref()
        .unwrap()
        .admits(b"ops"));
    for (auth, expected) in [
        (
            "{mode: passthrough, forward_groups: [ops]}",
            "clusters[1].upstream_auth.forward_groups: only mode impersonate",
        ),
        (
            "{mode: impersonate, token_file: token, forward_groups: [ops, \"\"]}",
            "clusters[1].upstream_auth.forward_groups[1]: must be a group name",
        ),
        (
            "{mode: impersonate, token_file: token, forward_groups: ops}",
            "clusters[1]",
        ),
    ] {
        let errs = messages(with(auth).unwrap_err()).join("\n");
        assert!(
            errs.contains(expected),
            "{auth}: missing {expected:?} in:\n{errs}"
        );
    }
}

#[test]
fn the_web_terminal_is_off_unless_asked_for() {
    let f = Fixture::new();
    let base = "  portal:\n    client_id: kube-relay-portal\n    client_secret_file: portal-secret\n    cookie_key_file: cookie.key\n";
    let cfg = with_login(&f, base).unwrap();
    let p = cfg.login.unwrap().portal.unwrap();
    assert!(!p.terminal);
    let cfg = with_login(
        &f,
        &format!("{base}    terminal: true\n    terminal_idle: 5m\n"),
    )
    .unwrap();
    let p = cfg.login.unwrap().portal.unwrap();
    assert!(p.terminal);
    assert_eq!(p.terminal_idle, Duration::from_secs(300));
    let errs =
        messages(with_login(&f, &format!("{base}    terminal_idle: 5m\n")).unwrap_err()).join("\n");
    assert!(
        errs.contains("login.portal.terminal_idle: only used with terminal: true"),
        "{errs}"
    );
    let errs = messages(
        with_login(
            &f,
            &format!("{base}    terminal: true\n    terminal_idle: 9h\n"),
        )
        .unwrap_err(),
    )
    .join("\n");
    assert!(
        errs.contains("login.portal.terminal_idle: must be between 1s and 8h"),
        "{errs}"
    );
}
