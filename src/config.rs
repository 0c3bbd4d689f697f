//! Configuration: the YAML file schema (design.md §3) and the validated runtime [`Config`].
//!
//! Two layers, kept apart on purpose:
//! - `File*` structs mirror the file (serde, `deny_unknown_fields`). They are parsed section by
//!   section (each cluster and issuer on its own), so one typo does not hide the next error.
//! - [`Config`] holds only checked values: parsed URLs and socket addresses, loaded certificate
//!   bundles, validated cluster names, durations. Code that holds a `Config` never re-validates.
//!
//! [`load`] reports *every* problem at once, each with the key path that caused it
//! (`clusters[1].ca_file: cannot read certs/x.crt: No such file or directory`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};
use url::Url;

// === errors ===

/// One configuration problem, with the key path that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// All problems found in one configuration file.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

struct Errors(Vec<ConfigError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

// === file schema ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert_file: String,
    key_file: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileRouting {
    host_suffix: Option<String>,
    path_prefix: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    handshake: Option<String>,
    connect: Option<String>,
    response_header: Option<String>,
    stream_idle: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_connections: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIssuer {
    name: String,
    kind: FileIssuerKind,
    #[serde(default)]
    audiences: Vec<String>,
    tenant_id: Option<String>,
    #[serde(default)]
    required_scopes: Vec<String>,
    #[serde(default)]
    required_roles: Vec<String>,
    authority_host: Option<String>,
    issuer: Option<String>,
    username_claim: Option<String>,
    groups_claim: Option<String>,
    ca_file: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum FileIssuerKind {
    Entra,
    Oidc,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    name: String,
    server: String,
    connect: Option<String>,
    ca_file: String,
    upstream_auth: FileUpstreamAuth,
    #[serde(default)]
    access: Vec<FileAccessRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstreamAuth {
    mode: FileAuthMode,
    token_file: Option<String>,
    azure: Option<serde_yaml_ng::Value>,
    client_cert_file: Option<String>,
    client_key_file: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum FileAuthMode {
    Passthrough,
    Impersonate,
    OnBehalfOf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAccessRule {
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
    issuer: Option<String>,
    #[serde(default)]
    claims: BTreeMap<String, String>,
    verbs: Option<Vec<String>>,
}

// === validated config ===

/// The validated configuration the relay runs on.
#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub public_url: Url,
    /// Lower-case host of `public_url`: a Host naming it names no cluster.
    pub public_host: String,
    pub tls: ServingCert,
    pub admin_listen: Option<SocketAddr>,
    pub routing: Routing,
    pub issuers: Vec<Arc<IssuerConfig>>,
    pub clusters: Vec<Arc<ClusterConfig>>,
    pub timeouts: Timeouts,
    pub limits: Limits,
}

/// The relay's serving certificate chain and key, loaded and checked to match.
pub struct ServingCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("ServingCert")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct Routing {
    /// Lower-case, no leading or trailing dot. `<cluster>.<host_suffix>` names a cluster.
    pub host_suffix: Option<String>,
    /// Starts with `/`, no trailing `/`. `<path_prefix>/<cluster>/…` names a cluster.
    pub path_prefix: String,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    /// TLS handshake plus the first request's headers.
    pub handshake: Duration,
    /// Upstream TCP connect plus TLS handshake.
    pub connect: Duration,
    /// Upstream response headers for requests that are not long-running.
    pub response_header: Duration,
    /// Idle time (no bytes either way) after which a watch, log follow or tunnel is closed.
    pub stream_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            connect: Duration::from_secs(5),
            response_header: Duration::from_secs(60),
            // Watches without timeoutSeconds last 30–60 min on the API server (protocols.md
            // §3.4); the relay must never be the one to cut them first.
            stream_idle: Duration::from_secs(2 * 60 * 60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
        }
    }
}

#[derive(Debug)]
pub struct IssuerConfig {
    pub name: String,
    pub kind: IssuerKind,
    pub audiences: Vec<String>,
    /// Extra trust anchors for the issuer's discovery and JWKS endpoints.
    pub ca: Vec<CertificateDer<'static>>,
}

#[derive(Debug)]
pub enum IssuerKind {
    Oidc {
        issuer: Url,
        /// The exact `iss` string tokens must carry (the configured URL as written).
        issuer_str: String,
        username_claim: String,
        groups_claim: String,
    },
    Entra {
        tenant_id: String,
        authority_host: Url,
        required_scopes: Vec<String>,
        required_roles: Vec<String>,
    },
}

/// A validated cluster name: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

impl ClusterName {
    pub fn parse(s: &str) -> Option<Self> {
        is_cluster_name(s).then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The DNS-label rule for cluster names; also used by the router on untrusted input.
pub fn is_cluster_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[derive(Debug)]
pub struct ClusterConfig {
    pub name: ClusterName,
    pub server: Url,
    /// Host of `server`: the TLS name the upstream certificate must carry, also with `connect`.
    pub server_name: ServerName<'static>,
    /// `host:port` to dial: `connect` when set, else the server's own host and port.
    pub dial: String,
    /// `server`'s path without a trailing `/`, prepended to every forwarded path.
    pub base_path: String,
    pub ca: Vec<CertificateDer<'static>>,
    pub upstream_auth: UpstreamAuth,
    pub access: Vec<AccessRule>,
}

pub enum UpstreamAuth {
    /// The caller's own bearer token goes upstream unchanged.
    Passthrough,
    /// The relay's credential plus `Impersonate-*` headers for the caller.
    Impersonate(RelayCredential),
}

impl fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Passthrough => f.write_str("Passthrough"),
            Self::Impersonate(c) => f.debug_tuple("Impersonate").field(c).finish(),
        }
    }
}

pub enum RelayCredential {
    /// A bearer token read from a file (e.g. a service-account token).
    TokenFile { path: PathBuf, token: String },
    /// A client certificate presented in the upstream TLS handshake.
    ClientCert {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    },
}

impl fmt::Debug for RelayCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets stay out of Debug output, which can reach logs.
        match self {
            Self::TokenFile { path, .. } => f
                .debug_struct("TokenFile")
                .field("path", path)
                .finish_non_exhaustive(),
            Self::ClientCert { chain, .. } => f
                .debug_struct("ClientCert")
                .field("chain_len", &chain.len())
                .finish_non_exhaustive(),
        }
    }
}

/// The Kubernetes verbs an access rule can name.
pub const KNOWN_VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

/// One access rule; a request is admitted when any rule matches (default deny).
#[derive(Debug, Clone, Default)]
pub struct AccessRule {
    /// The caller is in at least one of these groups (when non-empty).
    pub groups: Vec<String>,
    /// The caller's `issuer-name/subject` is one of these (when non-empty).
    pub users: Vec<String>,
    /// The caller's token came from this issuer (when set).
    pub issuer: Option<String>,
    /// Each claim equals the given string (when non-empty).
    pub claims: BTreeMap<String, String>,
    /// The request's verb is one of these (when set).
    pub verbs: Option<BTreeSet<String>>,
}

// === loading ===

/// Loads and validates a configuration file, reporting every problem at once.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base)
}

