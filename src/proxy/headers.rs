//! Header hygiene: what may cross the relay, and what the relay adds.
//!
//! Order matters (docs/security.md B1, B4, B5, B7, D4):
//! 1. Read the client's `Connection` tokens first, then drop hop-by-hop headers and every header
//!    they name, so a client can never use `Connection:` to delete what the relay adds later.
//! 2. Drop identity-bearing headers the client must not control: `Authorization`, any
//!    `Impersonate-*`, any `X-Remote-*`, forwarding headers (`X-Forwarded-*`, `Forwarded`,
//!    `X-Original-URL`, `X-Real-IP`…), the bearer entry of `Sec-WebSocket-Protocol`.
//! 3. Only then add the relay's own: the upstream credential, `Impersonate-*` for the caller,
//!    `X-Forwarded-For`, `Audit-ID`.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub use crate::auth::{ws_bearer_token, ws_protocols, WS_BEARER_PREFIX};
use crate::auth::{IdentityHeaders, Principal};
use crate::config::ForwardGroups;
use crate::error::ProxyError;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "http2-settings",
];

/// Headers a client could use to steer decisions downstream; the relay overwrites or drops them.
const FORWARDING: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-uri",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-real-ip",
];

/// Request headers larger than this (names and values, all together) are refused with a 431
/// Status before any token parsing. hyper's own buffer limit (64 KiB) sits above it and answers
/// anything larger with a bare 431.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The size of a header block as sent on the wire (roughly: name, value and separators).
pub fn total_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

/// Refuses header names that only differ from identity headers by `_` (`Impersonate_Group`):
/// some servers fold `_` into `-`, so such a header could be read as one we strip.
pub fn reject_underscore_identity_headers(headers: &HeaderMap) -> Result<(), ProxyError> {
    for name in headers.keys() {
        let n = name.as_str();
        if n.contains('_') {
            let folded = n.replace('_', "-");
            if folded.starts_with("impersonate-") || folded.starts_with("x-remote-") {
                return Err(ProxyError::BadRequest(format!(
                    "header {n} is not allowed (identity headers with `_` are refused)"
                )));
            }
        }
    }
    Ok(())
}

/// The identity a request carries upstream in `Impersonate-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impersonation {
    pub user: String,
    pub uid: Option<String>,
    pub groups: Arc<[String]>,
    /// `(key, value)`; keys lower-case and percent-encoded as they travel in header names.
    pub extra: Vec<(String, String)>,
}

impl Impersonation {
    /// The caller's own identity (impersonate mode without `--as`).
    pub fn of(p: &Principal) -> Self {
        Self {
            user: p.username.clone(),
            uid: None,
            groups: p.groups.clone(),
            // AKS Azure RBAC only evaluates impersonated users that carry extra.oid.
            extra: p
                .oid
                .iter()
                .map(|o| ("oid".to_owned(), o.clone()))
                .collect(),
        }
    }
}

/// The impersonation the client asks for (`kubectl --as/--as-group`), if any. Like
/// kube-apiserver, any other `Impersonate-*` header needs `Impersonate-User`.
pub fn requested_impersonation(headers: &HeaderMap) -> Result<Option<Impersonation>, ProxyError> {
    let mut user = None;
    let mut uid = None;
    let mut groups = Vec::new();
    let mut extra = Vec::new();
    let mut any = false;
    for (name, value) in headers {
        let n = name.as_str();
        let Some(rest) = n.strip_prefix("impersonate-") else {
            continue;
        };
        any = true;
        let v = value
            .to_str()
            .map_err(|_| ProxyError::BadRequest(format!("{n} is not valid text")))?
            .to_owned();
        match rest {
            "user" if user.is_none() => user = Some(v),
            "user" => {
                return Err(ProxyError::BadRequest(
                    "more than one Impersonate-User".into(),
                ))
            }
            "uid" => uid = Some(v),
            "group" => groups.push(v),
            _ => match rest.strip_prefix("extra-") {
                Some(key) if !key.is_empty() => extra.push((key.to_owned(), v)),
                _ => {
                    return Err(ProxyError::BadRequest(format!(
                        "unknown impersonation header {n}"
                    )))
                }
            },
        }
    }
    if !any {
        return Ok(None);
    }
    match user {
        Some(user) if !user.is_empty() => Ok(Some(Impersonation {
            user,
            uid,
            groups: groups.into(),
            extra,
        })),
        _ => Err(ProxyError::BadRequest(
            "impersonation headers without Impersonate-User".into(),
        )),
    }
}

