//! Sealed cookies: the portal keeps no server-side state, so what a browser must carry between
//! requests (the sign-in attempt, then the session) is sealed with AES-256-GCM under the
//! configured cookie key. Every replica reads the same key file, so any replica opens a cookie
//! another one sealed (docs/operations.md "Scale out").
//!
//! Wire format of a sealed value: `base64url(nonce[12] ‖ ciphertext ‖ tag[16])`, no padding.
//! The nonce is random per seal (96 bits; a key seals far fewer than 2³² values between
//! rotations in practice). The additional authenticated data is a purpose label
//! ([`SESSION_PURPOSE`], [`LOGIN_PURPOSE`]), so a value sealed for one purpose never opens as
//! another: a login cookie cannot be replayed as a session.
//!
//! Invariants: opening never panics on client input; a value that fails to open for any reason
//! (tampered, other key, other purpose, truncated, too large) is simply `None`, i.e. signed out.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::config::CookieKey;

/// The session cookie (or the prefix of its chunks, `-1` … `-4`).
pub const SESSION_COOKIE: &str = "__Host-kube-relay-session";
/// The short-lived cookie holding one sign-in attempt's state, PKCE verifier and nonce.
pub const LOGIN_COOKIE: &str = "__Host-kube-relay-login";
/// AAD of session cookies.
pub const SESSION_PURPOSE: &str = "kube-relay session v1";
/// AAD of login cookies.
pub const LOGIN_PURPOSE: &str = "kube-relay login v1";
/// Largest cookie value written in one piece. Browsers keep at least 4096 bytes per cookie
/// (name, value and attributes together); 3800 leaves room for the rest.
pub const MAX_CHUNK: usize = 3800;
/// At most this many chunks: a session never takes more than ~15 kB of the Cookie header.
pub const MAX_CHUNKS: usize = 4;
/// Values longer than the largest possible session are refused before decoding.
const MAX_SEALED: usize = MAX_CHUNK * MAX_CHUNKS;

/// Seals `plaintext` for `purpose`. Fails only if the system's random source does.
pub fn seal(
    key: &CookieKey,
    purpose: &str,
    plaintext: &[u8],
) -> Result<String, aws_lc_rs::error::Unspecified> {
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce)?;
    let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key.0)?);
    let mut in_out = plaintext.to_vec();
    aead.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(purpose.as_bytes()),
        &mut in_out,
    )?;
    let mut out = Vec::with_capacity(NONCE_LEN + in_out.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&in_out);
    Ok(URL_SAFE_NO_PAD.encode(out))
}

/// Opens a value [`seal`]ed with the same key and purpose; `None` for anything else.
pub fn open(key: &CookieKey, purpose: &str, sealed: &str) -> Option<Vec<u8>> {
    if sealed.len() > MAX_SEALED {
        return None;
    }
    let mut raw = URL_SAFE_NO_PAD.decode(sealed).ok()?;
    if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
        return None;
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&raw[..NONCE_LEN]);
    let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key.0).ok()?);
    let plain = aead
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(purpose.as_bytes()),
            &mut raw[NONCE_LEN..],
        )
        .ok()?;
    Some(plain.to_vec())
}

/// Random bytes, base64url: state, nonce, PKCE verifier, CSRF token.
pub fn random_token(bytes: usize) -> Result<String, aws_lc_rs::error::Unspecified> {
    let mut b = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut b)?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

/// Compares two secrets without leaking where they differ.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

// === impl Session ===

/// What the session cookie carries. The token is re-validated on every use, so the issuer's
/// rules, key rotation and the token's own expiry keep applying to the browser too.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    /// The access token validated at sign-in (the same checks as kubectl's tokens).
    pub token: String,
    /// Seconds since the epoch.
    pub issued_at: u64,
    /// Seconds since the epoch; the session is over at this instant whatever the token says.
    pub expires_at: u64,
    /// The sign-out form's CSRF token (32 random bytes, base64url).
    pub csrf: String,
}

impl Session {
    /// A session for `token` from `now` until `expires_at`, with a fresh CSRF token.
    pub fn new(
        token: String,
        now: u64,
        expires_at: u64,
    ) -> Result<Self, aws_lc_rs::error::Unspecified> {
        Ok(Self {
            token,
            issued_at: now,
            expires_at,
            csrf: random_token(32)?,
        })
    }