/// Parses configuration text; relative file paths resolve against `base`.
pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let mut errs = Errors(Vec::new());
    let root: Value = match serde_yaml_ng::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            errs.add("", format!("invalid YAML: {e}"));
            return Err(ConfigErrors(errs.0));
        }
    };
    let Value::Mapping(root) = root else {
        errs.add("", "the configuration must be a YAML mapping");
        return Err(ConfigErrors(errs.0));
    };
    const TOP: &[&str] = &[
        "listen",
        "public_url",
        "tls",
        "admin",
        "routing",
        "identity",
        "clusters",
        "timeouts",
        "limits",
    ];
    for key in root.keys() {
        match key.as_str() {
            Some(k) if TOP.contains(&k) => {}
            Some(k) => errs.add(
                k,
                format!("unknown key (expected one of {})", TOP.join(", ")),
            ),
            None => errs.add("", "keys must be strings"),
        }
    }

    let listen = required::<String>(&root, "listen", &mut errs)
        .and_then(|s| parse_addr(&s, "listen", &mut errs));
    let public_url = required::<String>(&root, "public_url", &mut errs)
        .and_then(|s| parse_https_url(&s, "public_url", &mut errs));
    let tls = required::<FileTls>(&root, "tls", &mut errs).and_then(|t| {
        let chain = load_certs(base, &t.cert_file, "tls.cert_file", &mut errs);
        let key = load_key(base, &t.key_file, "tls.key_file", &mut errs);
        Some(ServingCert {
            chain: chain?,
            key: key?,
        })
    });
    let admin_listen = optional::<FileAdmin>(&root, "admin", &mut errs)
        .flatten()
        .and_then(|a| parse_addr(&a.listen, "admin.listen", &mut errs));
    let routing = optional::<FileRouting>(&root, "routing", &mut errs)
        .flatten()
        .unwrap_or_default();
    let routing = validate_routing(routing, &mut errs);
    let timeouts = optional::<FileTimeouts>(&root, "timeouts", &mut errs)
        .flatten()
        .unwrap_or_default();
    let timeouts = validate_timeouts(timeouts, &mut errs);
    let limits = optional::<FileLimits>(&root, "limits", &mut errs)
        .flatten()
        .unwrap_or_default();
    let limits = Limits {
        max_connections: match limits.max_connections {
            Some(0) => {
                errs.add("limits.max_connections", "must be at least 1");
                1
            }
            Some(n) => n,
            None => Limits::default().max_connections,
        },
    };

    let issuers = parse_issuers(&root, base, &mut errs);
    let issuer_names: BTreeSet<String> = issuers.iter().map(|i| i.name.clone()).collect();
    let clusters = parse_clusters(&root, base, &issuer_names, &mut errs);

    if !errs.0.is_empty() {
        return Err(ConfigErrors(errs.0));
    }
    match (listen, public_url, tls) {
        (Some(listen), Some(public_url), Some(tls)) => {
            let public_host = public_url
                .host_str()
                .unwrap_or_default()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            Ok(Config {
                listen,
                public_url,
                public_host,
                tls,
                admin_listen,
                routing,
                issuers,
                clusters,
                timeouts,
                limits,
            })
        }
        // Each `None` above recorded an error, so this arm is unreachable in practice; it keeps
        // the function total without an unwrap.
        _ => Err(ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: "incomplete configuration".into(),
        }])),
    }
}