/// The `Connection` tokens, lower-cased.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Copies the client's headers minus everything the relay must not forward.
pub fn sanitize_request(headers: &HeaderMap) -> HeaderMap {
    let named = connection_tokens(headers);
    let mut out = HeaderMap::with_capacity(headers.len() + 6);
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || FORWARDING.contains(&n)
            || named.iter().any(|t| t == n)
            || n == "authorization"
            || n == "host"
            || n == "audit-id"
            || n.starts_with("impersonate-")
            || n.starts_with("x-remote-")
            || n == header::SEC_WEBSOCKET_PROTOCOL.as_str()
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    // Keep the real subprotocol offer, without the bearer entry.
    let protocols: Vec<&str> = ws_protocols(headers)
        .filter(|p| !p.starts_with(WS_BEARER_PREFIX))
        .collect();
    if !protocols.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&protocols.join(", ")) {
            out.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    out
}

/// A header value from identity data: CR, LF and other control characters are refused rather
/// than stripped, so an identity is never silently changed into another (docs/security.md B3).
fn identity_value(s: &str) -> Result<HeaderValue, &'static str> {
    if s.bytes().any(|b| b.is_ascii_control()) {
        return Err("the token's identity contains control characters and cannot be forwarded");
    }
    let v = HeaderValue::from_bytes(s.as_bytes())
        .map_err(|_| "the token's identity cannot be sent in a header")?;
    // Cloned once here so the value's buffer is shared from now on: every later clone (one per
    // request when the headers are memoised) is a reference count, not an allocation.
    drop(v.clone());
    Ok(v)
}

/// The `Impersonate-*` headers that name `id`, in the order they are sent.
pub fn identity_headers(id: &Impersonation) -> Result<IdentityHeaders, &'static str> {
    let mut out = Vec::with_capacity(2 + id.groups.len() + id.extra.len());
    out.push((
        HeaderName::from_static("impersonate-user"),
        identity_value(&id.user)?,
    ));
    if let Some(uid) = &id.uid {
        out.push((
            HeaderName::from_static("impersonate-uid"),
            identity_value(uid)?,
        ));
    }
    for g in id.groups.iter() {
        out.push((
            HeaderName::from_static("impersonate-group"),
            identity_value(g)?,
        ));
    }
    for (k, v) in &id.extra {
        let name = HeaderName::from_bytes(format!("impersonate-extra-{k}").as_bytes())
            .map_err(|_| "an impersonation extra key cannot be sent in a header")?;
        out.push((name, identity_value(v)?));
    }
    Ok(out.into())
}

/// The caller's own `Impersonate-*` headers (impersonate mode), built once per principal.
pub fn own_identity_headers(p: &Principal) -> Result<&[(HeaderName, HeaderValue)], ProxyError> {
    match p
        .memo
        .impersonation
        .get_or_init(|| identity_headers(&Impersonation::of(p)))
    {
        Ok(h) => Ok(h),
        Err(why) => Err(ProxyError::Forbidden((*why).to_owned())),
    }
}

