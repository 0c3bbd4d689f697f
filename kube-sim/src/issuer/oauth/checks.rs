//! Parsing requests and checking them as a real authorization server would (PKCE, redirect
//! URIs, client credentials, repeated parameters).

use super::*;

// === parsing and checks ===

/// Form or query parameters. OAuth parameters may appear at most once (RFC 6749 §3.1, §3.2);
/// the first repeated name is remembered so the request can be refused.
pub(super) struct Params {
    pub(super) map: BTreeMap<String, String>,
    pub(super) duplicate: Option<String>,
}

impl Params {
    pub(super) fn parse(raw: &[u8]) -> Self {
        let mut map = BTreeMap::new();
        let mut duplicate = None;
        for (k, v) in form_urlencoded::parse(raw) {
            if map.contains_key(k.as_ref()) {
                duplicate.get_or_insert_with(|| k.to_string());
            } else {
                map.insert(k.into_owned(), v.into_owned());
            }
        }
        Self { map, duplicate }
    }

    /// RFC 6749 §3.1: a parameter may appear at most once.
    pub(super) fn check_unique(&self) -> Result<(), String> {
        match &self.duplicate {
            Some(dup) => Err(format!("the parameter {dup:?} is given more than once")),
            None => Ok(()),
        }
    }

    /// The value, unless empty: RFC 6749 §3.1 treats empty parameters as omitted.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.map
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

pub(super) fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1).
pub(super) fn parse_basic(value: &header::HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| -> Option<String> {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    Some((unescape(id)?, unescape(secret)?))
}

/// Whether `client` may be sent to `uri`: exactly a registered URI, or for a native client any
/// loopback `http` URI with an explicit port (RFC 8252 §7.3: the port is chosen at run time).
pub(super) fn redirect_allowed(client: &OAuthClient, uri: &str) -> bool {
    match &client.kind {
        ClientKind::Confidential { redirect_uris, .. } => redirect_uris.iter().any(|r| r == uri),
        ClientKind::PublicLoopback => is_loopback_redirect(uri),
    }
}

pub(super) fn is_loopback_redirect(uri: &str) -> bool {
    // RFC 6749 §3.1.2: no fragment.
    if uri.contains('#') {
        return false;
    }
    let Some(rest) = uri.strip_prefix("http://") else {
        return false;
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once("]:") {
            Some((h, p)) => (h, p),
            None => return false,
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => return false,
        }
    };
    let loopback_host =
        matches!(host, "127.0.0.1" | "::1") || host.eq_ignore_ascii_case("localhost");
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    loopback_host && port_ok
}

/// RFC 7636 §4.1: 43–128 characters of `[A-Za-z0-9-._~]` (verifiers; S256 challenges are 43).
pub(super) fn is_pkce_value(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// RFC 7636 §4.6: `BASE64URL(SHA256(verifier)) == challenge`, compared in constant time.
pub(super) fn pkce_matches(challenge: &str, verifier: &str) -> bool {
    if !is_pkce_value(verifier) {
        return false;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    let computed = URL_SAFE_NO_PAD.encode(digest.as_ref());
    aws_lc_rs::constant_time::verify_slices_are_equal(computed.as_bytes(), challenge.as_bytes())
        .is_ok()
}

/// 256 random bits, base64url: codes, device codes and refresh tokens.
pub(super) fn random_token() -> Result<String, RandomError> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| RandomError("the random number generator failed".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

pub(super) fn new_user_code() -> Result<String, RandomError> {
    let n = USER_CODE_ALPHABET.len();
    // Reject bytes past the largest multiple of the alphabet size: no modulo bias.
    let limit = 256 - 256 % n;
    let mut code = String::with_capacity(USER_CODE_LEN);
    while code.len() < USER_CODE_LEN {
        let mut buf = [0u8; 16];
        aws_lc_rs::rand::fill(&mut buf)
            .map_err(|_| RandomError("the random number generator failed".into()))?;
        for b in buf {
            if code.len() < USER_CODE_LEN && usize::from(b) < limit {
                code.push(char::from(USER_CODE_ALPHABET[usize::from(b) % n]));
            }
        }
    }
    Ok(code)
}

/// `BCDFGHJK` → `BCDF-GHJK` (RFC 8628 §6.1: easier to read and type).
pub(super) fn format_user_code(code: &str) -> String {
    let (a, b) = code.split_at(code.len() / 2);
    format!("{a}-{b}")
}

/// What a person typed → the stored form: case-insensitive, dashes and spaces ignored.
pub(super) fn normalize_user_code(typed: &str) -> Option<String> {
    let code: String = typed
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (code.len() == USER_CODE_LEN && code.bytes().all(|b| USER_CODE_ALPHABET.contains(&b)))
        .then_some(code)
}

pub(super) fn scope_text(scopes: &[String]) -> String {
    if scopes.is_empty() {
        String::new()
    } else {
        format!(" (scopes: <code>{}</code>)", escape(&scopes.join(" ")))
    }
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
