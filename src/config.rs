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

// === errors ===

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    File(PathBuf),
    Off,
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

// === file schema ===

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
struct FileLogin {
    issuer: String,
    client_id: String,
    scopes: Option<Vec<String>>,
    resource: Option<String>,
    passthrough_scopes: Option<Vec<String>>,
    portal: Option<FilePortal>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePortal {
    client_id: String,
    client_secret_file: String,
    cookie_key_file: String,
    session_lifetime: Option<String>,
    sign_out_at_provider: Option<bool>,
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
    algorithms: Option<Vec<String>>,
    key_refresh_interval: Option<String>,
    key_refresh_cooldown: Option<String>,
    max_key_staleness: Option<String>,
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
    azure: Option<FileAzure>,
    client_cert_file: Option<String>,
    client_key_file: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<String>,
    /// OBO: the certificate whose key signs the relay's client assertion.
    client_certificate_file: Option<String>,
    federated: Option<FileFederated>,
    tenant_id: Option<String>,
    authority_host: Option<String>,
    scope: Option<String>,
    ca_file: Option<String>,
}

/// `upstream_auth.azure`: the relay's own Azure identity, used with mode impersonate.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAzure {
    credential: FileAzureKind,
    client_id: Option<String>,
    tenant_id: Option<String>,
    client_secret_file: Option<String>,
    federated_token_file: Option<String>,
    authority_host: Option<String>,
    scope: Option<String>,
    ca_file: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum FileAzureKind {
    ManagedIdentity,
    WorkloadIdentity,
    ClientSecret,
}

/// `upstream_auth.federated`: OBO client authentication by a federated assertion.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFederated {
    credential: FileAzureKind,
    client_id: Option<String>,
    federated_token_file: Option<String>,
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
    #[serde(default)]
    apps: Vec<String>,
    namespaces: Option<Vec<String>>,
    #[serde(default)]
    allow_impersonation: bool,
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
    pub audit: AuditSink,
    /// PEM of the CA behind the serving certificate when it is private (`tls.ca_file`).
    pub public_ca_pem: Option<String>,
    /// How people get tokens for this relay: `kube-relay token`, generated kubeconfigs and the
    /// browser portal. `None`: only bearer tokens obtained elsewhere; the portal says so.
    pub login: Option<LoginConfig>,
}

/// The `login` section: which issuer people sign in with and as which client.
#[derive(Debug)]
pub struct LoginConfig {
    /// One of `identity.issuers`: tokens it issues are what the relay validates.
    pub issuer: Arc<IssuerConfig>,
    /// Public client (no secret) for `kube-relay token`'s browser and device-code flows.
    pub client_id: String,
    /// Scopes asked for so the access token is for this relay (e.g.
    /// `api://kube-relay/user_impersonation`). `openid` is not implied.
    pub scopes: Vec<String>,
    /// RFC 8707 resource indicator, for generic OIDC providers that pick the token audience by it.
    pub resource: Option<String>,
    /// Scopes for clusters in `passthrough` mode, whose token goes upstream unchanged and so must
    /// carry the cluster's own audience. Entra default: the AKS server app's `.default` scope.
    pub passthrough_scopes: Vec<String>,
    pub portal: Option<PortalConfig>,
}

impl LoginConfig {
    /// The `issuer` the OpenID configuration at [`Self::discovery_url`] must name: the configured
    /// OIDC issuer, or Entra's v2 issuer for the tenant.
    pub fn expected_issuer(&self) -> String {
        match &self.issuer.kind {
            IssuerKind::Oidc { issuer_str, .. } => issuer_str.clone(),
            IssuerKind::Entra {
                tenant_id,
                authority_host,
                ..
            } => format!(
                "{}/{tenant_id}/v2.0",
                authority_host.as_str().trim_end_matches('/')
            ),
        }
    }

