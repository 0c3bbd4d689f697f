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
