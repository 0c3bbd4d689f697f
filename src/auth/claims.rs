//! The [`Principal`](super::Principal) from a verified token's claims: the identity key,
//! groups (and Entra's group overage), app ids.

use super::*;

pub(super) fn claim_str<'a>(
    claims: &'a serde_json::Map<String, Value>,
    name: &str,
) -> Option<&'a str> {
    claims
        .get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

pub(super) fn claim_list(claims: &serde_json::Map<String, Value>, name: &str) -> Vec<String> {
    match claims.get(name) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Entra replaces `groups` by a pointer to Graph above 200 groups (or sets `hasgroups`); the
/// pointer's URL is never fetched (docs/security.md E7).
pub(super) fn has_groups_overage(claims: &serde_json::Map<String, Value>) -> bool {
    claims
        .get("_claim_names")
        .and_then(|n| n.get("groups"))
        .is_some()
        || claims.get("hasgroups") == Some(&Value::Bool(true))
}

pub(super) fn principal_from(
    src: &KeySource,
    iss: &str,
    claims: serde_json::Map<String, Value>,
    token: &str,
) -> Result<Principal, AuthError> {
    let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    match &src.issuer.kind {
        IssuerKind::Oidc {
            username_claim,
            groups_claim,
            ..
        } => {
            let subject = claim_str(&claims, username_claim)
                .ok_or_else(|| fail(AuthFailure::Claims, format!("no {username_claim} claim")))?
                .to_owned();
            let groups = claim_list(&claims, groups_claim);
            let app_id = claim_str(&claims, "azp")
                .or_else(|| claim_str(&claims, "client_id"))
                .map(str::to_owned);
            Ok(Principal {
                issuer: src.name.clone(),
                user_key: format!("{}/{subject}", src.name),
                username: subject.clone(),
                subject,
                groups: groups.into(),
                groups_overage: false,
                app_only: false,
                oid: None,
                app_id,
                expires_at,
                claims,
                token: Arc::from(token),
                memo: Default::default(),
            })
        }
        IssuerKind::Entra {
            tenant_id,
            required_scopes,
            required_roles,
            ..
        } => {
            // `tid` must be a GUID naming the configured tenant, the same tenant as in `iss`
            // (which matched this tenant's v1 or v2 form exactly). Entra signing keys are shared
            // across tenants, so the signature alone proves nothing about the tenant.
            let tid = claim_str(&claims, "tid").unwrap_or_default();
            if !is_guid(tid)
                || !tid.eq_ignore_ascii_case(tenant_id)
                || !iss
                    .to_ascii_lowercase()
                    .contains(&tenant_id.to_ascii_lowercase())
            {
                return Err(fail(
                    AuthFailure::Tenant,
                    format!("tid {tid:?} is not the configured tenant"),
                ));
            }
            let oid = claim_str(&claims, "oid")
                .filter(|o| is_guid(o))
                .ok_or_else(|| fail(AuthFailure::Claims, "no oid claim"))?
                .to_owned();
            // Delegated tokens carry `scp`; app-only tokens carry `roles` and no `scp`
            // (`idtyp: app` when the optional claim is on).
            let app_only =
                claim_str(&claims, "idtyp") == Some("app") || claim_str(&claims, "scp").is_none();
            if app_only {
                let roles = claim_list(&claims, "roles");
                if !required_roles.is_empty() && !roles.iter().any(|r| required_roles.contains(r)) {
                    return Err(fail(
                        AuthFailure::Scope,
                        "app-only token without a required role",
                    ));
                }
            } else {
                let scp = claim_str(&claims, "scp").unwrap_or_default();
                if !required_scopes.is_empty()
                    && !scp
                        .split(' ')
                        .any(|s| required_scopes.iter().any(|r| r == s))
                {
                    return Err(fail(AuthFailure::Scope, "no required scope in scp"));
                }
            }
            let username = claim_str(&claims, "upn").unwrap_or(&oid).to_owned();
            let groups = claim_list(&claims, "groups");
            let app_id = claim_str(&claims, "appid")
                .or_else(|| claim_str(&claims, "azp"))
                .map(str::to_owned);
            Ok(Principal {
                issuer: src.name.clone(),
                user_key: format!("{}/{oid}", src.name),
                subject: oid.clone(),
                username,
                groups_overage: has_groups_overage(&claims),
                app_only,
                groups: groups.into(),
                oid: Some(oid),
                app_id,
                expires_at,
                claims,
                token: Arc::from(token),
                memo: Default::default(),
            })
        }
    }
}
