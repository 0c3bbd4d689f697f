use super::*;
use crate::wire::kubeconfig::EXEC_API;

fn list(clusters: &[(&str, &str)]) -> ClusterList {
    ClusterList {
        api_version: "kube-relay.io/v1".into(),
        kind: "ClusterList".into(),
        user: ListUser {
            username: "alice".into(),
            issuer: "idp".into(),
            groups: vec![],
        },
        relay: RelayInfo {
            public_url: "https://relay.example.com:8443".into(),
            certificate_authority_data: Some("Q0E=".into()),
        },
        login: None,
        clusters: clusters
            .iter()
            .map(|(name, mode)| ClusterEntry {
                name: (*name).into(),
                server: format!("https://relay.example.com:8443/clusters/{name}"),
                sni_server: Some(format!("https://{name}.relay.example.com:8443")),
                tls_server_name: Some(format!("{name}.relay.example.com")),
                upstream_auth: (*mode).into(),
                verbs: None,
                namespaces: None,
                auth_contexts: Vec::new(),
                healthy: true,
            })
            .collect(),
    }
}

fn opts(style: Style) -> Options {
    Options {
        style,
        plugin: Plugin::KubeRelay,
        exec_command: "kube-relay".into(),
        name_prefix: String::new(),
        relay_args: Some(vec!["token".into(), "--client-id".into(), "cli".into()]),
        passthrough_args: Some(vec!["token".into(), "--scope".into(), "aks".into()]),
    }
}

