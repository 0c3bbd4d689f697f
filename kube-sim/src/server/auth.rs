//! Authentication like AKS: a bearer token is either a static token or a JWT from a trusted
//! issuer (Entra-style claims); then `Impersonate-*` headers, checked like kube-apiserver's
//! impersonation filter.
//!
//! Failures never say why beyond kube-apiserver's own messages ("Unauthorized"); the reason goes
//! to the debug log.

use std::collections::BTreeMap;

use http::{HeaderMap, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::{ApiError, JwtIssuer, SimAuth};
use crate::record::UserInfo;

const ALL_AUTHENTICATED: &str = "system:authenticated";
const ALL_UNAUTHENTICATED: &str = "system:unauthenticated";
/// go-oidc's allowance for issuer clock skew on `nbf` (kube-apiserver's OIDC authenticator);
/// `exp` gets none.
const NBF_LEEWAY_SECS: i64 = 300;

/// The effective identity of a request, or the Status to answer with.
pub(super) fn authenticate(auth: &SimAuth, headers: &HeaderMap) -> Result<UserInfo, ApiError> {
    let token = bearer(headers).ok_or_else(ApiError::unauthorized)?;
    let (user, can_impersonate) =
        if let Some(st) = auth.static_tokens.iter().find(|t| t.token == token) {
            (st.user.clone(), st.can_impersonate)
        } else {
            let user = auth
                .jwt
                .iter()
                .find_map(|issuer| match verify_jwt(issuer, token) {
                    Ok(user) => Some(user),
                    Err(why) => {
                        tracing::debug!(issuer = %issuer.issuer, %why, "kube-sim JWT rejected");
                        None
                    }
                })
                .ok_or_else(ApiError::unauthorized)?;
            (user, false)
        };
    let user = with_group(user, ALL_AUTHENTICATED);
    match impersonation(headers)? {
        None => Ok(user),
        Some(_) if !can_impersonate => Err(forbidden_impersonation(&user, headers)),
        Some(target) => Ok(target),
    }
}

/// `Authorization: Bearer <token>` (scheme case-insensitive, as kube-apiserver parses it).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Validates a JWT against one issuer: `kid` names the key, RS256/ES256 only, `iss`, `aud` and
/// `exp` required, `nbf` checked with go-oidc's leeway. Username is `upn`, else `oid`, else
/// `sub` (AKS with Entra ID); groups from `groups`; extra `oid`.
fn verify_jwt(issuer: &JwtIssuer, token: &str) -> Result<UserInfo, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
        return Err(format!("algorithm {:?} not allowed", header.alg));
    }
    let kid = header.kid.ok_or("token has no kid")?;
    let jwk = issuer
        .jwks
        .find(&kid)
        .ok_or_else(|| format!("unknown kid {kid}"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = 0;
    validation.validate_nbf = false; // checked below with go-oidc's leeway
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.set_issuer(&[&issuer.issuer]);
    validation.set_audience(&issuer.audiences);
    let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map_err(|e| e.to_string())?
        .claims;
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_i64) {
        if crate::store::now_unix() + NBF_LEEWAY_SECS < nbf {
            return Err("token not valid yet (nbf)".into());
        }
    }
    let claim = |name: &str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let username = claim("upn")
        .or_else(|| claim("oid"))
        .or_else(|| claim("sub"))
        .ok_or("token has no upn, oid or sub")?;
    // Like kube-apiserver's OIDC authenticator, accept a single string as one group.
    let groups = match claims.get("groups") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|g| {
                g.as_str()
                    .map(str::to_owned)
                    .ok_or("groups claim holds a non-string")
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::String(g)) => vec![g.clone()],
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err("groups claim is not a list of strings".into()),
    };
    let mut extra = BTreeMap::new();
    if let Some(oid) = claim("oid") {
        extra.insert("oid".to_owned(), vec![oid.to_owned()]);
    }
    Ok(UserInfo {
        username: username.to_owned(),
        uid: None,
        groups,
        extra,
    })
}

fn with_group(mut user: UserInfo, group: &str) -> UserInfo {
    if !user.groups.iter().any(|g| g == group) {
        user.groups.push(group.to_owned());
    }
    user
}