    pub fn seal(&self, key: &CookieKey) -> Result<String, aws_lc_rs::error::Unspecified> {
        // Serialising a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(self).map_err(|_| aws_lc_rs::error::Unspecified)?;
        seal(key, SESSION_PURPOSE, &json)
    }

    /// Opens a sealed session that has not expired at `now`.
    pub fn open(key: &CookieKey, sealed: &str, now: u64) -> Option<Self> {
        let s: Self = serde_json::from_slice(&open(key, SESSION_PURPOSE, sealed)?).ok()?;
        (s.expires_at > now).then_some(s)
    }
}

// === cookies on the wire ===

/// The value of cookie `name` in the request. The first occurrence wins: `__Host-` names cannot
/// be planted by sibling domains or other paths, so there is no shadowing to resolve.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// The sealed session from the request: one cookie, or its chunks `-1` … `-N` reassembled.
pub fn sealed_session(headers: &http::HeaderMap) -> Option<String> {
    if let Some(v) = cookie(headers, SESSION_COOKIE) {
        return Some(v.to_owned());
    }
    let mut whole = String::new();
    for i in 1..=MAX_CHUNKS {
        match cookie(headers, &format!("{SESSION_COOKIE}-{i}")) {
            Some(part) => whole.push_str(part),
            None => break,
        }
    }
    (!whole.is_empty()).then_some(whole)
}

/// `Set-Cookie` values storing `sealed` for `max_age` seconds: one cookie when it fits, else
/// chunks; every name not used this time is deleted so no stale chunk is ever reassembled.
/// `None` when even [`MAX_CHUNKS`] chunks cannot hold it.
pub fn set_session_cookies(sealed: &str, max_age: u64) -> Option<Vec<String>> {
    let mut out = Vec::new();
    if sealed.len() <= MAX_CHUNK {
        out.push(set_cookie(SESSION_COOKIE, sealed, max_age));
        for i in 1..=MAX_CHUNKS {
            out.push(clear_cookie(&format!("{SESSION_COOKIE}-{i}")));
        }
        return Some(out);
    }
    if sealed.len() > MAX_SEALED {
        return None;
    }
    out.push(clear_cookie(SESSION_COOKIE));
    // The sealed value is base64url (ASCII), so byte chunks are character chunks.
    let chunks: Vec<&[u8]> = sealed.as_bytes().chunks(MAX_CHUNK).collect();
    for i in 1..=MAX_CHUNKS {
        let name = format!("{SESSION_COOKIE}-{i}");
        match chunks.get(i - 1) {
            Some(c) => out.push(set_cookie(&name, &String::from_utf8_lossy(c), max_age)),
            None => out.push(clear_cookie(&name)),
        }
    }
    Some(out)
}

/// `Set-Cookie` values deleting the session in every form it may have been stored.
pub fn clear_session_cookies() -> Vec<String> {
    std::iter::once(clear_cookie(SESSION_COOKIE))
        .chain((1..=MAX_CHUNKS).map(|i| clear_cookie(&format!("{SESSION_COOKIE}-{i}"))))
        .collect()
}

/// A `__Host-` cookie: Secure, Path=/, no Domain (the prefix requires all three, so sibling
/// hosts cannot plant or overwrite it); HttpOnly (no script reads it); SameSite=Lax (sent on
/// the IdP's top-level redirect back to `/-/callback`, not on cross-site subrequests or POSTs).
pub fn set_cookie(name: &str, value: &str, max_age: u64) -> String {
    format!("{name}={value}; Max-Age={max_age}; Path=/; Secure; HttpOnly; SameSite=Lax")
}

