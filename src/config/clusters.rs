//! `clusters`: each cluster's name, address, CA and upstream credential (passthrough, the
//! relay's own credential for impersonation, or Entra on-behalf-of).

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCluster {
    name: String,
    server: String,
    connect: Option<String>,
    ca_file: String,
    upstream_auth: FileUpstreamAuth,
    #[serde(default)]
    access: Vec<FileAccessRule>,
    /// Session recording of exec and attach: off (default), optional or required.
    #[serde(default)]
    recording: RecordingMode,
    /// How requests reach the API server: mixed (default), http2 or http1.
    #[serde(default)]
    upstream_protocol: UpstreamProtocol,
}

/// A cluster's `upstream_protocol`: which HTTP version its requests travel over.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// Short requests over a pool of HTTP/1.1 keep-alive connections (at most
    /// `upstream::HTTP1_CONNECTIONS` at once; more at the same moment share HTTP/2), watches and
    /// `logs -f` over HTTP/2. HTTP/1.1 costs less per request and keeps one slow answer from
    /// holding up the others on a shared connection; HTTP/2 keeps thousands of watches on a
    /// few connections.
    #[default]
    Mixed,
    /// Everything over HTTP/2 when the API server offers it: the fewest connections.
    Http2,
    /// Everything over HTTP/1.1, for a path to the API server without working HTTP/2. Every
    /// open watch then holds a connection of its own.
    Http1,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstreamAuth {
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
    /// Impersonate mode: only these of the caller's groups go upstream.
    forward_groups: Option<Vec<String>>,
}

/// `upstream_auth.azure`: the relay's own Azure identity, used with mode impersonate.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAzure {
    credential: FileAzureKind,
    client_id: Option<String>,
    tenant_id: Option<String>,
    client_secret_file: Option<String>,
    federated_token_file: Option<String>,
    authority_host: Option<String>,
    scope: Option<String>,
    ca_file: Option<String>,
}

impl FileAzure {
    /// `scope` was written: a credential used for another resource (Graph) keeps it.
    pub(super) fn scope_given(&self) -> bool {
        self.scope.is_some()
    }
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub(super) enum FileAzureKind {
    ManagedIdentity,
    WorkloadIdentity,
    ClientSecret,
}

/// `upstream_auth.federated`: OBO client authentication by a federated assertion.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileFederated {
    credential: FileAzureKind,
    client_id: Option<String>,
    federated_token_file: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub(super) enum FileAuthMode {
    Passthrough,
    Impersonate,
    OnBehalfOf,
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
    /// Whether exec and attach sessions are recorded (top-level `recording` says where).
    pub recording: RecordingMode,
    pub upstream_protocol: UpstreamProtocol,
    /// Impersonate mode: the only groups of the caller's that go upstream (`None`: all).
    pub forward_groups: Option<ForwardGroups>,
}

/// `upstream_auth.forward_groups`: the caller's groups the relay names in `Impersonate-Group`.
///
/// Why: kube-apiserver authorizes the impersonation of every group named, on every request.
/// An Entra user in 40 groups doubles the API server's CPU per request, and users in hundreds
/// of groups are common (docs/perf). Only groups the cluster's RBAC binds change a decision:
/// RBAC only grants, so leaving a group out can take access away, never add it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardGroups(std::collections::BTreeSet<Box<[u8]>>);

impl ForwardGroups {
    /// Whether a group (an `Impersonate-Group` value) goes upstream.
    pub fn admits(&self, group: &[u8]) -> bool {
        self.0.contains(group)
    }

    /// A list as given, unchecked (tests).
    #[cfg(test)]
    pub(crate) fn of(names: &[&str]) -> Self {
        ForwardGroups(names.iter().map(|n| n.as_bytes().into()).collect())
    }
}

impl ClusterConfig {
    /// Some access rule names groups: only then can group overage change a decision.
    pub fn has_group_rules(&self) -> bool {
        self.access.iter().any(|r| !r.groups.is_empty())
    }
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

pub(super) fn parse_clusters(
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
        let forward_groups = parse_forward_groups(&f.upstream_auth, &path, errs);
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
                recording: f.recording,
                upstream_protocol: f.upstream_protocol,
                forward_groups,
            }));
        }
    }
    if items.is_empty() {
        errs.add("clusters", "must list at least one cluster");
    }
    out
}

pub(super) fn valid_host_port(s: &str) -> bool {
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

pub(super) fn parse_upstream_auth(
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

/// `upstream_auth.forward_groups`: impersonate mode only (in the other modes the cluster reads
/// the groups from the caller's token itself). Group object ids are compared in lower case, as
/// Entra writes them in tokens; other names exactly, as RBAC compares them.
fn parse_forward_groups(
    f: &FileUpstreamAuth,
    cluster_path: &str,
    errs: &mut Errors,
) -> Option<ForwardGroups> {
    let list = f.forward_groups.as_ref()?;
    let path = format!("{cluster_path}.upstream_auth.forward_groups");
    if !matches!(f.mode, FileAuthMode::Impersonate) {
        errs.add(
            path,
            "only mode impersonate names groups upstream (in passthrough and on_behalf_of the cluster reads them from the token)",
        );
        return None;
    }
    let mut set = std::collections::BTreeSet::new();
    for (i, g) in list.iter().enumerate() {
        if g.is_empty() || g.bytes().any(|b| b.is_ascii_control()) {
            errs.add(
                format!("{path}[{i}]"),
                "must be a group name or object id without control characters",
            );
            continue;
        }
        let g = if is_guid(g) {
            g.to_ascii_lowercase()
        } else {
            g.clone()
        };
        set.insert(g.into_bytes().into_boxed_slice());
    }
    Some(ForwardGroups(set))
}

pub(super) fn guid_key(
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
pub(super) fn read_secret(
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

/// The keys naming Entra for one credential, as written in the file.
pub(super) struct EntraKeys<'a> {
    authority_host: Option<&'a String>,
    scope: Option<&'a String>,
    tenant_id: Option<&'a String>,
    ca_file: Option<&'a String>,
}

/// `authority_host`, `scope`, `tenant_id` and `ca_file`, shared by `azure` and on_behalf_of.
pub(super) fn parse_entra_endpoint(
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
    let authority_host = parse_https_origin(
        authority_host.map_or(DEFAULT_AUTHORITY_HOST, String::as_str),
        &format!("{path}.authority_host"),
        DEFAULT_AUTHORITY_HOST,
        errs,
    );
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

pub(super) fn parse_azure(
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

pub(super) fn parse_obo(
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
