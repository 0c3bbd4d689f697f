//! Configuration: the YAML file schema (docs/architecture.md "Configuration") and the validated
//! runtime [`Config`].
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

mod access;
mod clusters;
mod issuers;
mod login;
mod recording;

pub use access::*;
pub use clusters::*;
pub use issuers::*;
pub use login::*;
pub use recording::*;

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    File(PathBuf),
    Off,
}

/// What happens to requests while audit records cannot be written (`audit.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditMode {
    /// Requests go on; records that cannot be written are counted (`relay_audit_dropped_total`).
    #[default]
    BestEffort,
    /// Every answer waits until its record is written; while records cannot be written,
    /// requests are refused with 503.
    Blocking,
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert_file: String,
    key_file: String,
    /// The CA that issued `cert_file` when it is private: published to clients (`/-/clusters`,
    /// generated kubeconfigs) so they can verify the relay without extra steps.
    ca_file: Option<String>,
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
    write_stall: Option<String>,
    token_grace: Option<String>,
    drain_delay: Option<String>,
    drain_window: Option<String>,
    drain_timeout: Option<String>,
    health_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileAudit {
    path: Option<String>,
    mode: Option<AuditMode>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_connections: Option<u32>,
    max_connections_per_source: Option<u32>,
    auth_failures_per_minute: Option<u32>,
    per_identity_requests_per_second: Option<u32>,
    per_identity_burst: Option<u32>,
    per_identity_streams: Option<u32>,
}

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
    pub audit: AuditSink,
    pub audit_mode: AuditMode,
    /// PEM of the CA behind the serving certificate when it is private (`tls.ca_file`).
    pub public_ca_pem: Option<String>,
    /// How people get tokens for this relay: `kube-relay token`, generated kubeconfigs and the
    /// browser portal. `None`: only bearer tokens obtained elsewhere; the portal says so.
    pub login: Option<LoginConfig>,
    /// Where exec and attach recordings go and who may play them back; `None` when no cluster
    /// records.
    pub recording: Option<RecordingConfig>,
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
    /// How long a watch, log follow or tunnel may wait on a client that takes none of its bytes
    /// before the relay ends it (docs/security.md F4). A watch over HTTP/2 is reset alone; one
    /// over HTTP/1.1 ends with its connection.
    pub write_stall: Duration,
    /// How long a watch, log follow or tunnel may outlive the caller's token (`exp`) before the
    /// relay closes it; client-go then reconnects with a fresh token.
    pub token_grace: Duration,
    /// After SIGTERM, new connections are still accepted this long (readiness already fails).
    pub drain_delay: Duration,
    /// Watches are closed at random moments within this window; tunnels at its end.
    pub drain_window: Duration,
    /// The process exits by this deadline whatever is still open.
    pub drain_timeout: Duration,
    /// How often each cluster is probed.
    pub health_interval: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            connect: Duration::from_secs(5),
            response_header: Duration::from_secs(60),
            // Watches without timeoutSeconds last 30–60 min on the API server (docs/protocols.md
            // §3.4); the relay must never be the one to cut them first.
            stream_idle: Duration::from_secs(2 * 60 * 60),
            // Long enough for a person who paused a pager on `kubectl logs -f`, short enough
            // that a hung client does not pin a watch and its upstream stream for hours.
            write_stall: Duration::from_secs(5 * 60),
            token_grace: Duration::from_secs(5 * 60),
            drain_delay: Duration::from_secs(5),
            drain_window: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(60),
            health_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: u32,
    /// Open connections one source address may hold (NAT gateways: size generously).
    pub max_connections_per_source: u32,
    /// Failed authentications per source address per minute before 429.
    pub auth_failures_per_minute: u32,
    /// Sustained requests per second per identity (issuer, subject), and the burst above it.
    pub per_identity_requests_per_second: u32,
    pub per_identity_burst: u32,
    /// Concurrent long-running requests (watch, logs -f, exec, attach, port-forward) per identity.
    pub per_identity_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_source: 1_000,
            auth_failures_per_minute: 60,
            per_identity_requests_per_second: 100,
            per_identity_burst: 400,
            per_identity_streams: 1000,
        }
    }
}

/// Entra's public-cloud authority.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";