fn deserialize_at<T: DeserializeOwned>(v: &Value, path: &str, errs: &mut Errors) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(v.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            let inner = e.path().to_string();
            let full = if inner == "." || inner.is_empty() {
                path.to_owned()
            } else {
                format!("{path}.{inner}")
            };
            errs.add(full, e.into_inner().to_string());
            None
        }
    }
}

fn required<T: DeserializeOwned>(root: &Mapping, key: &str, errs: &mut Errors) -> Option<T> {
    match root.get(key) {
        Some(v) => deserialize_at(v, key, errs),
        None => {
            errs.add(key, "missing required key");
            None
        }
    }
}

/// `Some(None)` when absent, `None` when present but invalid (error recorded).
fn optional<T: DeserializeOwned>(
    root: &Mapping,
    key: &str,
    errs: &mut Errors,
) -> Option<Option<T>> {
    match root.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(v) => deserialize_at(v, key, errs).map(Some),
    }
}

fn parse_addr(s: &str, path: &str, errs: &mut Errors) -> Option<SocketAddr> {
    match s.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.add(
                path,
                format!("`{s}` is not an IP:port socket address (e.g. 0.0.0.0:8443)"),
            );
            None
        }
    }
}

fn parse_https_url(s: &str, path: &str, errs: &mut Errors) -> Option<Url> {
    match Url::parse(s) {
        Ok(u) if u.scheme() == "https" && u.host_str().is_some() => {
            if u.query().is_some() || u.fragment().is_some() || !u.username().is_empty() {
                errs.add(
                    path,
                    format!("`{s}` must not carry a query, fragment or user info"),
                );
                return None;
            }
            Some(u)
        }
        Ok(_) => {
            errs.add(path, format!("`{s}` must be an https:// URL with a host"));
            None
        }
        Err(e) => {
            errs.add(path, format!("`{s}` is not a valid URL: {e}"));
            None
        }
    }
}

