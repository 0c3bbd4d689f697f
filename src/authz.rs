//! Authorization: which callers may use which cluster, and with which verbs (default deny).
//!
//! The verb is derived the way kube-apiserver derives it, with one deliberate difference taken
//! from KEP-4006: exec, attach and portforward are `create` whatever the HTTP method, because
//! kubectl ≥ 1.30 opens them with a WebSocket GET (docs/security.md A4).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::auth::Principal;
use crate::config::{AccessRule, ClusterConfig};

/// What a request does, parsed from its method, path and query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo {
    /// Lower-case Kubernetes verb (`get`, `list`, `watch`, `create`, …) or, for non-resource
    /// URLs, the lower-case HTTP method.
    pub verb: String,
    pub is_resource: bool,
    pub api_group: String,
    pub namespace: Option<String>,
    pub resource: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

impl RequestInfo {
    /// Parses `/api/v1/...` and `/apis/<group>/<version>/...` like kube-apiserver's
    /// RequestInfoFactory; anything else is a non-resource URL.
    pub fn parse(method: &http::Method, path_and_query: &str) -> Self {
        let (path, query) = path_and_query
            .split_once('?')
            .map_or((path_and_query, ""), |(p, q)| (p, q));
        let method_verb = method.as_str().to_ascii_lowercase();
        let segs: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let (group, rest) = match segs.as_slice() {
            ["api", _version, rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => {
                return Self {
                    verb: method_verb,
                    ..Self::default()
                }
            }
        };
        if rest.is_empty() {
            // Discovery of a group version is a non-resource read.
            return Self {
                verb: method_verb,
                ..Self::default()
            };
        }
        let mut parts = rest;
        let mut legacy_watch = false;
        if parts.first() == Some(&"watch") {
            legacy_watch = true;
            parts = &parts[1..];
        }
        let mut namespace = None;
        if parts.first() == Some(&"namespaces") && parts.len() > 1 {
            namespace = Some(parts[1].to_owned());
            // `namespaces/<ns>/status|finalize` are subresources of the namespace itself.
            if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
                parts = &parts[2..];
            }
        }
        let resource = parts.first().map(|s| (*s).to_owned());
        let name = parts.get(1).map(|s| (*s).to_owned());
        let subresource = parts.get(2).map(|s| (*s).to_owned());
        // `/api/v1/namespaces/x` names the namespace object itself, not a scope.
        if resource.as_deref() == Some("namespaces") && name.is_some() && parts.len() <= 3 {
            namespace = None;
        }
        let watch_param = query_flag(query, "watch");
        let streaming_sub = matches!(
            subresource.as_deref(),
            Some("exec" | "attach" | "portforward")
        );
        let verb = if streaming_sub {
            "create".to_owned()
        } else {
            match method.as_str() {
                // As kube-apiserver: `watch` is read only for collections; a named GET is a get.
                "GET" | "HEAD" => {
                    if legacy_watch {
                        "watch".to_owned()
                    } else if name.is_some() {
                        "get".to_owned()
                    } else if watch_param {
                        "watch".to_owned()
                    } else {
                        "list".to_owned()
                    }
                }
                "POST" => "create".to_owned(),
                "PUT" => "update".to_owned(),
                "PATCH" => "patch".to_owned(),
                "DELETE" => {
                    if name.is_some() {
                        "delete".to_owned()
                    } else {
                        "deletecollection".to_owned()
                    }
                }
                _ => method_verb,
            }
        };
        Self {
            verb,
            is_resource: true,
            api_group: group.to_owned(),
            namespace,
            resource,
            name,
            subresource,
        }
    }

    /// Reviews about the caller itself (`kubectl auth whoami`, `auth can-i`) are open to anyone
    /// admitted to the cluster, like Kubernetes' `system:basic-user`.
    fn is_self_review(&self) -> bool {
        self.verb == "create"
            && matches!(
                (self.api_group.as_str(), self.resource.as_deref()),
                ("authentication.k8s.io", Some("selfsubjectreviews"))
                    | (
                        "authorization.k8s.io",
                        Some("selfsubjectaccessreviews" | "selfsubjectrulesreviews")
                    )
            )
    }