/// Adds the upstream credential (`authorization`, from the cluster's credential layer; `None`
/// when the relay authenticates with a client certificate) and the `Impersonate-*` headers of
/// the identity it speaks for (the caller in impersonate mode, or a permitted `kubectl --as`).
/// With `groups`, an `Impersonate-Group` goes only when the cluster's `forward_groups` lists it.
pub fn add_identity(
    out: &mut HeaderMap,
    authorization: Option<HeaderValue>,
    identity: &[(HeaderName, HeaderValue)],
    groups: Option<&ForwardGroups>,
) {
    if let Some(mut v) = authorization {
        v.set_sensitive(true);
        out.insert(header::AUTHORIZATION, v);
    }
    out.reserve(identity.len());
    let kept = identity.iter().filter(|(name, value)| match groups {
        Some(keep) => name != "impersonate-group" || keep.admits(value.as_bytes()),
        None => true,
    });
    // A name's values come one after another (all the groups): each run is one map entry,
    // found once and appended to, instead of the name hashed and looked up again per value.
    let mut run: Option<(&HeaderName, http::header::OccupiedEntry<'_, HeaderValue>)> = None;
    for (name, value) in kept {
        match &mut run {
            Some((n, entry)) if *n == name => entry.append(value.clone()),
            _ => {
                let entry = match out.entry(name.clone()) {
                    http::header::Entry::Occupied(mut e) => {
                        e.append(value.clone());
                        e
                    }
                    http::header::Entry::Vacant(v) => v.insert_entry(value.clone()),
                };
                run = Some((name, entry));
            }
        }
    }
}

/// Appends the peer to `X-Forwarded-For` (after any value the client sent, which stays
/// informational) and sets `Audit-ID`.
/// `peer` is the peer's IP as a header value (`ConnCtx::peer_header`).
pub fn add_forwarding(
    out: &mut HeaderMap,
    client: &HeaderMap,
    peer: &HeaderValue,
    audit_id: &HeaderValue,
) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let prior: Vec<&str> = client
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if prior.is_empty() {
        out.insert(xff, peer.clone());
    } else {
        let joined = format!(
            "{}, {}",
            prior.join(", "),
            peer.to_str().unwrap_or_default()
        );
        if let Ok(v) = HeaderValue::from_str(&joined) {
            out.insert(xff, v);
        }
    }
    out.insert(HeaderName::from_static("audit-id"), wire_audit_id(audit_id));
}

/// The `Audit-ID` as sent on a connection: never indexed by HPACK. Every request has its own,
/// so indexing one only evicts entries that repeat (the impersonation headers: with an Entra
/// caller's 40 groups, one audit id more per request made every group miss the table and be
/// Huffman-coded again on every request).
pub fn wire_audit_id(audit_id: &HeaderValue) -> HeaderValue {
    let mut v = audit_id.clone();
    v.set_sensitive(true);
    v
}

/// Strips hop-by-hop headers (and those named in `Connection`) from an upstream response.
pub fn sanitize_response(headers: &mut HeaderMap) {
    let named = connection_tokens(headers);
    // Only the names present are removed, each by the name the map already holds: a removal by
    // `&str` parses the name first, and most answers carry one such header at most (HTTP/1.1
    // `Connection: keep-alive`). Collecting nothing allocates nothing.
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|k| HOP_BY_HOP.contains(&k.as_str()) || named.iter().any(|t| t == k.as_str()))
        .cloned()
        .collect();
    for n in &present {
        headers.remove(n);
    }
}