fn parse_duration(
    s: &Option<String>,
    path: &str,
    default: Duration,
    errs: &mut Errors,
) -> Duration {
    match s {
        None => default,
        Some(s) => match humantime::parse_duration(s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                errs.add(path, "must be greater than zero");
                default
            }
            Err(e) => {
                errs.add(path, format!("`{s}` is not a duration like 30s or 5m: {e}"));
                default
            }
        },
    }
}

fn validate_timeouts(t: FileTimeouts, errs: &mut Errors) -> Timeouts {
    let d = Timeouts::default();
    Timeouts {
        handshake: parse_duration(&t.handshake, "timeouts.handshake", d.handshake, errs),
        connect: parse_duration(&t.connect, "timeouts.connect", d.connect, errs),
        response_header: parse_duration(
            &t.response_header,
            "timeouts.response_header",
            d.response_header,
            errs,
        ),
        stream_idle: parse_duration(&t.stream_idle, "timeouts.stream_idle", d.stream_idle, errs),
    }
}

fn validate_routing(r: FileRouting, errs: &mut Errors) -> Routing {
    let host_suffix = r.host_suffix.and_then(|s| {
        let s = s.trim_end_matches('.').to_ascii_lowercase();
        let valid = !s.is_empty()
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if valid {
            Some(s)
        } else {
            errs.add(
                "routing.host_suffix",
                format!("`{s}` is not a DNS name (e.g. relay.example.com)"),
            );
            None
        }
    });
    let path_prefix = match r.path_prefix {
        None => "/clusters".to_owned(),
        Some(p) => {
            let trimmed = p.trim_end_matches('/');
            let valid = trimmed.starts_with('/')
                && trimmed.len() > 1
                && trimmed[1..].split('/').all(|seg| {
                    !seg.is_empty()
                        && seg != "."
                        && seg != ".."
                        && seg != "-"
                        && seg
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !valid {
                errs.add(
                    "routing.path_prefix",
                    format!("`{p}` must be an absolute path like /clusters (letters, digits, - and _ only)"),
                );
            }
            trimmed.to_owned()
        }
    };
    Routing {
        host_suffix,
        path_prefix,
    }
}

fn parse_issuers(root: &Mapping, base: &Path, errs: &mut Errors) -> Vec<Arc<IssuerConfig>> {
    let Some(identity) = root.get("identity") else {
        errs.add("identity", "missing required key (at least one issuer)");
        return Vec::new();
    };
    let Value::Mapping(identity) = identity else {
        errs.add("identity", "must be a mapping with an `issuers` list");
        return Vec::new();
    };
    for key in identity.keys() {
        if key.as_str() != Some("issuers") {
            errs.add(
                format!("identity.{}", key.as_str().unwrap_or("?")),
                "unknown key (expected issuers)",
            );
        }
    }
    let Some(Value::Sequence(items)) = identity.get("issuers") else {
        errs.add(
            "identity.issuers",
            "must be a list with at least one issuer",
        );
        return Vec::new();
    };
    if items.is_empty() {
        errs.add("identity.issuers", "must list at least one issuer");
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("identity.issuers[{i}]");
        let Some(f) = deserialize_at::<FileIssuer>(item, &path, errs) else {
            continue;
        };
        if f.name.is_empty() || f.name.contains('/') || f.name.chars().any(char::is_whitespace) {
            errs.add(
                format!("{path}.name"),
                "must be non-empty without `/` or spaces",
            );
        }
        if !seen.insert(f.name.clone()) {
            errs.add(
                format!("{path}.name"),
                format!("duplicate issuer name `{}`", f.name),
            );
        }
        if f.audiences.is_empty() || f.audiences.iter().any(String::is_empty) {
            errs.add(
                format!("{path}.audiences"),
                "must list at least one non-empty audience",
            );
        }
        let ca = match &f.ca_file {
            Some(file) => {
                load_certs(base, file, &format!("{path}.ca_file"), errs).unwrap_or_default()
            }
            None => Vec::new(),
        };
        let kind = match f.kind {
            FileIssuerKind::Oidc => {
                for (key, present) in [
                    ("tenant_id", f.tenant_id.is_some()),
                    ("authority_host", f.authority_host.is_some()),
                    ("required_scopes", !f.required_scopes.is_empty()),
                    ("required_roles", !f.required_roles.is_empty()),
                ] {
                    if present {
                        errs.add(format!("{path}.{key}"), "only valid for kind: entra");
                    }
                }
                let Some(issuer_str) = f.issuer.clone() else {
                    errs.add(
                        format!("{path}.issuer"),
                        "missing: kind oidc needs the issuer URL",
                    );
                    continue;
                };
                let Some(issuer) = parse_https_url(&issuer_str, &format!("{path}.issuer"), errs)
                else {
                    continue;
                };
                IssuerKind::Oidc {
                    issuer,
                    issuer_str,
                    username_claim: f.username_claim.clone().unwrap_or_else(|| "sub".into()),
                    groups_claim: f.groups_claim.clone().unwrap_or_else(|| "groups".into()),
                }
            }
            FileIssuerKind::Entra => {
                for (key, present) in [
                    ("issuer", f.issuer.is_some()),
                    ("username_claim", f.username_claim.is_some()),
                    ("groups_claim", f.groups_claim.is_some()),
                ] {
                    if present {
                        errs.add(format!("{path}.{key}"), "only valid for kind: oidc");
                    }
                }
                let tenant_id = f.tenant_id.clone().unwrap_or_default();
                if !is_guid(&tenant_id) {
                    errs.add(
                        format!("{path}.tenant_id"),
                        "must be the tenant's GUID (Entra issuers accept one tenant)",
                    );
                }
                let host = f
                    .authority_host
                    .clone()
                    .unwrap_or_else(|| "https://login.microsoftonline.com".into());
                let Some(authority_host) =
                    parse_https_url(&host, &format!("{path}.authority_host"), errs)
                else {
                    continue;
                };
                IssuerKind::Entra {
                    tenant_id: tenant_id.to_ascii_lowercase(),
                    authority_host,
                    required_scopes: f.required_scopes.clone(),
                    required_roles: f.required_roles.clone(),
                }
            }
        };
        out.push(Arc::new(IssuerConfig {
            name: f.name,
            kind,
            audiences: f.audiences,
            ca,
        }));
    }
    out
}

fn parse_clusters(
    root: &Mapping,
    base: &Path,
    issuer_names: &BTreeSet<String>,
    errs: &mut Errors,
) -> Vec<Arc<ClusterConfig>> {
    let items = match root.get("clusters") {
        Some(Value::Sequence(items)) => items.clone(),
        Some(_) => {
            errs.add("clusters", "must be a list");
            return Vec::new();
        }
        None => {
            errs.add("clusters", "missing required key (at least one cluster)");
            return Vec::new();
        }
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("clusters[{i}]");
        let Some(f) = deserialize_at::<FileCluster>(item, &path, errs) else {
            continue;
        };
        let name = ClusterName::parse(&f.name);
        if name.is_none() {
            errs.add(
                format!("{path}.name"),
                format!(
                    "`{}` is not a valid cluster name: lower-case letters, digits and `-`, starting and ending with a letter or digit, at most 63 characters",
                    f.name
                ),
            );
        }
        if !seen.insert(f.name.clone()) {
            errs.add(
                format!("{path}.name"),
                format!("duplicate cluster `{}`", f.name),
            );
        }
        let server = parse_https_url(&f.server, &format!("{path}.server"), errs);
        let server_name = server.as_ref().and_then(|u| {
            let host = u.host_str()?.trim_start_matches('[').trim_end_matches(']');
            match ServerName::try_from(host.to_owned()) {
                Ok(n) => Some(n),
                Err(_) => {
                    errs.add(
                        format!("{path}.server"),
                        format!("`{host}` is not a valid TLS server name"),
                    );
                    None
                }
            }
        });
        let dial = match (&f.connect, &server) {
            (Some(c), _) => {
                if valid_host_port(c) {
                    Some(c.clone())
                } else {
                    errs.add(
                        format!("{path}.connect"),
                        format!("`{c}` must be host:port or ip:port (e.g. 10.20.0.4:443)"),
                    );
                    None
                }
            }
            (None, Some(u)) => u
                .host_str()
                .map(|h| format!("{}:{}", h, u.port_or_known_default().unwrap_or(443))),
            (None, None) => None,
        };
        let ca = load_certs(base, &f.ca_file, &format!("{path}.ca_file"), errs);
        let upstream_auth = parse_upstream_auth(&f.upstream_auth, base, &path, errs);
        let access = parse_access(&f.access, issuer_names, &path, errs);
        if let (Some(name), Some(server), Some(server_name), Some(dial), Some(ca), Some(auth)) =
            (name, server, server_name, dial, ca, upstream_auth)
        {
            let base_path = server.path().trim_end_matches('/').to_owned();
            out.push(Arc::new(ClusterConfig {
                name,
                server,
                server_name,
                dial,
                base_path,
                ca,
                upstream_auth: auth,
                access,
            }));
        }
    }
    if items.is_empty() {
        errs.add("clusters", "must list at least one cluster");
    }
    out
}

fn valid_host_port(s: &str) -> bool {
    if s.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match s.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok_and(|p| p != 0)
                && !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        }
        None => false,
    }
}