/// A secret read from a file. Debug prints only `<redacted>`, so no derive can leak it.
#[derive(Clone)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(s: String) -> Self {
        Self(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

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
        "audit",
        "login",
        "recording",
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
    let mut public_ca_pem = None;
    let tls = required::<FileTls>(&root, "tls", &mut errs).and_then(|t| {
        if let Some(ca) = &t.ca_file {
            if load_certs(base, ca, "tls.ca_file", &mut errs).is_some() {
                public_ca_pem = std::fs::read_to_string(base.join(ca)).ok();
            }
        }
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
    let d = Limits::default();
    let mut limit = |v: Option<u32>, key: &str, default: u32| {
        at_least_one(v, &format!("limits.{key}"), default, &mut errs)
    };
    let limits = Limits {
        max_connections: limit(limits.max_connections, "max_connections", d.max_connections),
        max_connections_per_source: limit(
            limits.max_connections_per_source,
            "max_connections_per_source",
            d.max_connections_per_source,
        ),
        auth_failures_per_minute: limit(
            limits.auth_failures_per_minute,
            "auth_failures_per_minute",
            d.auth_failures_per_minute,
        ),
        per_identity_requests_per_second: limit(
            limits.per_identity_requests_per_second,
            "per_identity_requests_per_second",
            d.per_identity_requests_per_second,
        ),
        per_identity_burst: limit(
            limits.per_identity_burst,
            "per_identity_burst",
            d.per_identity_burst,
        ),
        per_identity_streams: limit(
            limits.per_identity_streams,
            "per_identity_streams",
            d.per_identity_streams,
        ),
    };

    let file_audit = optional::<FileAudit>(&root, "audit", &mut errs).flatten();
    let audit_mode = file_audit.as_ref().and_then(|a| a.mode).unwrap_or_default();
    let audit = match file_audit {
        None => AuditSink::Stdout,
        Some(FileAudit { path: None, .. }) => AuditSink::Stdout,
        Some(FileAudit { path: Some(p), .. }) => match p.as_str() {
            "-" => AuditSink::Stdout,
            "off" => AuditSink::Off,
            "" => {
                errs.add("audit.path", "must be `-` (stdout), `off`, or a file path");
                AuditSink::Off
            }
            file => AuditSink::File(base.join(file)),
        },
    };
    if audit == AuditSink::Off && audit_mode == AuditMode::Blocking {
        errs.add(
            "audit.mode",
            "blocking needs an audit sink (audit.path is off): requests would all be refused",
        );
    }
    let issuers = parse_issuers(&root, base, &mut errs);
    let issuer_names: BTreeSet<String> = issuers.iter().map(|i| i.name.clone()).collect();
    let clusters = parse_clusters(&root, base, &issuer_names, &mut errs);
    let login = parse_login(&root, base, &issuers, &mut errs);
    let recording = parse_recording(&root, base, &issuer_names, &clusters, &mut errs);

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
                audit,
                audit_mode,
                public_ca_pem,
                login,
                recording,
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

fn at_least_one(v: Option<u32>, path: &str, default: u32, errs: &mut Errors) -> u32 {
    match v {
        Some(0) => {
            errs.add(path, "must be at least 1");
            1
        }
        Some(n) => n,
        None => default,
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
        write_stall: parse_duration(&t.write_stall, "timeouts.write_stall", d.write_stall, errs),
        token_grace: parse_duration(&t.token_grace, "timeouts.token_grace", d.token_grace, errs),
        drain_delay: parse_duration(&t.drain_delay, "timeouts.drain_delay", d.drain_delay, errs),
        drain_window: parse_duration(
            &t.drain_window,
            "timeouts.drain_window",
            d.drain_window,
            errs,
        ),
        drain_timeout: parse_duration(
            &t.drain_timeout,
            "timeouts.drain_timeout",
            d.drain_timeout,
            errs,
        ),
        health_interval: parse_duration(
            &t.health_interval,
            "timeouts.health_interval",
            d.health_interval,
            errs,
        ),
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

/// A GUID in its canonical 8-4-4-4-12 hex form (Entra tenant, object and application ids).
/// An `https://host[:port]` URL with no path, query or credentials (an authority or API host);
/// `example` goes into the error.
fn parse_https_origin(value: &str, path: &str, example: &str, errs: &mut Errors) -> Option<Url> {
    match Url::parse(value) {
        Ok(u)
            if u.scheme() == "https"
                && u.host_str().is_some()
                && u.path() == "/"
                && u.query().is_none()
                && u.username().is_empty() =>
        {
            Some(u)
        }
        _ => {
            errs.add(
                path,
                format!("must be an https:// URL with no path, e.g. {example}"),
            );
            None
        }
    }
}

pub fn is_guid(s: &str) -> bool {
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
