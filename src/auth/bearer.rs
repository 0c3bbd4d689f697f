//! Where a request carries its bearer token: `Authorization: Bearer`, or (browsers, which
//! cannot set headers on a WebSocket) an entry of `Sec-WebSocket-Protocol`.

use super::*;

/// Prefix of the WebSocket subprotocol entry that carries a bearer token (browsers cannot set
/// `Authorization` on a WebSocket).
pub const WS_BEARER_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// The caller's bearer token: `Authorization: Bearer`, else the WebSocket subprotocol entry
/// browsers use. No token at all is the empty string, which verification refuses as `missing`.
pub fn bearer_token(headers: &http::HeaderMap) -> Result<std::borrow::Cow<'_, str>, AuthError> {
    match headers.get(http::header::AUTHORIZATION) {
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| fail(AuthFailure::Malformed, "Authorization is not ASCII"))?;
            let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(fail(
                    AuthFailure::Malformed,
                    "Authorization is not a bearer token",
                ));
            }
            // Borrowed: the token is several KB and only looked up in the cache, mostly.
            Ok(std::borrow::Cow::Borrowed(rest.trim()))
        }
        None => Ok(std::borrow::Cow::Owned(
            ws_bearer_token(headers).unwrap_or_default(),
        )),
    }
}

/// The bearer token carried in `Sec-WebSocket-Protocol`, if any.
pub fn ws_bearer_token(headers: &http::HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let entry =
        ws_protocols(headers).find_map(|p| p.strip_prefix(WS_BEARER_PREFIX).map(str::to_owned))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(entry.trim_end_matches('='))
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// Every entry of every `Sec-WebSocket-Protocol` header, trimmed.
pub fn ws_protocols(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}