fn parse_upstream_auth(
    f: &FileUpstreamAuth,
    base: &Path,
    cluster_path: &str,
    errs: &mut Errors,
) -> Option<UpstreamAuth> {
    let path = format!("{cluster_path}.upstream_auth");
    match f.mode {
        FileAuthMode::Passthrough => {
            for (key, present) in [
                ("token_file", f.token_file.is_some()),
                ("azure", f.azure.is_some()),
                ("client_cert_file", f.client_cert_file.is_some()),
                ("client_key_file", f.client_key_file.is_some()),
                ("client_id", f.client_id.is_some()),
                ("client_secret_file", f.client_secret_file.is_some()),
            ] {
                if present {
                    errs.add(
                        format!("{path}.{key}"),
                        "not used with mode passthrough (the caller's own token goes upstream)",
                    );
                }
            }
            Some(UpstreamAuth::Passthrough)
        }
        FileAuthMode::Impersonate => {
            if f.client_id.is_some() || f.client_secret_file.is_some() {
                errs.add(
                    format!("{path}.client_id"),
                    "client_id/client_secret_file belong to mode on_behalf_of",
                );
            }
            if f.azure.is_some() {
                errs.add(
                    format!("{path}.azure"),
                    "Azure credentials for impersonation are not supported by this build yet; use token_file or client_cert_file",
                );
                return None;
            }
            match (&f.token_file, &f.client_cert_file, &f.client_key_file) {
                (Some(file), None, None) => {
                    let p = base.join(file);
                    match std::fs::read_to_string(&p) {
                        Ok(t) if !t.trim().is_empty() => {
                            Some(UpstreamAuth::Impersonate(RelayCredential::TokenFile {
                                path: p,
                                token: t.trim().to_owned(),
                            }))
                        }
                        Ok(_) => {
                            errs.add(
                                format!("{path}.token_file"),
                                format!("{} is empty", p.display()),
                            );
                            None
                        }
                        Err(e) => {
                            errs.add(
                                format!("{path}.token_file"),
                                format!("cannot read {}: {e}", p.display()),
                            );
                            None
                        }
                    }
                }
                (None, Some(cert), Some(key)) => {
                    let chain = load_certs(base, cert, &format!("{path}.client_cert_file"), errs);
                    let key = load_key(base, key, &format!("{path}.client_key_file"), errs);
                    Some(UpstreamAuth::Impersonate(RelayCredential::ClientCert {
                        chain: chain?,
                        key: key?,
                    }))
                }
                (None, Some(_), None) | (None, None, Some(_)) => {
                    errs.add(
                        path,
                        "client_cert_file and client_key_file must be given together",
                    );
                    None
                }
                (None, None, None) => {
                    errs.add(
                        path,
                        "mode impersonate needs the relay's own credential: token_file, or client_cert_file + client_key_file",
                    );
                    None
                }
                _ => {
                    errs.add(
                        path,
                        "give exactly one credential: token_file or a client certificate",
                    );
                    None
                }
            }
        }
        FileAuthMode::OnBehalfOf => {
            errs.add(
                format!("{path}.mode"),
                "on_behalf_of is not supported by this build yet; use passthrough or impersonate",
            );
            None
        }
    }
}