/// The client's `Audit-ID` when it is a sane token, else a fresh UUID.
pub fn audit_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get("audit-id") {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            return v.clone();
        }
    }
    // A UUID is always a valid header value.
    HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
        .unwrap_or(HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn strips_identity_and_hop_by_hop_headers() {
        let h = map(&[
            ("Impersonate-User", "admin"),
            ("impersonate-group", "system:masters"),
            ("IMPERSONATE-EXTRA-scopes", "x"),
            ("Impersonate-Uid", "1"),
            ("X-Remote-User", "admin"),
            ("x-remote-group", "system:masters"),
            ("x-remote-extra-foo", "bar"),
            ("Authorization", "Bearer client"),
            ("Connection", "keep-alive, X-Custom"),
            ("X-Custom", "drop me"),
            ("Keep-Alive", "5"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("X-Forwarded-Host", "evil"),
            ("X-Original-URL", "/clusters/b"),
            ("Accept", "application/json"),
            ("Kubectl-Command", "kubectl get"),
        ]);
        let out = sanitize_request(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "kubectl-command"]);
    }

    #[test]
    fn connection_cannot_remove_relay_headers() {
        let h = map(&[(
            "Connection",
            "keep-alive, Authorization, Impersonate-Group, Audit-Id",
        )]);
        let mut out = sanitize_request(&h);
        out.insert("impersonate-group", HeaderValue::from_static("team"));
        add_forwarding(
            &mut out,
            &h,
            &HeaderValue::from_static("10.0.0.1"),
            &HeaderValue::from_static("abc"),
        );
        assert_eq!(out["impersonate-group"], "team");
        assert_eq!(out["audit-id"], "abc");
    }

    #[test]
    fn ws_bearer_entry_removed_real_protocol_kept() {
        use base64::Engine as _;
        let tok = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("secret-token");
        let h = map(&[(
            "Sec-WebSocket-Protocol",
            &format!("{WS_BEARER_PREFIX}{tok}, v4.channel.k8s.io"),
        )]);
        assert_eq!(ws_bearer_token(&h).as_deref(), Some("secret-token"));
        let out = sanitize_request(&h);
        assert_eq!(out["sec-websocket-protocol"], "v4.channel.k8s.io");
    }

    #[test]
    fn underscore_identity_headers_rejected() {
        assert!(reject_underscore_identity_headers(&map(&[("Impersonate_Group", "x")])).is_err());
        assert!(reject_underscore_identity_headers(&map(&[("X_Remote_User", "x")])).is_err());
        assert!(reject_underscore_identity_headers(&map(&[("X_Custom", "x")])).is_ok());
    }

    #[test]
    fn xff_appended_and_audit_id_kept_or_minted() {
        let h = map(&[("X-Forwarded-For", "1.2.3.4"), ("Audit-ID", "abc-123")]);
        let id = audit_id(&h);
        assert_eq!(id, "abc-123");
        let mut out = HeaderMap::new();
        add_forwarding(&mut out, &h, &HeaderValue::from_static("10.0.0.9"), &id);
        assert_eq!(out["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert!(
            out["audit-id"].is_sensitive(),
            "a per-request value is never indexed"
        );
        let mut alone = HeaderMap::new();
        add_forwarding(
            &mut alone,
            &HeaderMap::new(),
            &HeaderValue::from_static("10.0.0.9"),
            &id,
        );
        assert_eq!(alone["x-forwarded-for"], "10.0.0.9");
        let bad = map(&[("Audit-ID", "has space\there")]);
        assert_ne!(audit_id(&bad), "has space\there");
        assert_eq!(audit_id(&HeaderMap::new()).len(), 36);
    }

    #[test]
    fn requested_impersonation_is_parsed_like_the_apiserver() {
        assert_eq!(
            requested_impersonation(&map(&[("Accept", "x")])).unwrap(),
            None
        );
        let got = requested_impersonation(&map(&[
            ("Impersonate-User", "jane"),
            ("Impersonate-Group", "a"),
            ("impersonate-group", "b"),
            ("Impersonate-Uid", "42"),
            ("Impersonate-Extra-acme.com%2Fproject", "p1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(got.user, "jane");
        assert_eq!(&*got.groups, ["a", "b"]);
        assert_eq!(got.uid.as_deref(), Some("42"));
        assert_eq!(
            got.extra,
            [("acme.com%2fproject".to_owned(), "p1".to_owned())]
        );
        for bad in [
            vec![("Impersonate-Group", "system:masters")],
            vec![("Impersonate-Uid", "1")],
            vec![("Impersonate-Extra-x", "1")],
            vec![("Impersonate-User", "")],
            vec![("Impersonate-User", "a"), ("impersonate-user", "b")],
            vec![("Impersonate-User", "a"), ("Impersonate-Extra-", "b")],
            vec![("Impersonate-User", "a"), ("Impersonate-Whatever", "b")],
        ] {
            assert!(requested_impersonation(&map(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forward_groups_keep_only_the_listed_groups() {
        let id = Impersonation {
            user: "alice".into(),
            uid: Some("u1".into()),
            groups: vec!["ops".into(), "g1".into(), "g2".into(), "devs".into()].into(),
            extra: vec![("oid".into(), "1234".into())],
        };
        let keep = ForwardGroups::of(&["devs", "ops", "absent"]);
        let mut out = HeaderMap::new();
        add_identity(&mut out, None, &identity_headers(&id).unwrap(), Some(&keep));
        assert_eq!(
            out.get_all("impersonate-group").iter().collect::<Vec<_>>(),
            ["ops", "devs"]
        );
        // The user, uid and extras are not groups: they always go.
        assert_eq!(out["impersonate-user"], "alice");
        assert_eq!(out["impersonate-uid"], "u1");
        assert_eq!(out["impersonate-extra-oid"], "1234");
        // An empty list sends no group at all.
        let mut out = HeaderMap::new();
        add_identity(
            &mut out,
            None,
            &identity_headers(&id).unwrap(),
            Some(&ForwardGroups::of(&[])),
        );
        assert!(out.get("impersonate-group").is_none());
        assert_eq!(out["impersonate-user"], "alice");
    }

    #[test]
    fn identity_headers_are_added_after_stripping() {
        let client = map(&[
            ("Impersonate-Group", "system:masters"),
            ("Authorization", "Bearer x"),
        ]);
        let mut out = sanitize_request(&client);
        let id = Impersonation {
            user: "alice".into(),
            uid: None,
            groups: vec!["devs".into()].into(),
            extra: vec![("oid".into(), "1234".into())],
        };
        add_identity(
            &mut out,
            Some(HeaderValue::from_static("Bearer relay")),
            &identity_headers(&id).unwrap(),
            None,
        );
        assert_eq!(
            out.get_all("impersonate-group").iter().collect::<Vec<_>>(),
            ["devs"]
        );
        assert_eq!(out["authorization"], "Bearer relay");
        assert!(out["authorization"].is_sensitive());
        assert_eq!(out["impersonate-extra-oid"], "1234");
    }

    #[test]
    fn the_callers_own_headers_are_built_once_and_refused_the_same_way() {
        let mut p = Principal::for_tests("entra", "alice");
        p.groups = vec!["devs".to_owned(), "ops".to_owned()].into();
        p.oid = Some("1234".into());
        let first = own_identity_headers(&p).unwrap().as_ptr();
        let again = own_identity_headers(&p).unwrap();
        assert_eq!(first, again.as_ptr(), "memoised on the principal");
        let names: Vec<_> = again.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
        assert_eq!(
            names,
            [
                ("impersonate-user", HeaderValue::from_static("alice")),
                ("impersonate-group", HeaderValue::from_static("devs")),
                ("impersonate-group", HeaderValue::from_static("ops")),
                ("impersonate-extra-oid", HeaderValue::from_static("1234")),
            ]
        );
        let mut bad = Principal::for_tests("entra", "mallory");
        bad.groups = vec!["ops\r\nImpersonate-Group: system:masters".to_owned()].into();
        for _ in 0..2 {
            assert!(matches!(
                own_identity_headers(&bad),
                Err(ProxyError::Forbidden(_))
            ));
        }
    }

    #[test]
    fn control_characters_in_identity_refused() {
        assert!(identity_value("alice\r\nImpersonate-Group: system:masters").is_err());
        assert!(identity_value("alice").is_ok());
    }
}