fn names(doc: &Value, section: &str) -> Vec<String> {
    doc[section]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn path_style_sets_tls_server_name_and_ca() {
    let doc = build(&list(&[("alpha", "impersonate")]), &opts(Style::Path)).unwrap();
    let c = &doc["clusters"][0]["cluster"];
    assert_eq!(
        c["server"].as_str(),
        Some("https://relay.example.com:8443/clusters/alpha")
    );
    assert_eq!(
        c["tls-server-name"].as_str(),
        Some("alpha.relay.example.com")
    );
    assert_eq!(c["certificate-authority-data"].as_str(), Some("Q0E="));
    let exec = &doc["users"][0]["user"]["exec"];
    assert_eq!(exec["apiVersion"].as_str(), Some(EXEC_API));
    assert_eq!(exec["interactiveMode"].as_str(), Some("IfAvailable"));
    assert_eq!(exec["args"][0].as_str(), Some("token"));
    assert_eq!(doc["current-context"].as_str(), Some("alpha"));
}

#[test]
fn sni_style_and_passthrough_user() {
    let doc = build(
        &list(&[("alpha", "impersonate"), ("aks", "passthrough")]),
        &opts(Style::Sni),
    )
    .unwrap();
    assert_eq!(
        doc["clusters"][1]["cluster"]["server"].as_str(),
        Some("https://aks.relay.example.com:8443")
    );
    assert!(doc["clusters"][1]["cluster"]
        .get("tls-server-name")
        .is_none());
    assert_eq!(
        names(&doc, "users"),
        ["relay.example.com", "relay.example.com-passthrough"]
    );
    assert_eq!(
        doc["contexts"][1]["context"]["user"].as_str(),
        Some("relay.example.com-passthrough")
    );
    assert_eq!(
        doc["users"][1]["user"]["exec"]["args"][2].as_str(),
        Some("aks")
    );
}

#[test]
fn sni_style_without_suffix_is_a_clear_error() {
    let mut l = list(&[("alpha", "impersonate")]);
    l.clusters[0].sni_server = None;
    let e = build(&l, &opts(Style::Sni)).unwrap_err().to_string();
    assert!(e.contains("--style path"), "{e}");
}

const EXISTING: &str = r#"
apiVersion: v1
kind: Config
current-context: work
preferences: {colors: true}
clusters:
- name: work
  cluster: {server: "https://work.example.org", insecure-skip-tls-verify: false}
contexts:
- name: work
  context: {cluster: work, user: me, namespace: team}
users:
- name: me
  user: {token: keep-me}
"#;

#[test]
fn merge_keeps_unrelated_entries_and_current_context() {
    let mut existing: Value = serde_yaml_ng::from_str(EXISTING).unwrap();
    let new = build(
        &list(&[("alpha", "impersonate"), ("beta", "impersonate")]),
        &opts(Style::Path),
    )
    .unwrap();
    let report = merge(
        &mut existing,
        &new,
        "https://relay.example.com:8443/",
        false,
    )
    .unwrap();
    assert_eq!(report.added, ["alpha", "beta"]);
    assert_eq!(names(&existing, "clusters"), ["work", "alpha", "beta"]);
    assert_eq!(names(&existing, "contexts"), ["work", "alpha", "beta"]);
    assert_eq!(names(&existing, "users"), ["me", "relay.example.com"]);
    // Untouched: the user's entries, their unknown keys, preferences and current context.
    assert_eq!(
        existing["users"][0]["user"]["token"].as_str(),
        Some("keep-me")
    );
    assert_eq!(
        existing["contexts"][0]["context"]["namespace"].as_str(),
        Some("team")
    );
    assert_eq!(existing["preferences"]["colors"].as_bool(), Some(true));
    assert_eq!(existing["current-context"].as_str(), Some("work"));
}

#[test]
fn merge_again_updates_and_prunes_only_this_relays_entries() {
    let mut existing: Value = serde_yaml_ng::from_str(EXISTING).unwrap();
    let first = build(
        &list(&[("alpha", "impersonate"), ("beta", "impersonate")]),
        &opts(Style::Path),
    )
    .unwrap();
    merge(
        &mut existing,
        &first,
        "https://relay.example.com:8443",
        false,
    )
    .unwrap();
    // Another relay's entries are not this relay's to prune.
    let mut other = list(&[("gamma", "impersonate")]);
    other.relay.public_url = "https://other.example.net".into();
    let other_doc = build(&other, &opts(Style::Path)).unwrap();
    merge(
        &mut existing,
        &other_doc,
        "https://other.example.net",
        false,
    )
    .unwrap();

    // Access to beta was withdrawn: the second run drops it, keeps everything else.
    let second = build(&list(&[("alpha", "impersonate")]), &opts(Style::Path)).unwrap();
    let report = merge(
        &mut existing,
        &second,
        "https://relay.example.com:8443",
        false,
    )
    .unwrap();
    assert_eq!(report.updated, ["alpha"]);
    assert_eq!(report.removed, ["beta"]);
    assert_eq!(names(&existing, "contexts"), ["work", "gamma", "alpha"]);
    assert_eq!(
        names(&existing, "users"),
        ["me", "other.example.net", "relay.example.com"]
    );
}

#[test]
fn merge_refuses_to_clobber_someone_elses_entry() {
    let mut existing: Value = serde_yaml_ng::from_str(EXISTING).unwrap();
    let before = existing.clone();
    let new = build(&list(&[("work", "impersonate")]), &opts(Style::Path)).unwrap();
    let e = merge(&mut existing, &new, "https://relay.example.com:8443", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--context-prefix"), "{e}");
    assert_eq!(existing, before, "nothing changed on refusal");
    // With a prefix there is no clash.
    let mut o = opts(Style::Path);
    o.name_prefix = "relay-".into();
    let new = build(&list(&[("work", "impersonate")]), &o).unwrap();
    merge(&mut existing, &new, "https://relay.example.com:8443", false).unwrap();
    assert_eq!(names(&existing, "contexts"), ["work", "relay-work"]);
    // --force replaces it.
    let new = build(&list(&[("work", "impersonate")]), &opts(Style::Path)).unwrap();
    merge(&mut existing, &new, "https://relay.example.com:8443", true).unwrap();
    assert_eq!(
        existing["clusters"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|c| c["name"].as_str() == Some("work"))
            .count(),
        1
    );
}

#[test]
fn merge_into_empty_sets_current_context() {
    let mut existing = Value::Null;
    let new = build(&list(&[("alpha", "impersonate")]), &opts(Style::Path)).unwrap();
    merge(&mut existing, &new, "https://relay.example.com:8443", false).unwrap();
    assert_eq!(existing["current-context"].as_str(), Some("alpha"));
    assert_eq!(existing["kind"].as_str(), Some("Config"));
}

#[test]
fn write_keeps_a_backup_with_private_modes() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/config");
    let doc: Value = serde_yaml_ng::from_str(EXISTING).unwrap();
    assert_eq!(write_with_backup(&path, &doc).unwrap(), None);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut doc2 = doc.clone();
    doc2["current-context"] = Value::String("x".into());
    let backup = write_with_backup(&path, &doc2).unwrap().unwrap();
    let old: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&backup).unwrap()).unwrap();
    assert_eq!(old["current-context"].as_str(), Some("work"));
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