fn parse_access(
    rules: &[FileAccessRule],
    issuer_names: &BTreeSet<String>,
    cluster_path: &str,
    errs: &mut Errors,
) -> Vec<AccessRule> {
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let path = format!("{cluster_path}.access[{i}]");
        if r.groups.is_empty() && r.users.is_empty() && r.issuer.is_none() {
            // A rule with no subject would admit every authenticated caller: make that explicit.
            errs.add(
                &path,
                "a rule must name groups, users or an issuer (an empty rule would admit everyone)",
            );
        }
        if !r.claims.is_empty() && r.issuer.is_none() {
            errs.add(
                format!("{path}.claims"),
                "claim matchers need `issuer` in the same rule",
            );
        }
        for (j, u) in r.users.iter().enumerate() {
            match u.split_once('/') {
                Some((iss, sub)) if !sub.is_empty() && issuer_names.contains(iss) => {}
                Some((iss, _)) if !issuer_names.contains(iss) => errs.add(
                    format!("{path}.users[{j}]"),
                    format!("`{u}`: no issuer named `{iss}` in identity.issuers"),
                ),
                _ => errs.add(
                    format!("{path}.users[{j}]"),
                    format!("`{u}` must be issuer-name/subject (e.g. contoso/<object-id>)"),
                ),
            }
        }
        if let Some(iss) = &r.issuer {
            if !issuer_names.contains(iss) {
                errs.add(
                    format!("{path}.issuer"),
                    format!("no issuer named `{iss}` in identity.issuers"),
                );
            }
        }
        let verbs = r.verbs.as_ref().map(|vs| {
            if vs.is_empty() {
                errs.add(
                    format!("{path}.verbs"),
                    "an empty verb list would admit nothing; remove the rule or name verbs",
                );
            }
            for (j, v) in vs.iter().enumerate() {
                if !KNOWN_VERBS.contains(&v.as_str()) {
                    errs.add(
                        format!("{path}.verbs[{j}]"),
                        format!(
                            "unknown verb `{v}` (expected one of {})",
                            KNOWN_VERBS.join(", ")
                        ),
                    );
                }
            }
            vs.iter().cloned().collect::<BTreeSet<_>>()
        });
        out.push(AccessRule {
            groups: r.groups.clone(),
            users: r.users.clone(),
            issuer: r.issuer.clone(),
            claims: r.claims.clone(),
            verbs,
        });
    }
    out
}