pub fn clear_cookie(name: &str) -> String {
    set_cookie(name, "", 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> CookieKey {
        CookieKey([b; 32])
    }

    #[test]
    fn seal_open_round_trip() {
        let k = key(7);
        let s = seal(&k, SESSION_PURPOSE, b"hello").unwrap();
        assert_eq!(open(&k, SESSION_PURPOSE, &s).unwrap(), b"hello");
        // A fresh nonce each time: the same plaintext never seals to the same value.
        assert_ne!(s, seal(&k, SESSION_PURPOSE, b"hello").unwrap());
    }

    #[test]
    fn tampered_other_key_other_purpose_refused() {
        let k = key(7);
        let s = seal(&k, SESSION_PURPOSE, b"hello world").unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(&s).unwrap();
        for i in [0, NONCE_LEN, raw.len() - 1] {
            raw[i] ^= 1;
            assert!(open(&k, SESSION_PURPOSE, &URL_SAFE_NO_PAD.encode(&raw)).is_none());
            raw[i] ^= 1;
        }
        assert!(open(&key(8), SESSION_PURPOSE, &s).is_none());
        let login = seal(&k, LOGIN_PURPOSE, b"hello world").unwrap();
        assert!(open(&k, SESSION_PURPOSE, &login).is_none());
        assert!(open(&k, SESSION_PURPOSE, "").is_none());
        assert!(open(&k, SESSION_PURPOSE, "!!!").is_none());
        assert!(open(&k, SESSION_PURPOSE, &s[..20]).is_none());
        assert!(open(&k, SESSION_PURPOSE, &"A".repeat(MAX_SEALED + 4)).is_none());
    }

    #[test]
    fn session_expiry() {
        let k = key(1);
        let s = Session::new("tok".into(), 100, 200).unwrap();
        assert_eq!(s.csrf.len(), 43);
        let sealed = s.seal(&k).unwrap();
        assert_eq!(Session::open(&k, &sealed, 199).unwrap(), s);
        assert!(Session::open(&k, &sealed, 200).is_none());
        assert!(Session::open(&key(2), &sealed, 150).is_none());
    }

    #[test]
    fn csrf_compare() {
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
        assert!(!secrets_equal("abc", "abcd"));
        assert!(!secrets_equal("", "a"));
    }

    fn headers(cookies: &[String]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        // Browsers send `name=value` pairs; strip the attributes of our Set-Cookie lines.
        let line = cookies
            .iter()
            .filter_map(|c| c.split(';').next())
            .filter(|p| !p.ends_with('='))
            .collect::<Vec<_>>()
            .join("; ");
        h.insert(http::header::COOKIE, line.parse().unwrap());
        h
    }

    #[test]
    fn chunks_reassemble() {
        let small = "a".repeat(100);
        let set = set_session_cookies(&small, 60).unwrap();
        assert_eq!(set.len(), 1 + MAX_CHUNKS);
        assert!(set[0].starts_with(&format!("{SESSION_COOKIE}={small};")));
        assert_eq!(sealed_session(&headers(&set)).unwrap(), small);

        let big: String = (0..MAX_CHUNK * 3 + 10)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let set = set_session_cookies(&big, 60).unwrap();
        assert!(set[0].starts_with(&format!("{SESSION_COOKIE}=;")));
        assert!(set.iter().all(|c| c.len() < 4000));
        assert_eq!(sealed_session(&headers(&set)).unwrap(), big);
        assert!(set_session_cookies(&"a".repeat(MAX_SEALED + 1), 60).is_none());
    }

    /// Sealing costs 28 bytes plus base64's third; the JSON around the token ~110 bytes. So a
    /// token up to ~2.7 kB (Entra access tokens without a groups claim: 1.3–2.5 kB; dev and
    /// oidc-provider tokens: under 1 kB) is one cookie, and up to ~11 kB fits in four chunks.
    #[test]
    fn session_sizes() {
        let k = key(1);
        let sealed = |n: usize| {
            Session::new("x".repeat(n), 1_700_000_000, 1_700_003_600)
                .unwrap()
                .seal(&k)
                .unwrap()
        };
        let one = set_session_cookies(&sealed(2700), 60).unwrap();
        assert!(one[0].starts_with(&format!("{SESSION_COOKIE}=")) && !one[0].contains("Max-Age=0"));
        let four = set_session_cookies(&sealed(11_000), 60).unwrap();
        assert_eq!(four.iter().filter(|c| !c.contains("Max-Age=0")).count(), 4);
        assert!(set_session_cookies(&sealed(11_500), 60).is_none());
    }

    #[test]
    fn cookie_attributes() {
        let c = set_cookie(LOGIN_COOKIE, "v", 600);
        for a in [
            "Max-Age=600",
            "Path=/",
            "Secure",
            "HttpOnly",
            "SameSite=Lax",
        ] {
            assert!(c.contains(a), "{c}");
        }
        assert!(!c.contains("Domain"));
    }

    #[test]
    fn cookie_lookup() {
        let mut h = http::HeaderMap::new();
        h.append(http::header::COOKIE, "a=1; b=2".parse().unwrap());
        h.append(http::header::COOKIE, "c=3=4".parse().unwrap());
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), Some("3=4"));
        assert_eq!(cookie(&h, "d"), None);
    }
}