    /// Where the issuer's OpenID configuration (authorization, token and device endpoints) is.
    pub fn discovery_url(&self) -> String {
        match &self.issuer.kind {
            IssuerKind::Oidc { issuer_str, .. } => format!(
                "{}/.well-known/openid-configuration",
                issuer_str.trim_end_matches('/')
            ),
            IssuerKind::Entra {
                tenant_id,
                authority_host,
                ..
            } => format!(
                "{}/{tenant_id}/v2.0/.well-known/openid-configuration",
                authority_host.as_str().trim_end_matches('/')
            ),
        }
    }
}

/// The browser portal's confidential client and session cookie settings.
#[derive(Debug)]
pub struct PortalConfig {
    pub client_id: String,
    pub client_secret: SecretString,
    /// Seals the session cookie; every replica reads the same file, so any replica can open a
    /// cookie another one sealed.
    pub cookie_key: CookieKey,
    pub session_lifetime: Duration,
    /// Sign-out also ends the browser's session at the identity provider (OpenID Connect
    /// RP-initiated logout), returning to `<public_url>/-/signed-out`, which must be registered
    /// with the provider. Off by default: an unregistered return address is an error page at
    /// some providers.
    pub sign_out_at_provider: bool,
}

/// 32 bytes derived from `cookie_key_file`. Debug never prints them.
#[derive(Clone)]
pub struct CookieKey(pub [u8; 32]);

impl fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
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

#[derive(Debug)]
pub struct IssuerConfig {
    pub name: String,
    pub kind: IssuerKind,
    pub audiences: Vec<String>,
    /// Extra trust anchors for the issuer's discovery and JWKS endpoints.
    pub ca: Vec<CertificateDer<'static>>,
    /// Signature algorithms accepted (RS256 and/or ES256; Entra signs with RS256 only).
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub keys: KeyPolicy,
}

/// How an issuer's signing keys are kept fresh (docs/protocols.md §2.3).
#[derive(Debug, Clone)]
pub struct KeyPolicy {
    /// Background refresh period while the IdP answers.
    pub refresh_interval: Duration,
    /// At most one fetch per this window for tokens with an unknown `kid`, however many arrive.
    pub unknown_kid_cooldown: Duration,
    /// Keys last fetched longer ago than this are no longer trusted (stale-if-error limit).
    pub max_staleness: Duration,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(3600),
            unknown_kid_cooldown: Duration::from_secs(300),
            max_staleness: Duration::from_secs(24 * 3600),
        }
    }
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
    /// The caller's token is exchanged with Entra's on-behalf-of grant (docs/architecture.md
    /// "Identity and upstream credentials").
    OnBehalfOf(OboConfig),
}

impl fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Passthrough => f.write_str("Passthrough"),
            Self::Impersonate(c) => f.debug_tuple("Impersonate").field(c).finish(),
            Self::OnBehalfOf(c) => f.debug_tuple("OnBehalfOf").field(c).finish(),
        }
    }
}

pub enum RelayCredential {
    /// A bearer token read from a file (e.g. a service-account token). `token` is the content
    /// at start-up; the credential layer re-reads the file when it changes.
    TokenFile { path: PathBuf, token: String },
    /// A client certificate presented in the upstream TLS handshake.
    ClientCert {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    },
    /// A token for the AKS audience from the relay's Azure identity (azure_identity).
    Azure(AzureCredentialConfig),
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
            Self::Azure(a) => f.debug_tuple("Azure").field(a).finish(),
        }
    }
}

/// The Entra application id of the AKS server app: the audience of every AKS-managed Entra
/// cluster (docs/protocols.md §4.2).
pub const AKS_SERVER_APP: &str = "6dae42f8-4368-4678-94ff-3960e28e3630";
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

/// Where Entra lives for one credential: the authority, the scope asked for, and the roots its
/// TLS certificate must chain to (`None`: the public web PKI).
#[derive(Debug, Clone)]
pub struct EntraEndpoint {
    pub authority_host: Url,
    pub scope: String,
    pub tenant_id: Option<String>,
    pub ca: Option<Vec<CertificateDer<'static>>>,
}