fn is_guid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn load_certs(
    base: &Path,
    file: &str,
    path: &str,
    errs: &mut Errors,
) -> Option<Vec<CertificateDer<'static>>> {
    let p = base.join(file);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) => {
            errs.add(path, format!("cannot read {}: {e}", p.display()));
            return None;
        }
    };
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    match certs {
        Ok(c) if !c.is_empty() => {
            for (i, cert) in c.iter().enumerate() {
                if webpki_parse_ok(cert).is_err() {
                    errs.add(
                        path,
                        format!(
                            "certificate #{} in {} is not a valid X.509 certificate",
                            i + 1,
                            p.display()
                        ),
                    );
                    return None;
                }
            }
            Some(c)
        }
        Ok(_) => {
            errs.add(path, format!("{} holds no PEM certificate", p.display()));
            None
        }
        Err(e) => {
            errs.add(path, format!("{} is not valid PEM: {e:?}", p.display()));
            None
        }
    }
}

/// A cheap structural check that a DER blob is an X.509 certificate, via rustls's own verifier
/// machinery (building a root store parses each certificate).
fn webpki_parse_ok(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let mut store = rustls::RootCertStore::empty();
    store.add(cert.clone().into_owned())
}

fn load_key(
    base: &Path,
    file: &str,
    path: &str,
    errs: &mut Errors,
) -> Option<PrivateKeyDer<'static>> {
    let p = base.join(file);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) => {
            errs.add(path, format!("cannot read {}: {e}", p.display()));
            return None;
        }
    };
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(k) => Some(k),
        Err(_) => {
            errs.add(
                path,
                format!(
                    "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                    p.display()
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests;
