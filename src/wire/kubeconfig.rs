//! The kubeconfig document for a cluster list: one cluster, context and user entry per
//! cluster, exec users running `kube-relay token` (or kubelogin), every entry marked as the
//! relay's. Written by `kube-relay kubeconfig` (merged into the user's file) and served by the
//! portal's download, so both write the same thing.

use anyhow::bail;
use base64::Engine as _;
use serde_yaml_ng::{Mapping, Value};

use super::clusters::ClusterList;
use super::login::LoginArgs;

/// The extension marking kubeconfig entries written for a relay.
pub const EXTENSION: &str = "kube-relay.io/relay";
pub(crate) const EXEC_API: &str = "client.authentication.k8s.io/v1";

/// Which URL form the contexts use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Style {
    /// `https://relay/clusters/<name>` (+ `tls-server-name`): one DNS name and certificate.
    #[default]
    Path,
    /// `https://<name>.<host_suffix>`: needs wildcard DNS and certificate.
    Sni,
}

/// Which credential plugin the users run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Plugin {
    /// `kube-relay token` for every cluster.
    #[default]
    KubeRelay,
    /// Azure `kubelogin get-token` for passthrough clusters (AKS server id); `kube-relay token`
    /// for the others. Entra issuers only.
    Kubelogin,
}

/// How to build the kubeconfig.
#[derive(Clone, Debug)]
pub struct Options {
    pub style: Style,
    pub plugin: Plugin,
    /// The command the exec entries run (`kube-relay` from PATH by default).
    pub exec_command: String,
    /// Prepended to cluster, context and user names (e.g. `contoso-`).
    pub name_prefix: String,
    /// Exec args for a login (`args after "token"`), for relay-audience and passthrough users.
    /// `None`: the relay has no login section; the user entry then says how to get a token.
    pub relay_args: Option<Vec<String>>,
    pub passthrough_args: Option<Vec<String>>,
}

/// The relay's host, for naming users.
fn relay_label(public_url: &str) -> String {
    url::Url::parse(public_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "kube-relay".into())
}

pub(crate) fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

pub(crate) fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

fn marker(public_url: &str) -> Value {
    Value::Sequence(vec![map(vec![
        ("name", s(EXTENSION)),
        (
            "extension",
            map(vec![
                ("apiVersion", s("kube-relay.io/v1")),
                ("kind", s("RelayEntry")),
                ("publicUrl", s(public_url)),
            ]),
        ),
    ])])
}

fn exec_user(cmd: &str, args: &[String], public_url: &str) -> Value {
    map(vec![(
        "exec",
        map(vec![
            ("apiVersion", s(EXEC_API)),
            ("command", s(cmd)),
            (
                "args",
                Value::Sequence(args.iter().map(|a| s(a)).collect()),
            ),
            // Browser and device sign-in need a person; kubectl tells the plugin whether one is
            // there, and the plugin fails fast (with what to run) when not.
            ("interactiveMode", s("IfAvailable")),
            ("provideClusterInfo", Value::Bool(false)),
            (
                "installHint",
                s(&format!(
                    "kubectl needs `{cmd}` to sign in to kube-relay. Install the kube-relay CLI (see {public_url}/ for instructions) and put it on PATH."
                )),
            ),
        ]),
    )])
}

