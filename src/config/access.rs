//! `clusters[].access`: the rules that admit callers to a cluster (default deny).

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAccessRule {
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    apps: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    auth_context: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    #[serde(default)]
    allow_impersonation: bool,
    issuer: Option<String>,
    #[serde(default)]
    claims: BTreeMap<String, String>,
    verbs: Option<Vec<String>>,
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
    /// The token's `roles` claim (app roles of a user or an app) holds one of these (when
    /// non-empty): Entra's way around group overage.
    pub roles: Vec<String>,
    /// Step-up: the token's `acrs` claim holds one of these Conditional Access authentication
    /// contexts (when non-empty). A request this rule would admit but for `acrs` is answered
    /// with a claims challenge naming the context.
    pub auth_context: Vec<String>,
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

pub(super) fn parse_access(
    rules: &[FileAccessRule],
    issuer_names: &BTreeSet<String>,
    cluster_path: &str,
    errs: &mut Errors,
) -> Vec<AccessRule> {
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let path = format!("{cluster_path}.access[{i}]");
        if r.groups.is_empty()
            && r.users.is_empty()
            && r.apps.is_empty()
            && r.roles.is_empty()
            && r.issuer.is_none()
        {
            // A rule with no subject would admit every authenticated caller: make that explicit.
            errs.add(
                &path,
                "a rule must name groups, users, apps, roles or an issuer (an empty rule would admit everyone)",
            );
        }
        for (j, role) in r.roles.iter().enumerate() {
            if role.is_empty() || role.chars().any(char::is_whitespace) {
                errs.add(
                    format!("{path}.roles[{j}]"),
                    "must be an app role value (non-empty, no spaces), e.g. kube-relay.prod-admin",
                );
            }
        }
        if let Some(contexts) = &r.auth_context {
            if contexts.is_empty() {
                errs.add(
                    format!("{path}.auth_context"),
                    "an empty list would admit nothing; remove the key or name contexts (c1 ... c99)",
                );
            }
            for (j, c) in contexts.iter().enumerate() {
                if !is_auth_context_id(c) {
                    errs.add(
                        format!("{path}.auth_context[{j}]"),
                        format!(
                            "`{c}` is not an authentication context id (Entra's are c1 ... c99)"
                        ),
                    );
                }
            }
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
            roles: r.roles.clone(),
            auth_context: r.auth_context.clone().unwrap_or_default(),
            namespaces: r.namespaces.as_ref().map(|n| n.iter().cloned().collect()),
            allow_impersonation: r.allow_impersonation,
            issuer: r.issuer.clone(),
            claims: r.claims.clone(),
            verbs,
        });
    }
    out
}

/// Entra's authentication context ids are `c1` to `c99`; other issuers may use their own short
/// tokens, so anything short, printable and free of spaces and quotes is accepted.
fn is_auth_context_id(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 64
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}