/// A kubeconfig that is a symlink (dotfiles managers) stays one: the merge lands in its target.
#[test]
fn write_follows_a_symlinked_kubeconfig() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("dotfiles/kubeconfig");
    std::fs::create_dir_all(real.parent().unwrap()).unwrap();
    std::fs::write(&real, EXISTING).unwrap();
    let link = dir.path().join("config");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut doc: Value = serde_yaml_ng::from_str(EXISTING).unwrap();
    doc["current-context"] = Value::String("x".into());
    let backup = write_with_backup(&link, &doc).unwrap().unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let now: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&real).unwrap()).unwrap();
    assert_eq!(now["current-context"].as_str(), Some("x"));
    let old: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&backup).unwrap()).unwrap();
    assert_eq!(old["current-context"].as_str(), Some("work"));
    let mode = std::fs::metadata(&real).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn debug_never_prints_the_token() {
    let args = KubeconfigArgs {
        relay: url::Url::parse("https://relay.example.com").unwrap(),
        kubeconfig: None,
        style: Style::Path,
        plugin: Plugin::KubeRelay,
        context_prefix: String::new(),
        force: false,
        exec_command: "kube-relay".into(),
        login: None,
        audience: None,
        token: Some("eyJsecret-bearer".into()),
        relay_ca_file: None,
        idp_ca_file: None,
        cache_dir: None,
    };
    let d = format!("{args:?}");
    assert!(
        !d.contains("eyJsecret-bearer") && d.contains("<redacted>"),
        "{d}"
    );
}

#[test]
fn kubelogin_for_passthrough_clusters_uses_the_aks_server_id() {
    let mut l = list(&[("alpha", "impersonate"), ("aks", "passthrough")]);
    l.login = Some(LoginParams {
        kind: "entra".into(),
        issuer: None,
        tenant_id: Some("72f988bf-86f1-41af-91ab-2d7cd011db47".into()),
        authority_host: None,
        client_id: "80faf920-1908-4b52-b5ef-a8e7bedfc67a".into(),
        scopes: vec!["api://kube-relay/user_impersonation".into()],
        resource: None,
        passthrough_scopes: vec!["6dae42f8-4368-4678-94ff-3960e28e3630/.default".into()],
    });
    let mut o = opts(Style::Path);
    o.plugin = Plugin::Kubelogin;
    let doc = build(&l, &o).unwrap();
    // The relay-audience cluster keeps `kube-relay token`; the passthrough one runs kubelogin
    // with the AKS server id, as `az aks get-credentials` + kubelogin would.
    assert_eq!(
        doc["users"][0]["user"]["exec"]["command"].as_str(),
        Some("kube-relay")
    );
    let exec = &doc["users"][1]["user"]["exec"];
    assert_eq!(exec["command"].as_str(), Some("kubelogin"));
    let args: Vec<&str> = exec["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "get-token",
            "--login",
            "devicecode",
            "--server-id",
            "6dae42f8-4368-4678-94ff-3960e28e3630",
            "--client-id",
            "80faf920-1908-4b52-b5ef-a8e7bedfc67a",
            "--tenant-id",
            "72f988bf-86f1-41af-91ab-2d7cd011db47",
            "--environment",
            "AzurePublicCloud"
        ]
    );
    // Generic OIDC relays cannot use Azure kubelogin: a clear error.
    l.login.as_mut().unwrap().kind = "oidc".into();
    let e = build(&l, &o).unwrap_err().to_string();
    assert!(e.contains("Entra issuers only"), "{e}");
}

#[test]
fn step_up_contexts_ask_for_their_authentication_context() {
    let mut l = list(&[("alpha", "impersonate"), ("aks", "passthrough")]);
    l.clusters[0].auth_contexts = vec!["c1".into()];
    l.clusters[1].auth_contexts = vec!["c1".into(), "c2".into()];
    let doc = build(&l, &opts(Style::Path)).unwrap();
    assert_eq!(
        names(&doc, "contexts"),
        ["alpha", "alpha@c1", "aks", "aks@c1", "aks@c2"]
    );
    assert_eq!(
        names(&doc, "users"),
        [
            "relay.example.com",
            "relay.example.com-passthrough",
            "relay.example.com@c1",
            "relay.example.com-passthrough@c1",
            "relay.example.com-passthrough@c2",
        ]
    );
    // Same cluster entry, a user whose plugin asks for the context.
    assert_eq!(
        doc["contexts"][1]["context"]["cluster"].as_str(),
        Some("alpha")
    );
    assert_eq!(
        doc["contexts"][1]["context"]["user"].as_str(),
        Some("relay.example.com@c1")
    );
    let args: Vec<&str> = doc["users"][2]["user"]["exec"]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        ["token", "--client-id", "cli", "--auth-context", "c1"]
    );
    // The step-up users are the relay's, even with kubelogin for passthrough (it cannot ask
    // for a claims challenge).
    let mut o = opts(Style::Path);
    o.plugin = Plugin::Kubelogin;
    l.login = None;
    assert!(build(&l, &o).is_err(), "kubelogin needs the login settings");
}