    /// True for requests that stream for a long time: watches and followed logs.
    pub fn is_long_running_read(&self, query: &str) -> bool {
        self.verb == "watch"
            || (self.subresource.as_deref() == Some("log") && query_flag(query, "follow"))
    }
}

/// A boolean query parameter read as kube-apiserver reads it: the first value of `key` (see
/// [`query_values`]); absent, `0` or `false` (any case, Unicode folding included) is false,
/// anything else is true, an empty value included. So the relay never takes for a plain read
/// what the API server runs as a watch or a followed log, nor the other way round.
pub fn query_flag(query: &str, key: &str) -> bool {
    query_values(query, key)
        .next()
        .is_some_and(|v| !(v == "0" || folds_to_false(&v)))
}

/// `v` equals `false` under Unicode simple case folding, as Go's `strings.EqualFold` has it
/// (the long s, U+017F, folds to `s`).
fn folds_to_false(v: &str) -> bool {
    v.chars().count() == 5
        && v.chars()
            .zip("false".chars())
            .all(|(c, want)| c.to_ascii_lowercase() == want || (want == 's' && c == '\u{17f}'))
}

/// The values of `key` in a query, in order, parsed as Go's `url.ParseQuery` parses it (which
/// is what kube-apiserver reads): pairs split on `&`, a pair holding `;` or an invalid `%`
/// escape dropped, `+` a space. The relay forwards the query unchanged, so it must read the
/// same values the API server will.
pub fn query_values<'a>(
    query: &'a str,
    key: &'a str,
) -> impl Iterator<Item = std::borrow::Cow<'a, str>> + 'a {
    query.split('&').filter_map(move |pair| {
        if pair.is_empty() || pair.contains(';') {
            return None;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (go_unescape(k)? == key).then(|| go_unescape(v)).flatten()
    })
}

/// Go's query unescaping: `+` is a space, `%XX` a byte; any other `%` makes the pair invalid.
/// Borrowed when there is nothing to unescape, so reading a request's query allocates nothing.
fn go_unescape(s: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !s.contains(['%', '+']) {
        return Some(std::borrow::Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let hi = hex(*b.get(i + 1)?)?;
                let lo = hex(*b.get(i + 2)?)?;
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    // Go keeps invalid UTF-8 as bytes; such a value never equals a flag word or a key here.
    Some(std::borrow::Cow::Owned(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

/// Why the rules refused a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// 403: no rule admits the caller for this request; the message of the Status.
    Forbidden(String),
    /// 401 with a claims challenge: a rule would admit the request if the token carried the
    /// Conditional Access authentication context `auth_context` in `acrs` (step-up).
    StepUp {
        auth_context: String,
        message: String,
    },
}

/// What the relay knows of the caller's groups beyond the token's own `groups` claim.
#[derive(Debug, Clone, Default)]
pub enum Membership {
    /// The token lists every group (no overage): rules read `groups` from it.
    #[default]
    Token,
    /// The token's groups did not fit and Graph answered: the caller is in exactly these of
    /// the groups the rules name.
    Resolved(Arc<[String]>),
    /// The token's groups did not fit and were not resolved (`resolve: deny`, or Graph failed):
    /// group rules do not match; the text says why.
    Unresolved(Arc<str>),
}

/// Proof that the relay's rules admitted one request. Only [`authorize`] makes one (the field
/// is private), and the proxy's forward and upgrade phases take one by value, so a request the
/// rules did not admit cannot be sent to a cluster (docs/architecture.md "Invariants").
#[derive(Debug)]
#[must_use = "a request is admitted only where the proof is handed to forward or upgrade"]
pub struct Admitted {
    _proof: (),
}

/// Default deny: admitted only when some rule matches the caller, the verb and the namespace.
///
/// `impersonating`: the caller asks to act as someone else (`kubectl --as`); only rules with
/// `allow_impersonation` admit that. `membership`: see [`Membership`]; only consulted when the
/// token says its group list is incomplete.
pub fn authorize(
    p: &Principal,
    cluster: &ClusterConfig,
    info: &RequestInfo,
    impersonating: bool,
    membership: &Membership,
) -> Result<Admitted, Denied> {
    let mut subject_matched = false;
    let mut overage_blocked = false;
    let mut step_up: Option<&str> = None;
    for rule in &cluster.access {
        match subject_matches(rule, p, membership) {
            Match::Yes => {}
            Match::No => continue,
            Match::GroupsUnknown => {
                overage_blocked = true;
                continue;
            }
        }
        subject_matched = true;
        let verb_ok = match &rule.verbs {
            None => true,
            Some(verbs) => verbs.contains(&info.verb) || info.is_self_review(),
        };
        let namespace_ok = match &rule.namespaces {
            None => true,
            // Discovery and self-reviews are not namespaced and stay open; other cluster-scoped
            // requests are out of a namespace-limited rule's reach.
            Some(allowed) => match &info.namespace {
                Some(ns) => allowed.contains(ns),
                None => !info.is_resource || info.is_self_review(),
            },
        };
        if !(verb_ok && namespace_ok && (!impersonating || rule.allow_impersonation)) {
            continue;
        }
        if !rule.auth_context.is_empty() && !has_auth_context(p, &rule.auth_context) {
            step_up = step_up.or(rule.auth_context.first().map(String::as_str));
            continue;
        }
        return Ok(Admitted { _proof: () });
    }
    let what = match (&info.resource, &info.subresource) {
        (Some(r), Some(s)) => format!("{r}/{s}"),
        (Some(r), None) => r.clone(),
        _ => "this path".to_owned(),
    };
    if let Some(ctx) = step_up {
        return Err(Denied::StepUp {
            auth_context: ctx.to_owned(),
            message: format!(
                "cluster {cluster} requires a step-up sign-in (authentication context {ctx}) to {verb} {what}: use the kubeconfig context {cluster}@{ctx} (kube-relay kubeconfig writes it), or get a token with: kube-relay token --auth-context {ctx}",
                cluster = cluster.name,
                verb = info.verb,
            ),
        });
    }
    if impersonating && subject_matched {
        return Err(Denied::Forbidden(format!(
            "user \"{}\" may not impersonate (kubectl --as) on cluster {} through kube-relay",
            p.username, cluster.name
        )));
    }
    if overage_blocked && !subject_matched {
        let why = match membership {
            Membership::Unresolved(why) => &**why,
            _ => "the token does not list them",
        };
        return Err(Denied::Forbidden(format!(
            "user \"{}\" has too many groups for the token to list them (Entra group overage) and their membership could not be resolved ({why}); group rules on cluster {} do not admit",
            p.username, cluster.name
        )));
    }
    if subject_matched {
        Err(Denied::Forbidden(format!(
            "user \"{}\" may not {} {} on cluster {} through kube-relay",
            p.username, info.verb, what, cluster.name
        )))
    } else {
        Err(Denied::Forbidden(format!(
            "user \"{}\" has no access to cluster {} through kube-relay",
            p.username, cluster.name
        )))
    }
}

/// The token's `acrs` claim (Conditional Access authentication contexts satisfied at sign-in)
/// holds one of `wanted`.
fn has_auth_context(p: &Principal, wanted: &[String]) -> bool {
    match p.claims.get("acrs") {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(serde_json::Value::as_str)
            .any(|a| wanted.iter().any(|w| w == a)),
        Some(serde_json::Value::String(a)) => wanted.iter().any(|w| w == a),
        _ => false,
    }
}

/// The token's `roles` claim holds one of `wanted`.
fn has_role(p: &Principal, wanted: &[String]) -> bool {
    match p.claims.get("roles") {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(serde_json::Value::as_str)
            .any(|r| wanted.iter().any(|w| w == r)),
        _ => false,
    }
}

/// What a caller may do on a cluster, as far as the relay's rules say (the cluster's own RBAC
/// may narrow it further). `None` fields mean "any". For listings (`/-/clusters`, the portal);
/// requests are decided by [`authorize`] alone.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Permissions {
    /// Verbs admitted by some rule; `None`: every verb.
    pub verbs: Option<Vec<String>>,
    /// Namespaces admitted; `None`: all (and cluster-scoped resources).
    pub namespaces: Option<Vec<String>>,
    /// Authentication contexts (step-up) that some of these rules require; empty when none.
    pub auth_contexts: Vec<String>,
}

/// The union of what the rules matching `p` admit on `cluster`; `None` when no rule matches
/// (the cluster is not listed for this caller). Group rules under an overage do not match, as
/// in [`authorize`].
pub fn permissions(
    p: &Principal,
    cluster: &ClusterConfig,
    membership: &Membership,
) -> Option<Permissions> {
    let mut verbs: Option<BTreeSet<String>> = Some(BTreeSet::new());
    let mut namespaces: Option<BTreeSet<String>> = Some(BTreeSet::new());
    let mut contexts = BTreeSet::new();
    let mut any = false;
    for rule in &cluster.access {
        if !matches!(subject_matches(rule, p, membership), Match::Yes) {
            continue;
        }
        any = true;
        widen(&mut verbs, rule.verbs.as_ref());
        widen(&mut namespaces, rule.namespaces.as_ref());
        contexts.extend(rule.auth_context.iter().cloned());
    }
    any.then(|| Permissions {
        verbs: verbs.map(|v| v.into_iter().collect()),
        namespaces: namespaces.map(|n| n.into_iter().collect()),
        auth_contexts: contexts.into_iter().collect(),
    })
}

/// Adds a rule's limit to what is admitted so far; `None` (no limit) on either side is "any".
fn widen(acc: &mut Option<BTreeSet<String>>, rule: Option<&BTreeSet<String>>) {
    match (acc.as_mut(), rule) {
        (Some(a), Some(r)) => a.extend(r.iter().cloned()),
        (_, None) => *acc = None,
        (None, Some(_)) => {}
    }
}

enum Match {
    Yes,
    No,
    /// The rule names groups and the token's group list is incomplete: fail closed.
    GroupsUnknown,
}

fn subject_matches(rule: &AccessRule, p: &Principal, membership: &Membership) -> Match {
    if let Some(iss) = &rule.issuer {
        if **iss != *p.issuer {
            return Match::No;
        }
    }
    if !rule.users.is_empty() && !rule.users.iter().any(|u| u == p.user_key()) {
        return Match::No;
    }
    if !rule.apps.is_empty() && !p.app_id.as_ref().is_some_and(|a| rule.apps.contains(a)) {
        return Match::No;
    }
    let claims_ok = rule.claims.iter().all(|(k, pattern)| {
        p.claims
            .get(k)
            .and_then(serde_json::Value::as_str)
            .is_some_and(|c| glob_match(pattern, c))
    });
    if !claims_ok {
        return Match::No;
    }
    if !rule.roles.is_empty() && !has_role(p, &rule.roles) {
        return Match::No;
    }
    if !rule.groups.is_empty() && !p.groups.iter().any(|g| rule.groups.contains(g)) {
        if !p.groups_overage {
            return Match::No;
        }
        // Membership might be in the groups the token could not list.
        return match membership {
            // Graph's object ids are GUIDs: compared without regard to case.
            Membership::Resolved(groups)
                if groups
                    .iter()
                    .any(|g| rule.groups.iter().any(|r| r.eq_ignore_ascii_case(g))) =>
            {
                Match::Yes
            }
            Membership::Resolved(_) => Match::No,
            Membership::Token | Membership::Unresolved(_) => Match::GroupsUnknown,
        };
    }
    Match::Yes
}

/// `*` matches any run of characters (including `/`); everything else is literal. Used for
/// claim patterns like `ref: refs/heads/release-*`.
pub fn glob_match(pattern: &str, value: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == value;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !value.starts_with(first) || value.len() < first.len() + last.len() || !value.ends_with(last)
    {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn info(m: Method, p: &str) -> RequestInfo {
        RequestInfo::parse(&m, p)
    }

    #[test]
    fn watch_and_follow_are_read_as_the_apiserver_reads_them() {
        for q in [
            "watch=true",
            "watch=1",
            "watch=yes",
            "watch=",
            "watch",
            "watch=%74rue",
            "watch=TRUE&watch=false",
            "watch=1;&watch=1",
            "watch=%&watch=1",
        ] {
            let i = info(Method::GET, &format!("/api/v1/pods?{q}"));
            assert_eq!(i.verb, "watch", "{q}");
            assert!(i.is_long_running_read(q), "{q}");
        }
        for q in [
            "watch=false",
            "watch=0",
            "watch=FALSE",
            "watch=false&watch=true",
            "watcher=true",
            "",
            "watch=1;",
            "watch=%",
            "watch=fal%C5%BFe",
            "watch=%zz",
        ] {
            assert_eq!(
                info(Method::GET, &format!("/api/v1/pods?{q}")).verb,
                "list",
                "{q}"
            );
        }
        // A named GET is a get whatever `watch` says; the legacy /watch/ path is a watch.
        assert_eq!(
            info(Method::GET, "/api/v1/namespaces/d/pods/p?watch=1").verb,
            "get"
        );
        assert_eq!(
            info(Method::GET, "/api/v1/watch/namespaces/d/pods/p").verb,
            "watch"
        );
        let log = info(Method::GET, "/api/v1/namespaces/d/pods/p/log?follow=yes");
        assert!(log.is_long_running_read("follow=yes"));
        assert!(!log.is_long_running_read("follow=false&follow=true"));
    }

    #[test]
    fn verbs_like_the_apiserver() {
        assert_eq!(
            info(Method::GET, "/api/v1/namespaces/default/pods?limit=500").verb,
            "list"
        );
        assert_eq!(
            info(Method::GET, "/api/v1/namespaces/default/pods?watch=true").verb,
            "watch"
        );
        assert_eq!(
            info(Method::GET, "/api/v1/watch/namespaces/default/pods").verb,
            "watch"
        );
        assert_eq!(
            info(Method::GET, "/api/v1/namespaces/default/pods/web-0").verb,
            "get"
        );
        assert_eq!(
            info(Method::POST, "/api/v1/namespaces/default/configmaps").verb,
            "create"
        );
        assert_eq!(
            info(Method::PATCH, "/api/v1/namespaces/default/configmaps/x").verb,
            "patch"
        );
        assert_eq!(
            info(Method::DELETE, "/api/v1/namespaces/default/configmaps").verb,
            "deletecollection"
        );
        assert_eq!(
            info(Method::DELETE, "/api/v1/namespaces/default/configmaps/x").verb,
            "delete"
        );
        assert_eq!(info(Method::GET, "/version").verb, "get");
        assert!(!info(Method::GET, "/apis").is_resource);
        assert!(!info(Method::GET, "/apis/apps/v1").is_resource);
        let ns = info(Method::GET, "/api/v1/namespaces/kube-system");
        assert_eq!(
            (ns.resource.as_deref(), ns.name.as_deref(), ns.namespace),
            (Some("namespaces"), Some("kube-system"), None)
        );
        let log = info(
            Method::GET,
            "/api/v1/namespaces/default/pods/web-0/log?follow=true",
        );
        assert_eq!(log.subresource.as_deref(), Some("log"));
        assert!(log.is_long_running_read("follow=true"));
    }

    #[test]
    fn globs() {
        assert!(glob_match("refs/heads/main", "refs/heads/main"));
        assert!(!glob_match("refs/heads/main", "refs/heads/main2"));
        assert!(glob_match("refs/heads/release-*", "refs/heads/release-1.2"));
        assert!(!glob_match("refs/heads/release-*", "refs/tags/release-1"));
        assert!(glob_match(
            "repo:contoso/*:environment:prod",
            "repo:contoso/infra:environment:prod"
        ));
        assert!(!glob_match(
            "repo:contoso/*:environment:prod",
            "repo:contoso/infra:environment:dev"
        ));
        assert!(glob_match("*", "anything"));
        assert!(!glob_match("a*b*c", "ac"));
        assert!(glob_match("a*b*c", "a-b-c"));
    }

    #[test]
    fn exec_attach_portforward_are_create_over_any_method() {
        for sub in ["exec", "attach", "portforward"] {
            for m in [Method::GET, Method::POST] {
                let i = info(
                    m,
                    &format!("/api/v1/namespaces/default/pods/web-0/{sub}?command=ls"),
                );
                assert_eq!(i.verb, "create", "{sub}");
                assert_eq!(i.subresource.as_deref(), Some(sub));
            }
        }
    }
}