/// `upstream_auth.azure` with mode impersonate.
#[derive(Debug, Clone)]
pub struct AzureCredentialConfig {
    pub kind: AzureCredentialKind,
    /// The client id of the user-assigned managed identity, the workload identity or the app.
    pub client_id: Option<String>,
    pub endpoint: EntraEndpoint,
}

#[derive(Debug, Clone)]
pub enum AzureCredentialKind {
    /// The VM's / pod's managed identity (IMDS, or `IDENTITY_ENDPOINT` where that is set).
    ManagedIdentity,
    /// Kubernetes workload identity: a projected service-account token, exchanged for an
    /// Entra token as a client assertion.
    WorkloadIdentity { federated_token_file: PathBuf },
    /// An app registration's client secret.
    ClientSecret { secret: SecretString },
}

/// `upstream_auth` with mode on_behalf_of.
#[derive(Debug)]
pub struct OboConfig {
    /// The relay's app registration (the confidential client of the OBO grant).
    pub client_id: String,
    pub client_auth: OboClientAuth,
    pub endpoint: EntraEndpoint,
}

/// How the relay proves it is `client_id` to Entra.
pub enum OboClientAuth {
    Secret(SecretString),
    /// A client assertion JWT signed with the key of this certificate (`x5t#S256` header).
    Certificate {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    },
    /// A federated assertion from the relay's managed identity (token for
    /// `api://AzureADTokenExchange`), with the identity's client id when user-assigned.
    FederatedManagedIdentity {
        client_id: Option<String>,
    },
    /// A federated assertion read from a projected service-account token file.
    FederatedTokenFile {
        path: PathBuf,
    },
}