/// The kubeconfig for `list`, as a YAML value with `clusters`, `contexts`, `users` and a
/// `current-context` (the first cluster).
pub fn build(list: &ClusterList, opts: &Options) -> anyhow::Result<Value> {
    let public_url = list.relay.public_url.trim_end_matches('/');
    let host = relay_label(public_url);
    let relay_user = format!("{}{host}", opts.name_prefix);
    let passthrough_user = format!("{}{host}-passthrough", opts.name_prefix);
    let mut clusters = Vec::new();
    let mut contexts = Vec::new();
    let mut needs_relay_user = false;
    let mut needs_passthrough_user = false;
    // (passthrough, authentication context): users that sign in with a step-up.
    let mut step_up_users = std::collections::BTreeSet::new();
    for c in &list.clusters {
        let name = format!("{}{}", opts.name_prefix, c.name);
        let mut cluster = Vec::new();
        match (opts.style, &c.sni_server) {
            (Style::Sni, Some(sni)) => cluster.push(("server", s(sni))),
            (Style::Sni, None) => bail!(
                "the relay has no host suffix, so SNI-style contexts cannot be built; use --style path"
            ),
            (Style::Path, _) => {
                cluster.push(("server", s(&c.server)));
                if let Some(t) = &c.tls_server_name {
                    cluster.push(("tls-server-name", s(t)));
                }
            }
        }
        if let Some(ca) = &list.relay.certificate_authority_data {
            cluster.push(("certificate-authority-data", s(ca)));
        }
        cluster.push(("extensions", marker(public_url)));
        clusters.push(map(vec![("name", s(&name)), ("cluster", map(cluster))]));
        let passthrough = c.upstream_auth == "passthrough";
        let user = if passthrough {
            needs_passthrough_user = true;
            &passthrough_user
        } else {
            needs_relay_user = true;
            &relay_user
        };
        contexts.push(map(vec![
            ("name", s(&name)),
            (
                "context",
                map(vec![
                    ("cluster", s(&name)),
                    ("user", s(user)),
                    ("extensions", marker(public_url)),
                ]),
            ),
        ]));
        // Rules with `auth_context` admit only step-up tokens: one more context per context,
        // same cluster, whose user asks for it (`kube-relay token --auth-context`).
        for ctx in &c.auth_contexts {
            step_up_users.insert((passthrough, ctx.clone()));
            contexts.push(map(vec![
                ("name", s(&format!("{name}@{ctx}"))),
                (
                    "context",
                    map(vec![
                        ("cluster", s(&name)),
                        ("user", s(&format!("{user}@{ctx}"))),
                        ("extensions", marker(public_url)),
                    ]),
                ),
            ]));
        }
    }
    let mut users = Vec::new();
    let mut add_user = |name: &str,
                        args: Option<&Vec<String>>,
                        passthrough: bool|
     -> anyhow::Result<()> {
        let user = match (opts.plugin, passthrough, args) {
            (Plugin::Kubelogin, true, _) => kubelogin_user(list)?,
            (_, _, Some(args)) => exec_user(&opts.exec_command, args, public_url),
            (_, _, None) => bail!(
                "the relay at {public_url} has no `login` section, so it cannot say how to sign in; ask its operators, or use a token you already have with `kubectl --token`"
            ),
        };
        let mut u = match user {
            Value::Mapping(m) => m,
            _ => Mapping::new(),
        };
        u.insert(s("extensions"), marker(public_url));
        users.push(map(vec![("name", s(name)), ("user", Value::Mapping(u))]));
        Ok(())
    };
    if needs_relay_user {
        add_user(&relay_user, opts.relay_args.as_ref(), false)?;
    }
    if needs_passthrough_user {
        add_user(&passthrough_user, opts.passthrough_args.as_ref(), true)?;
    }
    for (passthrough, ctx) in &step_up_users {
        let (base, args) = if *passthrough {
            (&passthrough_user, opts.passthrough_args.as_ref())
        } else {
            (&relay_user, opts.relay_args.as_ref())
        };
        let args = args.map(|a| {
            let mut a = a.clone();
            a.extend(["--auth-context".to_owned(), ctx.clone()]);
            a
        });
        // kubelogin cannot ask for a claims challenge: step-up users always run kube-relay.
        let user = match &args {
            Some(args) => exec_user(&opts.exec_command, args, public_url),
            None => bail!(
                "the relay at {public_url} has no `login` section, so it cannot say how to sign in; ask its operators, or use a token you already have with `kubectl --token`"
            ),
        };
        let mut u = match user {
            Value::Mapping(m) => m,
            _ => Mapping::new(),
        };
        u.insert(s("extensions"), marker(public_url));
        users.push(map(vec![
            ("name", s(&format!("{base}@{ctx}"))),
            ("user", Value::Mapping(u)),
        ]));
    }
    let current = contexts
        .first()
        .and_then(|c| c.get("name"))
        .cloned()
        .unwrap_or(s(""));
    Ok(map(vec![
        ("apiVersion", s("v1")),
        ("kind", s("Config")),
        ("clusters", Value::Sequence(clusters)),
        ("contexts", Value::Sequence(contexts)),
        ("users", Value::Sequence(users)),
        ("current-context", current),
        ("preferences", Value::Mapping(Mapping::new())),
    ]))
}

/// Azure kubelogin for passthrough clusters: a token for the AKS server app, as
/// `az aks get-credentials` + `kubelogin convert-kubeconfig` would write.
fn kubelogin_user(list: &ClusterList) -> anyhow::Result<Value> {
    let Some(login) = &list.login else {
        bail!("--plugin kubelogin needs the relay's login settings (it has no `login` section)");
    };
    let (Some(tenant), "entra") = (&login.tenant_id, login.kind.as_str()) else {
        bail!("--plugin kubelogin works with Entra issuers only; this relay signs in with a generic OIDC issuer");
    };
    let server_id = login
        .passthrough_scopes
        .first()
        .map(|s| s.trim_end_matches("/.default").to_owned())
        .unwrap_or_else(|| crate::config::AKS_SERVER_APP.to_owned());
    let mut args = vec![
        "get-token".to_owned(),
        "--login".into(),
        "devicecode".into(),
        "--server-id".into(),
        server_id,
        "--client-id".into(),
        login.client_id.clone(),
        "--tenant-id".into(),
        tenant.clone(),
    ];
    if let Some(h) = &login.authority_host {
        args.push("--authority-host".into());
        args.push(format!("{}/", h.trim_end_matches('/')));
    } else {
        args.extend(["--environment".into(), "AzurePublicCloud".into()]);
    }
    Ok(map(vec![(
        "exec",
        map(vec![
            ("apiVersion", s(EXEC_API)),
            ("command", s("kubelogin")),
            (
                "args",
                Value::Sequence(args.iter().map(|a| s(a)).collect()),
            ),
            ("interactiveMode", s("IfAvailable")),
            ("provideClusterInfo", Value::Bool(false)),
            (
                "installHint",
                s("kubelogin is not installed: see https://azure.github.io/kubelogin/install.html"),
            ),
        ]),
    )]))
}

/// The exec `args` for a login: `token` and its flags.
pub fn token_args(l: &LoginArgs) -> Vec<String> {
    std::iter::once("token".to_owned())
        .chain(l.to_exec_args())
        .collect()
}

/// Base64 of PEM text, as kubeconfig `certificate-authority-data` wants it.
pub fn ca_data(pem: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(pem.as_bytes())
}
