//! `identity.issuers`: Entra tenants and generic OIDC issuers, and how their keys are trusted.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileIssuer {
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
    require_nbf: Option<bool>,
    group_overage: Option<FileGroupOverage>,
}

/// `identity.issuers[].group_overage`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileGroupOverage {
    resolve: FileOverageResolve,
    credential: Option<FileOverageCredential>,
    graph_host: Option<String>,
    cache_ttl: Option<String>,
    timeout: Option<String>,
    ca_file: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum FileOverageResolve {
    Graph,
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOverageCredential {
    azure: FileAzure,
}

/// Microsoft Graph's public endpoint.
pub const DEFAULT_GRAPH_HOST: &str = "https://graph.microsoft.com";

/// `group_overage: {resolve: graph}`: how the relay asks Microsoft Graph about the groups a
/// token could not list (docs/architecture.md "Identity and upstream credentials").
#[derive(Debug)]
pub struct GroupOverageConfig {
    /// The relay's own Azure identity for Graph; its scope is `<graph_host>/.default`.
    pub credential: AzureCredentialConfig,
    /// `https://graph.microsoft.com`, a sovereign cloud's Graph, or a test stand-in.
    pub graph_host: Url,
    /// Extra trust anchors for `graph_host` (a stand-in on a private CA); empty: public PKI.
    pub ca: Vec<CertificateDer<'static>>,
    /// How long a user's resolved membership is used before it is asked again.
    pub cache_ttl: Duration,
    /// A request waits at most this long for Graph; then group rules do not match.
    pub timeout: Duration,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub(super) enum FileIssuerKind {
    Entra,
    Oidc,
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
    /// Entra only: resolve group overage through Graph; `None`: group rules do not match a
    /// token whose groups did not fit (`resolve: deny`, the default).
    pub group_overage: Option<GroupOverageConfig>,
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
        /// Tokens without `nbf` are refused (default: `nbf` is checked when present, as
        /// kube-apiserver's JWT authenticator does; RFC 9068 access tokens carry none).
        require_nbf: bool,
    },
    Entra {
        tenant_id: String,
        authority_host: Url,
        required_scopes: Vec<String>,
        required_roles: Vec<String>,
    },
}

pub(super) fn parse_issuers(
    root: &Mapping,
    base: &Path,
    errs: &mut Errors,
) -> Vec<Arc<IssuerConfig>> {
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
                    ("group_overage", f.group_overage.is_some()),
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
                    require_nbf: f.require_nbf.unwrap_or(false),
                }
            }
            FileIssuerKind::Entra => {
                for (key, present) in [
                    ("issuer", f.issuer.is_some()),
                    ("username_claim", f.username_claim.is_some()),
                    ("groups_claim", f.groups_claim.is_some()),
                    ("require_nbf", f.require_nbf.is_some()),
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
        let group_overage = f
            .group_overage
            .as_ref()
            .and_then(|g| parse_group_overage(g, base, &format!("{path}.group_overage"), errs));
        out.push(Arc::new(IssuerConfig {
            name: f.name,
            kind,
            audiences: f.audiences,
            ca,
            algorithms,
            keys,
            group_overage,
        }));
    }
    out
}

fn parse_group_overage(
    g: &FileGroupOverage,
    base: &Path,
    path: &str,
    errs: &mut Errors,
) -> Option<GroupOverageConfig> {
    if g.resolve == FileOverageResolve::Deny {
        for (key, present) in [
            ("credential", g.credential.is_some()),
            ("graph_host", g.graph_host.is_some()),
            ("cache_ttl", g.cache_ttl.is_some()),
            ("timeout", g.timeout.is_some()),
            ("ca_file", g.ca_file.is_some()),
        ] {
            if present {
                errs.add(format!("{path}.{key}"), "only used with resolve: graph");
            }
        }
        return None;
    }
    let graph_host = parse_https_origin(
        g.graph_host.as_deref().unwrap_or(DEFAULT_GRAPH_HOST),
        &format!("{path}.graph_host"),
        DEFAULT_GRAPH_HOST,
        errs,
    );
    let cache_ttl = parse_duration(
        &g.cache_ttl,
        &format!("{path}.cache_ttl"),
        Duration::from_secs(600),
        errs,
    );
    if cache_ttl < Duration::from_secs(1) || cache_ttl > Duration::from_secs(24 * 3600) {
        errs.add(
            format!("{path}.cache_ttl"),
            "must be between 1s and 24h (membership changes reach the relay after at most this long)",
        );
    }
    let timeout = parse_duration(
        &g.timeout,
        &format!("{path}.timeout"),
        Duration::from_secs(5),
        errs,
    );
    if timeout.is_zero() || timeout > Duration::from_secs(60) {
        errs.add(format!("{path}.timeout"), "must be between 1ms and 60s");
    }
    let ca = match &g.ca_file {
        Some(file) => load_certs(base, file, &format!("{path}.ca_file"), errs)?,
        None => Vec::new(),
    };
    let Some(cred) = &g.credential else {
        errs.add(
            format!("{path}.credential"),
            "resolve: graph needs the relay's credential for Graph, e.g. {azure: {credential: managed_identity}}",
        );
        return None;
    };
    let cred_path = format!("{path}.credential.azure");
    let scope_given = cred.azure.scope_given();
    let mut credential = parse_azure(&cred.azure, base, &cred_path, errs)?;
    let graph_host = graph_host?;
    if !scope_given {
        // The token is for Graph, not for a cluster: `<graph_host>/.default`.
        credential.endpoint.scope =
            format!("{}/.default", graph_host.as_str().trim_end_matches('/'));
    }
    Some(GroupOverageConfig {
        credential,
        graph_host,
        ca,
        cache_ttl,
        timeout,
    })
}