impl fmt::Debug for OboClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets and keys stay out of Debug output.
        match self {
            Self::Secret(_) => f.write_str("Secret(<redacted>)"),
            Self::Certificate { chain, .. } => f
                .debug_struct("Certificate")
                .field("chain_len", &chain.len())
                .finish_non_exhaustive(),
            Self::FederatedManagedIdentity { client_id } => f
                .debug_struct("FederatedManagedIdentity")
                .field("client_id", client_id)
                .finish(),
            Self::FederatedTokenFile { path } => f
                .debug_struct("FederatedTokenFile")
                .field("path", path)
                .finish(),
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
    /// The caller's client application (`appid`/`azp`) is one of these (when non-empty).
    pub apps: Vec<String>,
    /// The caller's token came from this issuer (when set).
    pub issuer: Option<String>,
    /// Each claim matches the given pattern (when non-empty): exact, or with `*` wildcards.
    pub claims: BTreeMap<String, String>,
    /// The request's verb is one of these (when set).
    pub verbs: Option<BTreeSet<String>>,
    /// The request is inside one of these namespaces (when set); cluster-scoped resources are
    /// then out of reach, discovery stays open.
    pub namespaces: Option<BTreeSet<String>>,
    /// Callers admitted by this rule may impersonate (`kubectl --as`); off by default.
    pub allow_impersonation: bool,
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
        "audit",
        "login",
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

    let audit = match optional::<FileAudit>(&root, "audit", &mut errs).flatten() {
        None => AuditSink::Stdout,
        Some(FileAudit { path: None }) => AuditSink::Stdout,
        Some(FileAudit { path: Some(p) }) => match p.as_str() {
            "-" => AuditSink::Stdout,
            "off" => AuditSink::Off,
            "" => {
                errs.add("audit.path", "must be `-` (stdout), `off`, or a file path");
                AuditSink::Off
            }
            file => AuditSink::File(base.join(file)),
        },
    };
    let issuers = parse_issuers(&root, base, &mut errs);
    let issuer_names: BTreeSet<String> = issuers.iter().map(|i| i.name.clone()).collect();
    let clusters = parse_clusters(&root, base, &issuer_names, &mut errs);
    let login = parse_login(&root, base, &issuers, &mut errs);

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
                public_ca_pem,
                login,
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
        let defaults = KeyPolicy::default();
        let keys = KeyPolicy {
            refresh_interval: parse_duration(
                &f.key_refresh_interval,
                &format!("{path}.key_refresh_interval"),
                defaults.refresh_interval,
                errs,
            ),
            unknown_kid_cooldown: parse_duration(
                &f.key_refresh_cooldown,
                &format!("{path}.key_refresh_cooldown"),
                defaults.unknown_kid_cooldown,
                errs,
            ),
            max_staleness: parse_duration(
                &f.max_key_staleness,
                &format!("{path}.max_key_staleness"),
                defaults.max_staleness,
                errs,
            ),
        };
        let algorithms = match &f.algorithms {
            None if f.kind == FileIssuerKind::Entra => vec![jsonwebtoken::Algorithm::RS256],
            None => vec![
                jsonwebtoken::Algorithm::RS256,
                jsonwebtoken::Algorithm::ES256,
            ],
            Some(list) => {
                let mut out = Vec::new();
                for (j, a) in list.iter().enumerate() {
                    match a.as_str() {
                        "RS256" => out.push(jsonwebtoken::Algorithm::RS256),
                        "ES256" => out.push(jsonwebtoken::Algorithm::ES256),
                        other => errs.add(
                            format!("{path}.algorithms[{j}]"),
                            format!("`{other}` is not allowed (RS256 or ES256)"),
                        ),
                    }
                }
                if list.is_empty() {
                    errs.add(format!("{path}.algorithms"), "must name RS256 and/or ES256");
                }
                out
            }
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
            algorithms,
            keys,
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
    // Keys that belong to one mode only; naming them under another mode is a mistake worth
    // reporting rather than silently ignoring.
    let impersonate_keys = [
        ("token_file", f.token_file.is_some()),
        ("azure", f.azure.is_some()),
        ("client_cert_file", f.client_cert_file.is_some()),
    ];
    let obo_keys = [
        ("client_id", f.client_id.is_some()),
        ("client_secret_file", f.client_secret_file.is_some()),
        (
            "client_certificate_file",
            f.client_certificate_file.is_some(),
        ),
        ("federated", f.federated.is_some()),
        ("tenant_id", f.tenant_id.is_some()),
        ("authority_host", f.authority_host.is_some()),
        ("scope", f.scope.is_some()),
        ("ca_file", f.ca_file.is_some()),
    ];
    match f.mode {
        FileAuthMode::Passthrough => {
            let key_file = [("client_key_file", f.client_key_file.is_some())];
            for (key, present) in impersonate_keys.iter().chain(&obo_keys).chain(&key_file) {
                if *present {
                    errs.add(
                        format!("{path}.{key}"),
                        "not used with mode passthrough (the caller's own token goes upstream)",
                    );
                }
            }
            Some(UpstreamAuth::Passthrough)
        }
        FileAuthMode::Impersonate => {
            for (key, present) in obo_keys {
                if present {
                    errs.add(
                        format!("{path}.{key}"),
                        "belongs to mode on_behalf_of (for an Azure identity use the azure: block)",
                    );
                }
            }
            let given = [
                f.token_file.is_some(),
                f.client_cert_file.is_some() || f.client_key_file.is_some(),
                f.azure.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if given > 1 {
                errs.add(
                    path,
                    "give exactly one credential: token_file, a client certificate, or azure",
                );
                return None;
            }
            if let Some(a) = &f.azure {
                let cred = parse_azure(a, base, &format!("{path}.azure"), errs)?;
                return Some(UpstreamAuth::Impersonate(RelayCredential::Azure(cred)));
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
                _ => {
                    errs.add(
                        path,
                        "mode impersonate needs the relay's own credential: token_file, client_cert_file + client_key_file, or azure",
                    );
                    None
                }
            }
        }
        FileAuthMode::OnBehalfOf => parse_obo(f, base, &path, errs),
    }
}

fn guid_key(
    value: Option<&String>,
    key_path: String,
    required: bool,
    errs: &mut Errors,
) -> Option<String> {
    match value {
        Some(v) if is_guid(v) => Some(v.to_ascii_lowercase()),
        Some(_) => {
            errs.add(
                key_path,
                "must be a GUID (an Entra tenant, client or object id)",
            );
            None
        }
        None => {
            if required {
                errs.add(key_path, "is required");
            }
            None
        }
    }
}

/// Reads a secret file: trimmed, non-empty. The content never appears in an error.
fn read_secret(
    base: &Path,
    file: &str,
    key_path: String,
    errs: &mut Errors,
) -> Option<SecretString> {
    let p = base.join(file);
    match std::fs::read_to_string(&p) {
        Ok(s) if !s.trim().is_empty() => Some(SecretString::new(s.trim().to_owned())),
        Ok(_) => {
            errs.add(key_path, format!("{} is empty", p.display()));
            None
        }
        Err(e) => {
            errs.add(key_path, format!("cannot read {}: {e}", p.display()));
            None
        }
    }
}

/// The optional `login` section.
fn parse_login(
    root: &Mapping,
    base: &Path,
    issuers: &[Arc<IssuerConfig>],
    errs: &mut Errors,
) -> Option<LoginConfig> {
    let l = optional::<FileLogin>(root, "login", errs).flatten()?;
    let issuer = issuers.iter().find(|i| i.name == l.issuer).cloned();
    if issuer.is_none() && !issuers.is_empty() {
        errs.add(
            "login.issuer",
            format!(
                "no issuer named {:?} in identity.issuers (have: {})",
                l.issuer,
                issuers
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    if l.client_id.trim().is_empty() {
        errs.add("login.client_id", "must not be empty");
    }
    let scopes = l.scopes.unwrap_or_default();
    if scopes
        .iter()
        .any(|s| s.trim().is_empty() || s.contains(' '))
    {
        errs.add("login.scopes", "each scope must be one non-empty word");
    }
    if scopes.is_empty() && l.resource.is_none() {
        errs.add(
            "login",
            "set `scopes` (e.g. api://kube-relay/user_impersonation) or `resource`, so tokens are issued for this relay",
        );
    }
    let is_entra = matches!(
        issuer.as_deref().map(|i| &i.kind),
        Some(IssuerKind::Entra { .. })
    );
    let passthrough_scopes = l.passthrough_scopes.unwrap_or_else(|| {
        if is_entra {
            vec![format!("{AKS_SERVER_APP}/.default")]
        } else {
            scopes.clone()
        }
    });
    let portal = l.portal.and_then(|p| {
        if p.client_id.trim().is_empty() {
            errs.add("login.portal.client_id", "must not be empty");
        }
        let client_secret = read_secret(
            base,
            &p.client_secret_file,
            "login.portal.client_secret_file".into(),
            errs,
        );
        let cookie_key = read_cookie_key(base, &p.cookie_key_file, errs);
        let session_lifetime = match &p.session_lifetime {
            None => Duration::from_secs(3600),
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if d >= Duration::from_secs(60) && d <= Duration::from_secs(24 * 3600) => d,
                Ok(_) => {
                    errs.add(
                        "login.portal.session_lifetime",
                        "must be between 1m and 24h (sessions are meant to be short)",
                    );
                    return None;
                }
                Err(e) => {
                    errs.add(
                        "login.portal.session_lifetime",
                        format!("not a duration ({e}); use e.g. 1h or 30m"),
                    );
                    return None;
                }
            },
        };
        Some(PortalConfig {
            client_id: p.client_id,
            client_secret: client_secret?,
            cookie_key: cookie_key?,
            session_lifetime,
            sign_out_at_provider: p.sign_out_at_provider.unwrap_or(false),
        })
    });
    Some(LoginConfig {
        issuer: issuer?,
        client_id: l.client_id,
        scopes,
        resource: l.resource,
        passthrough_scopes,
        portal,
    })
}

/// The cookie key file holds at least 32 bytes of secret (any encoding: it is hashed); SHA-256
/// of its trimmed contents is the sealing key, so a hex or base64 file both work.
fn read_cookie_key(base: &Path, file: &str, errs: &mut Errors) -> Option<CookieKey> {
    let p = base.join(file);
    let key_path = "login.portal.cookie_key_file";
    match std::fs::read(&p) {
        Ok(b) => {
            let trimmed = b.trim_ascii();
            if trimmed.len() < 32 {
                errs.add(
                    key_path,
                    format!(
                        "{} holds {} bytes; use at least 32 random bytes (e.g. `openssl rand -base64 48 > {}`)",
                        p.display(),
                        trimmed.len(),
                        p.display()
                    ),
                );
                return None;
            }
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, trimmed);
            let mut k = [0u8; 32];
            k.copy_from_slice(d.as_ref());
            Some(CookieKey(k))
        }
        Err(e) => {
            errs.add(key_path, format!("cannot read {}: {e}", p.display()));
            None
        }
    }
}

/// The keys naming Entra for one credential, as written in the file.
struct EntraKeys<'a> {
    authority_host: Option<&'a String>,
    scope: Option<&'a String>,
    tenant_id: Option<&'a String>,
    ca_file: Option<&'a String>,
}

/// `authority_host`, `scope`, `tenant_id` and `ca_file`, shared by `azure` and on_behalf_of.
fn parse_entra_endpoint(
    keys: EntraKeys<'_>,
    tenant_required: bool,
    base: &Path,
    path: &str,
    errs: &mut Errors,
) -> Option<EntraEndpoint> {
    let EntraKeys {
        authority_host,
        scope,
        tenant_id,
        ca_file,
    } = keys;
    let mut ok = true;
    let host = authority_host.map_or(DEFAULT_AUTHORITY_HOST, String::as_str);
    let authority_host = match Url::parse(host) {
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
                format!("{path}.authority_host"),
                "must be an https:// URL with no path, e.g. https://login.microsoftonline.com",
            );
            None
        }
    };
    let scope = match scope {
        None => format!("{AKS_SERVER_APP}/.default"),
        Some(s)
            if !s.is_empty()
                && !s
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) =>
        {
            s.clone()
        }
        Some(_) => {
            errs.add(
                format!("{path}.scope"),
                "must be one scope, e.g. 6dae42f8-4368-4678-94ff-3960e28e3630/.default",
            );
            ok = false;
            String::new()
        }
    };
    let tenant_given = tenant_id.is_some();
    let tenant_id = guid_key(
        tenant_id,
        format!("{path}.tenant_id"),
        tenant_required,
        errs,
    );
    ok &= tenant_id.is_some() || (!tenant_given && !tenant_required);
    let ca = match ca_file {
        Some(file) => {
            let c = load_certs(base, file, &format!("{path}.ca_file"), errs);
            ok &= c.is_some();
            c
        }
        None => None,
    };
    if !ok {
        return None;
    }
    Some(EntraEndpoint {
        authority_host: authority_host?,
        scope,
        tenant_id,
        ca,
    })
}