/// The identity requested by `Impersonate-*` headers, if any. Like kube-apiserver, asking for
/// groups, a uid or extras without `Impersonate-User` is an internal error (500).
fn impersonation(headers: &HeaderMap) -> Result<Option<UserInfo>, ApiError> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    };
    let username = values("impersonate-user")
        .into_iter()
        .next()
        .filter(|u| !u.is_empty());
    let groups = values("impersonate-group");
    let uid = values("impersonate-uid").into_iter().next();
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if let Some(raw_key) = name.as_str().strip_prefix("impersonate-extra-") {
            let key = percent_encoding::percent_decode_str(raw_key)
                .decode_utf8_lossy()
                .to_lowercase();
            extra
                .entry(key)
                .or_default()
                .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
        }
    }
    let Some(username) = username else {
        if groups.is_empty() && uid.is_none() && extra.is_empty() {
            return Ok(None);
        }
        let mut requested: Vec<String> = groups.iter().map(|g| format!("Group {g:?}")).collect();
        requested.extend(uid.iter().map(|u| format!("UID {u:?}")));
        requested.extend(extra.iter().map(|(k, v)| format!("Extra {k:?}={v:?}")));
        return Err(ApiError::internal(format!(
            "requested [{}] without impersonating a user",
            requested.join(" ")
        )));
    };
    let groups_specified = !groups.is_empty();
    let mut user = UserInfo {
        username,
        uid,
        groups,
        extra,
    };
    // A service account gets its fixed groups unless groups were asked for explicitly.
    if let Some((ns, _)) = service_account(&user.username) {
        if !groups_specified {
            user.groups = vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{ns}"),
            ];
        }
    }
    if user.username != "system:anonymous"
        && !user
            .groups
            .iter()
            .any(|g| g == ALL_AUTHENTICATED || g == ALL_UNAUTHENTICATED)
    {
        user.groups.push(ALL_AUTHENTICATED.to_owned());
    }
    Ok(Some(user))
}

fn service_account(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
}

/// kube-apiserver's message for the first impersonation the caller may not perform: the user
/// (or service account) comes first, as in its filter.
fn forbidden_impersonation(caller: &UserInfo, headers: &HeaderMap) -> ApiError {
    let first = |name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    };
    let target = first("impersonate-user");
    let who = &caller.username;
    let (resource, name, scope) = match service_account(&target) {
        Some((ns, sa)) => (
            "serviceaccounts",
            sa.to_owned(),
            format!("in the namespace \"{ns}\""),
        ),
        None => ("users", target.clone(), "at the cluster scope".to_owned()),
    };
    ApiError::new(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!(
            "{resource} \"{name}\" is forbidden: User \"{who}\" cannot impersonate resource \"{resource}\" in API group \"\" {scope}"
        ),
    )
    .with_details(&name, resource, "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::StaticToken;
    use http::HeaderValue;

    fn auth() -> SimAuth {
        SimAuth {
            static_tokens: vec![
                StaticToken {
                    token: "relay".into(),
                    user: UserInfo {
                        username: "relay-sa".into(),
                        ..Default::default()
                    },
                    can_impersonate: true,
                },
                StaticToken {
                    token: "plain".into(),
                    user: UserInfo {
                        username: "alice".into(),
                        groups: vec!["dev".into()],
                        ..Default::default()
                    },
                    can_impersonate: false,
                },
            ],
            jwt: Vec::new(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn static_tokens_and_rejections() {
        let user = authenticate(&auth(), &headers(&[("authorization", "Bearer plain")])).unwrap();
        assert_eq!(user.username, "alice");
        assert_eq!(user.groups, ["dev", "system:authenticated"]);
        let lower = authenticate(&auth(), &headers(&[("authorization", "bearer plain")]));
        assert!(lower.is_ok());
        for h in [
            vec![],
            vec![("authorization", "Bearer nope")],
            vec![("authorization", "Basic plain")],
            vec![("authorization", "Bearer ")],
        ] {
            let e = authenticate(&auth(), &headers(&h)).unwrap_err();
            assert_eq!(e.code, StatusCode::UNAUTHORIZED);
            assert_eq!(e.to_status()["reason"], "Unauthorized");
        }
    }

    #[test]
    fn impersonation_by_allowed_caller() {
        let user = authenticate(
            &auth(),
            &headers(&[
                ("authorization", "Bearer relay"),
                ("impersonate-user", "bob@example.com"),
                ("impersonate-group", "team-a"),
                ("impersonate-group", "team-b"),
                ("impersonate-uid", "u-1"),
                ("impersonate-extra-oid", "o-1"),
                ("impersonate-extra-acme.com%2fproject", "x"),
                ("impersonate-extra-acme.com%2fproject", "y"),
            ]),
        )
        .unwrap();
        assert_eq!(user.username, "bob@example.com");
        assert_eq!(user.uid.as_deref(), Some("u-1"));
        assert_eq!(user.groups, ["team-a", "team-b", "system:authenticated"]);
        assert_eq!(user.extra["oid"], ["o-1"]);
        assert_eq!(user.extra["acme.com/project"], ["x", "y"]);
        let sa = authenticate(
            &auth(),
            &headers(&[
                ("authorization", "Bearer relay"),
                ("impersonate-user", "system:serviceaccount:ns1:builder"),
            ]),
        )
        .unwrap();
        assert_eq!(
            sa.groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:ns1",
                "system:authenticated"
            ]
        );
    }

    #[test]
    fn impersonation_refused() {
        let e = authenticate(
            &auth(),
            &headers(&[("authorization", "Bearer plain"), ("impersonate-user", "x")]),
        )
        .unwrap_err();
        assert_eq!(e.code, StatusCode::FORBIDDEN);
        assert_eq!(
            e.message,
            "users \"x\" is forbidden: User \"alice\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope"
        );
        let e = authenticate(
            &auth(),
            &headers(&[
                ("authorization", "Bearer relay"),
                ("impersonate-group", "g"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.code, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            e.message.contains("without impersonating a user"),
            "{}",
            e.message
        );
    }
}
