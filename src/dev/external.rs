//! `kube-relay dev --add-context NAME`: puts the dev relay in front of a real cluster from the
//! user's own kubeconfig as well (kind, minikube, a reachable AKS), so a newcomer sees the relay
//! work on a real API server in one command.
//!
//! The context's server and CA become the relay's upstream; its credential becomes the relay's
//! own upstream credential in `impersonate` mode, so the cluster sees the dev user (`alice`,
//! groups `dev:admins`) impersonated by that credential. Only credentials the relay can present
//! itself are taken: a bearer token (`token`, `tokenFile`) or a client certificate (file or
//! data). Exec plugins and auth providers are refused with a hint, as is
//! `insecure-skip-tls-verify` (the relay always verifies the cluster).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use serde_json::Value;

/// One cluster taken from the user's kubeconfig, its files written into the dev directory.
pub(super) struct External {
    /// The relay's name for it (the context name made a valid cluster name).
    pub name: String,
    /// The kubeconfig context it came from.
    pub context: String,
    /// The `clusters:` entry for relay.yaml (an indented list item).
    pub yaml: String,
}

/// The kubeconfig `kubectl` would read: the first of `$KUBECONFIG`, else `~/.kube/config`.
pub(super) fn default_kubeconfig() -> Option<PathBuf> {
    if let Some(list) = std::env::var_os("KUBECONFIG") {
        if let Some(first) = std::env::split_paths(&list).find(|p| !p.as_os_str().is_empty()) {
            return Some(first);
        }
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config"))
}

/// A context name as a relay cluster name (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63):
/// lower-cased, anything else becomes `-`.
pub(super) fn cluster_name(context: &str) -> String {
    let mapped: String = context
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = mapped.trim_matches('-').to_owned();
    while name.contains("--") {
        name = name.replace("--", "-");
    }
    name.truncate(63);
    name.trim_end_matches('-').to_owned()
}

/// Reads `contexts` from `kubeconfig` and writes each one's CA and credential into `dir`.
pub(super) fn load(
    kubeconfig: &Path,
    contexts: &[String],
    dir: &Path,
) -> anyhow::Result<Vec<External>> {
    let text = std::fs::read_to_string(kubeconfig)
        .with_context(|| format!("--add-context: cannot read {}", kubeconfig.display()))?;
    let doc: Value = serde_yaml_ng::from_str(&text).with_context(|| {
        format!(
            "--add-context: {} is not a kubeconfig",
            kubeconfig.display()
        )
    })?;
    let base = kubeconfig.parent().unwrap_or(Path::new("."));
    let mut out: Vec<External> = Vec::new();
    for context in contexts {
        let ext = one(&doc, base, context, dir)
            .with_context(|| format!("--add-context {context} (from {})", kubeconfig.display()))?;
        if ["alpha", "beta"].contains(&ext.name.as_str()) || out.iter().any(|e| e.name == ext.name)
        {
            bail!(
                "--add-context {context}: the relay would name it {:?}, which is already taken",
                ext.name
            );
        }
        out.push(ext);
    }
    Ok(out)
}

fn named<'a>(doc: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    doc[list]
        .as_array()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
}

fn one(doc: &Value, base: &Path, context: &str, dir: &Path) -> anyhow::Result<External> {
    let ctx = named(doc, "contexts", context)
        .map(|c| &c["context"])
        .with_context(|| format!("no context named {context:?}"))?;
    let cluster_ref = ctx["cluster"]
        .as_str()
        .context("the context names no cluster")?;
    let user_ref = ctx["user"].as_str().context("the context names no user")?;
    let cluster = named(doc, "clusters", cluster_ref)
        .map(|c| &c["cluster"])
        .with_context(|| format!("no cluster named {cluster_ref:?}"))?;
    let user = named(doc, "users", user_ref)
        .map(|u| &u["user"])
        .with_context(|| format!("no user named {user_ref:?}"))?;
    let name = cluster_name(context);
    if name.is_empty() {
        bail!("the context name has no letters or digits to name a cluster after");
    }

    let server: url::Url = cluster["server"]
        .as_str()
        .context("the cluster has no server")?
        .parse()
        .context("the cluster's server is not a URL")?;
    if server.scheme() != "https" {
        bail!("the cluster's server {server} is not https: the relay only talks TLS to clusters");
    }
    if cluster["insecure-skip-tls-verify"].as_bool() == Some(true) {
        bail!("the cluster sets insecure-skip-tls-verify; the relay always verifies a cluster's certificate (add its CA to the kubeconfig)");
    }
    let ca_file = format!("ext-{name}-ca.crt");
    let ca = pem_of(cluster, "certificate-authority", base)?.context(
        "the cluster has no certificate-authority(-data); the relay needs the cluster CA",
    )?;
    std::fs::write(dir.join(&ca_file), ca)?;

    let auth = if let Some(token) = user["token"].as_str() {
        let f = format!("ext-{name}-token");
        super::write_private(&dir.join(&f), token)?;
        format!("{{mode: impersonate, token_file: {f}}}")
    } else if let Some(path) = user["tokenFile"].as_str() {
        let token = std::fs::read_to_string(base.join(path))
            .with_context(|| format!("reading tokenFile {path}"))?;
        let f = format!("ext-{name}-token");
        super::write_private(&dir.join(&f), token.trim())?;
        format!("{{mode: impersonate, token_file: {f}}}")
    } else if let (Some(cert), Some(key)) = (
        pem_of(user, "client-certificate", base)?,
        pem_of(user, "client-key", base)?,
    ) {
        let (cf, kf) = (
            format!("ext-{name}-client.crt"),
            format!("ext-{name}-client.key"),
        );
        std::fs::write(dir.join(&cf), cert)?;
        super::write_private(&dir.join(&kf), &key)?;
        format!("{{mode: impersonate, client_cert_file: {cf}, client_key_file: {kf}}}")
    } else if !user["exec"].is_null() || !user["auth-provider"].is_null() {
        bail!("user {user_ref:?} signs in through an exec plugin or auth provider, which the relay cannot run as its own credential; use a context whose user has a token (e.g. from `kubectl create token`) or a client certificate");
    } else {
        bail!("user {user_ref:?} has neither a token nor a client certificate");
    };

    // A kubeconfig's tls-server-name is the name to verify and the server URL's host where to
    // dial; relay.yaml says the same with `server` (the TLS name) and `connect`.
    let host = server
        .host_str()
        .context("the cluster's server has no host")?;
    let port = server.port_or_known_default().unwrap_or(443);
    let dial = format!("{host}:{port}");
    let (tls_name, connect) = match cluster["tls-server-name"].as_str() {
        Some(n) => (format!("{n}:{port}"), format!("\n    connect: \"{dial}\"")),
        None => (dial.clone(), String::new()),
    };
    let path = server.path().trim_end_matches('/');
    let yaml = format!(
        "  - name: {name}   # from your kubeconfig context {context:?}\n    server: \"https://{tls_name}{path}\"{connect}\n    ca_file: {ca_file}\n    upstream_auth: {auth}\n    access:\n      - users: [{issuer}/alice]\n",
        issuer = super::ISSUER_NAME,
    );
    Ok(External {
        name,
        context: context.to_owned(),
        yaml,
    })
}