fn parse_azure(
    a: &FileAzure,
    base: &Path,
    path: &str,
    errs: &mut Errors,
) -> Option<AzureCredentialConfig> {
    let refuse = |errs: &mut Errors, key: &str, present: bool, why: &str| {
        if present {
            errs.add(format!("{path}.{key}"), why.to_owned());
        }
        present
    };
    let client_given = a.client_id.is_some();
    let client_id = guid_key(
        a.client_id.as_ref(),
        format!("{path}.client_id"),
        false,
        errs,
    );
    let mut bad = client_given && client_id.is_none();
    let kind = match a.credential {
        FileAzureKind::ManagedIdentity => {
            // The identity endpoint is the platform's (IMDS or IDENTITY_ENDPOINT); there is no
            // authority or tenant to choose.
            let why = "not used with credential managed_identity";
            bad |= refuse(errs, "tenant_id", a.tenant_id.is_some(), why);
            bad |= refuse(
                errs,
                "client_secret_file",
                a.client_secret_file.is_some(),
                why,
            );
            bad |= refuse(
                errs,
                "federated_token_file",
                a.federated_token_file.is_some(),
                why,
            );
            bad |= refuse(errs, "authority_host", a.authority_host.is_some(), why);
            bad |= refuse(errs, "ca_file", a.ca_file.is_some(), why);
            AzureCredentialKind::ManagedIdentity
        }
        FileAzureKind::WorkloadIdentity => {
            bad |= refuse(
                errs,
                "client_secret_file",
                a.client_secret_file.is_some(),
                "not used with credential workload_identity",
            );
            if !client_given {
                errs.add(
                    format!("{path}.client_id"),
                    "is required for credential workload_identity",
                );
                bad = true;
            }
            match &a.federated_token_file {
                Some(file) => AzureCredentialKind::WorkloadIdentity {
                    federated_token_file: base.join(file),
                },
                None => {
                    errs.add(
                        format!("{path}.federated_token_file"),
                        "is required for credential workload_identity (AKS projects it at /var/run/secrets/azure/tokens/azure-identity-token)",
                    );
                    return None;
                }
            }
        }
        FileAzureKind::ClientSecret => {
            bad |= refuse(
                errs,
                "federated_token_file",
                a.federated_token_file.is_some(),
                "not used with credential client_secret",
            );
            if !client_given {
                errs.add(
                    format!("{path}.client_id"),
                    "is required for credential client_secret",
                );
                bad = true;
            }
            let Some(file) = &a.client_secret_file else {
                errs.add(
                    format!("{path}.client_secret_file"),
                    "is required for credential client_secret",
                );
                return None;
            };
            AzureCredentialKind::ClientSecret {
                secret: read_secret(base, file, format!("{path}.client_secret_file"), errs)?,
            }
        }
    };
    let tenant_required = !matches!(kind, AzureCredentialKind::ManagedIdentity);
    let endpoint = parse_entra_endpoint(
        EntraKeys {
            authority_host: a.authority_host.as_ref(),
            scope: a.scope.as_ref(),
            tenant_id: a.tenant_id.as_ref(),
            ca_file: a.ca_file.as_ref(),
        },
        tenant_required,
        base,
        path,
        errs,
    )?;
    if bad {
        return None;
    }
    Some(AzureCredentialConfig {
        kind,
        client_id,
        endpoint,
    })
}

