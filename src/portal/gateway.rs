//! The browser's way to a cluster (`/-/web/<cluster>/…`), for the portal's terminal and live
//! logs (README "Web terminal"): a narrow gateway that turns a signed-in browser's request into
//! the cluster request it stands for, which then goes through the very same phases as kubectl's
//! (authenticate the session's token, authorize, audit, the cluster's credential mode, the
//! tunnel and its recording).
//!
//! The cookie alone opens nothing: the request must also come from the portal's own origin
//! (`Origin`, and `Sec-Fetch-Site` when sent) and carry the session's CSRF token (a header on
//! `fetch`, a query parameter on the WebSocket, which browsers cannot give headers), so a page
//! on another origin cannot ride the cookie (docs/security.md G1). Only four requests pass:
//! list namespaces, list pods, a pod's log, and exec over WebSocket.

use http::header::{self, HeaderValue};
use http::{Method, Request, Uri};
use hyper::body::Incoming;

use super::web::session::secrets_equal;
use crate::error::ProxyError;
use crate::state::State;

pub const PREFIX: &str = "/-/web/";

/// What a browser request stands for, once admitted.
pub struct Admitted {
    pub cluster: String,
    /// The cluster request-target (`/api/v1/...?...`).
    pub target: String,
    /// When the portal session ends (seconds since the epoch): the stream ends then too.
    pub session_ends: u64,
    /// `login.portal.terminal_idle`.
    pub idle: std::time::Duration,
}

/// The query parameters each kind of request may carry; anything else is dropped.
const LIST_KEYS: &[&str] = &["limit", "continue"];
const LOG_KEYS: &[&str] = &["container", "follow", "tailLines", "timestamps"];
const EXEC_KEYS: &[&str] = &["container", "command", "stdin", "stdout", "stderr", "tty"];

fn forbidden(why: &str) -> ProxyError {
    ProxyError::Forbidden(format!("web terminal: {why}"))
}

/// `[a-z0-9]([-a-z0-9.]*[a-z0-9])?`: a namespace or pod name, nothing that could change the path.
fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
}

/// Checks a browser's request and rewrites it in place into its cluster request, with the
/// session's token as the credential. Errors are answered like any other request's.
pub async fn admit(
    state: &State,
    req: &mut Request<Incoming>,
    path: &str,
) -> Result<Admitted, ProxyError> {
    let portal = state
        .cfg
        .login
        .as_ref()
        .and_then(|l| l.portal.as_ref())
        .filter(|p| p.terminal)
        .ok_or_else(|| {
            ProxyError::NotFound("the web terminal is not enabled on this relay".into())
        })?;
    let h = req.headers();
    let public = state.cfg.public_url.origin().ascii_serialization();
    let websocket = match h.get(header::UPGRADE) {
        None => false,
        Some(u) if u.as_bytes().eq_ignore_ascii_case(b"websocket") => true,
        Some(_) => return Err(forbidden("only WebSocket upgrades are served")),
    };
    match h.get(header::ORIGIN).map(|o| o.as_bytes()) {
        Some(o) if o == public.as_bytes() => {}
        Some(_) => return Err(forbidden("the request came from another site")),
        // Browsers always send Origin on a WebSocket handshake.
        None if websocket => return Err(forbidden("a WebSocket without Origin")),
        None => {}
    }
    if let Some(site) = h.get("sec-fetch-site") {
        if site.as_bytes() != b"same-origin" {
            return Err(forbidden("the request came from another site"));
        }
    }
    let Some((session, _)) = super::web::signed_in(state, h).await else {
        return Err(ProxyError::Unauthorized(crate::auth::AuthError {
            failure: crate::auth::AuthFailure::Missing,
            detail: "no portal session".into(),
        }));
    };
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let csrf = if websocket {
        query
            .iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.as_str())
    } else {
        h.get("x-csrf-token").and_then(|v| v.to_str().ok())
    };
    if !csrf.is_some_and(|c| secrets_equal(c, &session.csrf)) {
        return Err(forbidden("missing or wrong CSRF token; reload the page"));
    }

    let rest = path.strip_prefix(PREFIX).unwrap_or_default();
    let segs: Vec<&str> = rest.split('/').collect();
    let method = req.method().clone();
    let keys = match (segs.as_slice(), websocket) {
        ([_, "api", "v1", "namespaces"], false) => LIST_KEYS,
        ([_, "api", "v1", "namespaces", ns, "pods"], false) if name_ok(ns) => LIST_KEYS,
        ([_, "api", "v1", "namespaces", ns, "pods", pod, "log"], false)
            if name_ok(ns) && name_ok(pod) =>
        {
            LOG_KEYS
        }
        ([_, "api", "v1", "namespaces", ns, "pods", pod, "exec"], true)
            if name_ok(ns) && name_ok(pod) =>
        {
            EXEC_KEYS
        }
        _ => {
            return Err(ProxyError::NotFound(
                "the web terminal lists namespaces and pods, follows logs and opens exec sessions; nothing else".into(),
            ))
        }
    };
    if method != Method::GET {
        return Err(ProxyError::MethodNotAllowed(
            "the web terminal only reads (GET)".into(),
        ));
    }
    if !crate::config::is_cluster_name(segs[0]) {
        return Err(ProxyError::NotFound("no such cluster".into()));
    }
    let cluster = segs[0].to_owned();
    let mut kept: Vec<(&str, &str)> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (k, v) in &query {
        if !keys.contains(&k.as_str()) {
            continue;
        }
        // One value per parameter (the API server reads the first, the relay must not read
        // another), except the command's words.
        if k != "command" && seen.contains(&k.as_str()) {
            return Err(ProxyError::BadRequest(format!("`{k}` given twice")));
        }
        seen.push(k.as_str());
        // `follow` is passed on as exactly what the relay understood it to be.
        if k == "follow" {
            if crate::authz::query_flag(&format!("follow={}", urlencode(v)), "follow") {
                kept.push(("follow", "true"));
            }
            continue;
        }
        kept.push((k.as_str(), v.as_str()));
    }
    let mut target = format!("/{}", segs[1..].join("/"));
    if !kept.is_empty() {
        target.push('?');
        target.push_str(
            &url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(kept)
                .finish(),
        );
    }
    *req.uri_mut() = target
        .parse::<Uri>()
        .map_err(|_| ProxyError::BadRequest("invalid request-target".into()))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {}", session.token))
        .map_err(|_| ProxyError::Internal("session token is not a header value".into()))?;
    let h = req.headers_mut();
    // The cookie and the browser's own headers stay here; the session's token is the
    // credential from now on, checked again like a kubectl token.
    for name in [
        "cookie",
        "origin",
        "x-csrf-token",
        "sec-fetch-site",
        "sec-fetch-mode",
        "sec-fetch-dest",
        "referer",
    ] {
        h.remove(name);
    }
    h.insert(header::AUTHORIZATION, bearer);
    Ok(Admitted {
        cluster,
        target,
        session_ends: session.expires_at,
        idle: portal.terminal_idle,
    })
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_change_the_path() {
        for bad in ["", "..", ".x", "-x", "a/b", "A", "a%2F", "a?b", "a b"] {
            assert!(!name_ok(bad), "{bad:?}");
        }
        for good in ["default", "web-0", "kube-system", "a.b"] {
            assert!(name_ok(good), "{good:?}");
        }
    }
}