/// `<key>-data` (base64 PEM) or `<key>` (a file, relative to the kubeconfig's directory).
fn pem_of(entry: &Value, key: &str, base: &Path) -> anyhow::Result<Option<String>> {
    if let Some(data) = entry[format!("{key}-data").as_str()].as_str() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .with_context(|| format!("{key}-data is not base64"))?;
        let pem = String::from_utf8(bytes).with_context(|| format!("{key}-data is not PEM"))?;
        return Ok(Some(pem));
    }
    match entry[key].as_str() {
        Some(path) => Ok(Some(
            std::fs::read_to_string(base.join(path))
                .with_context(|| format!("reading {key} {path}"))?,
        )),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_names_become_cluster_names() {
        assert_eq!(cluster_name("kind-kind"), "kind-kind");
        assert_eq!(
            cluster_name("arn:aws:eks:eu-west-1:1234:cluster/Prod"),
            "arn-aws-eks-eu-west-1-1234-cluster-prod"
        );
        assert_eq!(cluster_name("--Dev__Box--"), "dev-box");
        assert_eq!(cluster_name(&"a".repeat(80)).len(), 63);
    }

    #[test]
    fn refuses_what_the_relay_cannot_present_or_verify() {
        let dir =
            std::env::temp_dir().join(format!("kube-relay-ext-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let kc = |cluster: &str, user: &str| {
            format!("apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {cluster}}}]\nusers: [{{name: u, user: {user}}}]\ncontexts: [{{name: ctx, context: {{cluster: c, user: u}}}}]\n")
        };
        let ca = base64::engine::general_purpose::STANDARD.encode("-----BEGIN CERTIFICATE-----\n");
        let with_ca = format!("{{server: 'https://h:6443', certificate-authority-data: {ca}}}");
        let cases = [
            (
                kc(
                    "{server: 'https://h:6443', insecure-skip-tls-verify: true}",
                    "{token: t}",
                ),
                "insecure-skip-tls-verify",
            ),
            (kc("{server: 'http://h:8080'}", "{token: t}"), "not https"),
            (kc(&with_ca, "{exec: {command: kubelogin}}"), "exec plugin"),
            (
                kc("{server: 'https://h:6443'}", "{token: t}"),
                "certificate-authority",
            ),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let path = dir.join(format!("kc{i}"));
            std::fs::write(&path, text).unwrap();
            let err = load(&path, &["ctx".into()], &dir).err().expect("refused");
            assert!(format!("{err:#}").contains(want), "{err:#}");
        }
        let path = dir.join("ok");
        let named = format!("{{server: 'https://10.0.0.1:6443', tls-server-name: api.kind.test, certificate-authority-data: {ca}}}");
        std::fs::write(&path, kc(&named, "{token: t0k}")).unwrap();
        let ext = load(&path, &["ctx".into()], &dir).unwrap();
        assert!(
            ext[0]
                .yaml
                .contains("server: \"https://api.kind.test:6443\""),
            "{}",
            ext[0].yaml
        );
        assert!(
            ext[0].yaml.contains("connect: \"10.0.0.1:6443\""),
            "{}",
            ext[0].yaml
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("ext-ctx-token")).unwrap(),
            "t0k"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