fn parse_obo(
    f: &FileUpstreamAuth,
    base: &Path,
    path: &str,
    errs: &mut Errors,
) -> Option<UpstreamAuth> {
    let mut bad = false;
    for (key, present, why) in [
        ("token_file", f.token_file.is_some(), "belongs to mode impersonate"),
        ("azure", f.azure.is_some(), "belongs to mode impersonate (for OBO use federated:)"),
        ("client_cert_file", f.client_cert_file.is_some(), "is the impersonate key; OBO signs its client assertion with client_certificate_file + client_key_file"),
    ] {
        if present {
            errs.add(format!("{path}.{key}"), why);
            bad = true;
        }
    }
    let client_id = guid_key(
        f.client_id.as_ref(),
        format!("{path}.client_id"),
        true,
        errs,
    );
    let given = [
        f.client_secret_file.is_some(),
        f.client_certificate_file.is_some() || f.client_key_file.is_some(),
        f.federated.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given != 1 {
        errs.add(
            path,
            "mode on_behalf_of needs exactly one client credential: client_secret_file, client_certificate_file + client_key_file, or federated",
        );
        return None;
    }
    let client_auth = if let Some(file) = &f.client_secret_file {
        OboClientAuth::Secret(read_secret(
            base,
            file,
            format!("{path}.client_secret_file"),
            errs,
        )?)
    } else if let Some(fed) = &f.federated {
        let fpath = format!("{path}.federated");
        match fed.credential {
            FileAzureKind::ManagedIdentity => {
                if fed.federated_token_file.is_some() {
                    errs.add(
                        format!("{fpath}.federated_token_file"),
                        "not used with credential managed_identity",
                    );
                    return None;
                }
                let given = fed.client_id.is_some();
                let id = guid_key(
                    fed.client_id.as_ref(),
                    format!("{fpath}.client_id"),
                    false,
                    errs,
                );
                if given && id.is_none() {
                    return None;
                }
                OboClientAuth::FederatedManagedIdentity { client_id: id }
            }
            FileAzureKind::WorkloadIdentity => {
                // The projected token is the assertion for the relay's own app registration
                // (client_id above), so a second client id would be ignored: refuse it.
                if fed.client_id.is_some() {
                    errs.add(format!("{fpath}.client_id"), "not used with credential workload_identity (the assertion is for client_id of the relay app)");
                    return None;
                }
                let Some(file) = &fed.federated_token_file else {
                    errs.add(
                        format!("{fpath}.federated_token_file"),
                        "is required for credential workload_identity",
                    );
                    return None;
                };
                OboClientAuth::FederatedTokenFile {
                    path: base.join(file),
                }
            }
            FileAzureKind::ClientSecret => {
                errs.add(format!("{fpath}.credential"), "must be managed_identity or workload_identity (a secret goes in client_secret_file)");
                return None;
            }
        }
    } else {
        match (&f.client_certificate_file, &f.client_key_file) {
            (Some(cert), Some(key)) => {
                let chain =
                    load_certs(base, cert, &format!("{path}.client_certificate_file"), errs);
                let key = load_key(base, key, &format!("{path}.client_key_file"), errs);
                OboClientAuth::Certificate {
                    chain: chain?,
                    key: key?,
                }
            }
            _ => {
                errs.add(
                    path,
                    "client_certificate_file and client_key_file must be given together",
                );
                return None;
            }
        }
    };
    let endpoint = parse_entra_endpoint(
        EntraKeys {
            authority_host: f.authority_host.as_ref(),
            scope: f.scope.as_ref(),
            tenant_id: f.tenant_id.as_ref(),
            ca_file: f.ca_file.as_ref(),
        },
        false,
        base,
        path,
        errs,
    )?;
    if bad {
        return None;
    }
    Some(UpstreamAuth::OnBehalfOf(OboConfig {
        client_id: client_id?,
        client_auth,
        endpoint,
    }))
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
        if r.groups.is_empty() && r.users.is_empty() && r.apps.is_empty() && r.issuer.is_none() {
            // A rule with no subject would admit every authenticated caller: make that explicit.
            errs.add(
                &path,
                "a rule must name groups, users, apps or an issuer (an empty rule would admit everyone)",
            );
        }
        if let Some(ns) = &r.namespaces {
            if ns.is_empty() {
                errs.add(format!("{path}.namespaces"), "an empty namespace list would admit nothing; remove the rule or name namespaces");
            }
            for (j, n) in ns.iter().enumerate() {
                if !is_cluster_name(n) {
                    errs.add(
                        format!("{path}.namespaces[{j}]"),
                        format!("`{n}` is not a valid namespace name"),
                    );
                }
            }
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
            apps: r.apps.clone(),
            namespaces: r.namespaces.as_ref().map(|n| n.iter().cloned().collect()),
            allow_impersonation: r.allow_impersonation,
            issuer: r.issuer.clone(),
            claims: r.claims.clone(),
            verbs,
        });
    }
    out
}

/// A GUID in its canonical 8-4-4-4-12 hex form (Entra tenant, object and application ids).
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
