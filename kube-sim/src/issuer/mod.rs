//! The dev OIDC issuer: signing keys, token minting, and a tiny discovery + JWKS server.
//!
//! Used by `kube-relay dev` (to mint the dev users' tokens), by the relay's tests (valid, expired,
//! wrong-audience, unknown-kid and wrong-alg tokens) and by key-rotation / issuer-outage tests.
//!
//! Shape:
//! - [`DevIssuer`] is a cheap clone-able handle (an `Arc` inside) holding every key the issuer has
//!   ever had. The newest key signs; any key not [retired](DevIssuer::retire) is published in the
//!   JWKS. Because the server holds a clone of the same handle, a [`rotate`](DevIssuer::rotate)
//!   or `retire` in a test is visible on the very next JWKS fetch, which is what rotation tests
//!   need (Entra publishes a new key before it signs with it, and keeps the old one published for
//!   a while; tests can replay both orders).
//! - `kid` is the RFC 7638 JWK thumbprint (SHA-256, base64url): stable for a key, so a key saved
//!   with [`signing_key_pem`](DevIssuer::signing_key_pem) and reloaded with
//!   [`from_pkcs8_pem`](DevIssuer::from_pkcs8_pem) keeps its `kid` across processes.
//! - [`serve`] answers `GET <issuer path>/.well-known/openid-configuration` and
//!   `GET <issuer path>/keys` over HTTPS (or plain HTTP), counts fetches, and can be told to fail
//!   (500 for everything) for outage tests. [`serve_oauth`] adds the authorization server of
//!   [`crate::issuer::oauth`] (sign-in pages, token and device endpoints) and advertises it in discovery.
//!
//! Invariants:
//! - Private keys never leave this module except through `signing_key_pem` (dev CLI use).
//! - The JWKS only ever contains public parameters.
//! - Nothing here panics on network input: the server routes on method and path, and only the
//!   authorization server's endpoints read bodies (bounded).

pub mod oauth;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair as _, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse, RSAKeyParameters, RSAKeyType,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Lifetime given to minted tokens that carry no `exp` of their own.
const DEFAULT_TOKEN_LIFETIME_SECS: u64 = 3600;

/// The signature algorithms the dev issuer can sign with (the two a relay issuer allowlist
/// accepts: RS256 is what Entra uses, ES256 what many other OIDC providers use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyAlg {
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// RSASSA-PKCS1-v1_5 (2048-bit key) with SHA-256.
    Rs256,
}

impl KeyAlg {
    /// The JWS `alg` for keys of this kind.
    pub fn algorithm(self) -> Algorithm {
        match self {
            KeyAlg::Es256 => Algorithm::ES256,
            KeyAlg::Rs256 => Algorithm::RS256,
        }
    }

    fn rcgen_alg(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlg::Es256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlg::Rs256 => &rcgen::PKCS_RSA_SHA256,
        }
    }

    fn jwk_alg(self) -> KeyAlgorithm {
        match self {
            KeyAlg::Es256 => KeyAlgorithm::ES256,
            KeyAlg::Rs256 => KeyAlgorithm::RS256,
        }
    }
}

/// An issuer with one or more signing keys; the newest is used to sign. Clone-able handle (Arc
/// inside) so a running server sees rotations.
#[derive(Clone)]
pub struct DevIssuer {
    inner: Arc<Inner>,
}

struct Inner {
    issuer_url: String,
    /// Oldest first; the last entry is the signer. A `std` lock is fine: it is never held across
    /// an await and every critical section is a few field reads or one signature.
    keys: RwLock<Vec<IssuerKey>>,
}

/// One key the issuer has had.
struct IssuerKey {
    kid: String,
    alg: KeyAlg,
    /// PKCS#8 PEM, kept so a dev CLI can save the key and mint with it later.
    pkcs8_pem: String,
    encoding: EncodingKey,
    /// The public JWK (with `kid`, `use`, `alg`), exactly as published.
    jwk: Jwk,
    /// False once retired: still known (and still the signer if newest) but no longer in the JWKS.
    published: bool,
}

// === impl DevIssuer ===

impl DevIssuer {
    /// Creates an issuer with one freshly generated key; `kid` is the key's RFC 7638 thumbprint.
    pub fn generate(issuer_url: &str, alg: KeyAlg) -> anyhow::Result<Self> {
        Ok(Self::with_key(issuer_url, IssuerKey::generate(alg)?))
    }

    /// Creates an issuer whose one key is the given PKCS#8 PEM private key (as written by
    /// [`signing_key_pem`](Self::signing_key_pem)), so a CLI can mint with a key saved to disk.
    /// Fails if the PEM is not PKCS#8 or the key does not fit `alg`.
    pub fn from_pkcs8_pem(issuer_url: &str, alg: KeyAlg, pem: &str) -> anyhow::Result<Self> {
        Ok(Self::with_key(
            issuer_url,
            IssuerKey::from_pkcs8_pem(alg, pem)?,
        ))
    }

    fn with_key(issuer_url: &str, key: IssuerKey) -> Self {
        Self {
            inner: Arc::new(Inner {
                issuer_url: issuer_url.to_owned(),
                keys: RwLock::new(vec![key]),
            }),
        }
    }

    /// PKCS#8 PEM of the current signing key.
    pub fn signing_key_pem(&self) -> String {
        self.with_signer(|key| key.pkcs8_pem.clone())
    }

    /// The issuer URL, exactly as given (it is the `iss` of minted tokens and of discovery).
    pub fn issuer_url(&self) -> String {
        self.inner.issuer_url.clone()
    }

    /// The current signing key's `kid`.
    pub fn kid(&self) -> String {
        self.with_signer(|key| key.kid.clone())
    }

    /// All published keys (public parameters only), oldest first.
    pub fn jwks(&self) -> JwkSet {
        let keys = self.read_keys();
        JwkSet {
            keys: keys
                .iter()
                .filter(|key| key.published)
                .map(|key| key.jwk.clone())
                .collect(),
        }
    }

    /// Adds a new key, makes it the signer and returns its `kid`. Older keys stay published (so
    /// tokens they signed stay valid) until [`retire`](Self::retire)d.
    pub fn rotate(&self, alg: KeyAlg) -> anyhow::Result<String> {
        // Generate outside the lock: RSA key generation takes a while.
        let key = IssuerKey::generate(alg)?;
        let kid = key.kid.clone();
        let mut keys = self.write_keys();
        // Re-adding a retired key (same thumbprint) is practically impossible for fresh keys, but
        // keep the list free of duplicate kids anyway so `find(kid)` stays unambiguous.
        keys.retain(|existing| existing.kid != kid);
        keys.push(key);
        Ok(kid)
    }

    /// Removes a key from the JWKS. Unknown kids are ignored. Retiring the current signer does not
    /// change the signer: tokens minted afterwards carry a `kid` the JWKS no longer lists, which
    /// is how tests model "signed with a key the issuer has withdrawn".
    pub fn retire(&self, kid: &str) {
        for key in self.write_keys().iter_mut().filter(|key| key.kid == kid) {
            key.published = false;
        }
    }

    /// Signs `claims` with the current key (header: `typ` JWT, `alg`, `kid`), filling `iss`
    /// (issuer_url), `iat`, `nbf` (now) and `exp` (now+3600) when absent.
    ///
    /// A claim explicitly set to `null` is removed instead of filled, so tests can mint tokens
    /// lacking `exp`, `nbf` or `iss`.
    ///
    /// # Panics
    /// If `claims` is not a JSON object. Claims come from test or dev code, never from the
    /// network, so that is a programming error; use [`mint_with_header`](Self::mint_with_header)
    /// to get it as an error instead.
    pub fn mint(&self, claims: Value) -> String {
        let header = self.with_signer(|key| {
            let mut header = Header::new(key.alg.algorithm());
            header.kid = Some(key.kid.clone());
            header
        });
        match self.mint_with_header(header, claims) {
            Ok(token) => token,
            // The only failure left is a non-object claim set: the header matches the key, the
            // key was validated when loaded, and serialising a `Header` cannot fail.
            Err(error) => panic!("DevIssuer::mint: {error:#}"),
        }
    }

    /// Like [`mint`](Self::mint), but the header is the caller's, serialised as given (missing
    /// `kid`, unknown `kid`, extra fields, another `typ`, ...). The signature is always made by
    /// the current signing key *in its own algorithm*: a header `alg` that differs from the key's
    /// yields a token whose header lies about its signature, which is what wrong-alg tests want.
    pub fn mint_with_header(&self, header: Header, claims: Value) -> anyhow::Result<String> {
        let Value::Object(mut claims) = claims else {
            anyhow::bail!("JWT claims must be a JSON object");
        };
        fill_registered_claims(&mut claims, &self.inner.issuer_url, unix_now());
        let header_json = serde_json::to_vec(&header).context("serialising the JWT header")?;
        let claims_json = serde_json::to_vec(&claims).context("serialising the JWT claims")?;
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header_json),
            URL_SAFE_NO_PAD.encode(claims_json)
        );
        let signature = self.with_signer(|key| {
            jsonwebtoken::crypto::sign(message.as_bytes(), &key.encoding, key.alg.algorithm())
        })?;
        Ok(format!("{message}.{signature}"))
    }

    /// The OpenID discovery document for this issuer.
    fn discovery_document(&self) -> Value {
        let mut algs: Vec<&str> = Vec::new();
        for key in self.read_keys().iter().filter(|key| key.published) {
            let alg = match key.alg {
                KeyAlg::Es256 => "ES256",
                KeyAlg::Rs256 => "RS256",
            };
            if !algs.contains(&alg) {
                algs.push(alg);
            }
        }
        json!({
            "issuer": self.inner.issuer_url,
            "jwks_uri": self.jwks_uri(),
            "id_token_signing_alg_values_supported": algs,
            "response_types_supported": ["code", "id_token", "code id_token"],
            "subject_types_supported": ["public", "pairwise"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nbf", "oid", "tid", "groups"],
        })
    }

    /// `issuer_url + "/keys"` (without doubling a trailing slash, as in Entra's v1 issuer).
    fn jwks_uri(&self) -> String {
        format!("{}/keys", self.inner.issuer_url.trim_end_matches('/'))
    }

    fn with_signer<T>(&self, f: impl FnOnce(&IssuerKey) -> T) -> T {
        let keys = self.read_keys();
        // Invariant: `keys` is never empty — it starts with one key, `rotate` only adds, and
        // `retire` only flips `published`.
        let signer = keys.last().expect("a DevIssuer always has a key");
        f(signer)
    }

    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, Vec<IssuerKey>> {
        // A panic while holding the lock cannot leave the key list half-updated (each write is a
        // single push, retain or flag flip), so a poisoned lock is still safe to use.
        self.inner
            .keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_keys(&self) -> std::sync::RwLockWriteGuard<'_, Vec<IssuerKey>> {
        self.inner
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for DevIssuer {
    /// Shows the issuer and kids, never key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.read_keys();
        let kids: Vec<(&str, bool)> = keys
            .iter()
            .map(|key| (key.kid.as_str(), key.published))
            .collect();
        f.debug_struct("DevIssuer")
            .field("issuer_url", &self.inner.issuer_url)
            .field("kids_published", &kids)
            .finish()
    }
}

/// Fills `iss`, `iat`, `nbf` and `exp` when absent; removes any claim explicitly set to `null`.
fn fill_registered_claims(claims: &mut Map<String, Value>, issuer_url: &str, now: u64) {
    let defaults = [
        ("iss", Value::from(issuer_url)),
        ("iat", Value::from(now)),
        ("nbf", Value::from(now)),
        ("exp", Value::from(now + DEFAULT_TOKEN_LIFETIME_SECS)),
    ];
    for (name, value) in defaults {
        claims.entry(name).or_insert(value);
    }
    claims.retain(|_, value| !value.is_null());
}

fn unix_now() -> u64 {
    // A clock before 1970 is a broken machine; minting "at 0" then is harmless for a dev issuer.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

// === impl IssuerKey ===

impl IssuerKey {
    fn generate(alg: KeyAlg) -> anyhow::Result<Self> {
        let key_pair = rcgen::KeyPair::generate_for(alg.rcgen_alg())
            .with_context(|| format!("generating a {alg:?} key"))?;
        Self::from_pkcs8_pem(alg, &key_pair.serialize_pem())
    }

    fn from_pkcs8_pem(alg: KeyAlg, pem: &str) -> anyhow::Result<Self> {
        // The label must be PKCS#8's `PRIVATE KEY` (rcgen's own PEM parsing ignores labels). rcgen
        // then checks the key fits exactly this algorithm (a P-256 key given as RS256 is an error
        // here, not a confusing signing failure later) and re-serialises it, so the PEM we keep is
        // canonical.
        let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .context("expected a PEM block labelled PRIVATE KEY (PKCS#8)")?;
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, alg.rcgen_alg())
            .with_context(|| format!("parsing a PKCS#8 {alg:?} private key"))?;
        let pkcs8_pem = key_pair.serialize_pem();
        let pkcs8_der = key_pair.serialized_der();

        let (encoding, params) = match alg {
            KeyAlg::Es256 => {
                let ec = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8_der)
                    .map_err(|error| anyhow::anyhow!("invalid P-256 key: {error}"))?;
                // SEC1 uncompressed point: 0x04 || X (32 bytes) || Y (32 bytes).
                let point = ec.public_key().as_ref();
                let (x, y) = match point {
                    [0x04, coords @ ..] if coords.len() == 64 => coords.split_at(32),
                    _ => anyhow::bail!("unexpected P-256 public key encoding"),
                };
                let params = AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                    key_type: EllipticCurveKeyType::EC,
                    curve: EllipticCurve::P256,
                    x: URL_SAFE_NO_PAD.encode(x),
                    y: URL_SAFE_NO_PAD.encode(y),
                });
                let encoding = EncodingKey::from_ec_pem(pkcs8_pem.as_bytes())
                    .context("loading the P-256 key into jsonwebtoken")?;
                (encoding, params)
            }
            KeyAlg::Rs256 => {
                let rsa = RsaKeyPair::from_pkcs8(pkcs8_der)
                    .map_err(|error| anyhow::anyhow!("invalid RSA key: {error}"))?;
                let public = rsa.public_key();
                // JWK `n`/`e` are unsigned big-endian without leading zero bytes (RFC 7518 §6.3.1).
                let params = AlgorithmParameters::RSA(RSAKeyParameters {
                    key_type: RSAKeyType::RSA,
                    n: URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
                    e: URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
                });
                let encoding = EncodingKey::from_rsa_pem(pkcs8_pem.as_bytes())
                    .context("loading the RSA key into jsonwebtoken")?;
                (encoding, params)
            }
        };

        let kid = rfc7638_thumbprint(&params)?;
        let jwk = Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(alg.jwk_alg()),
                key_id: Some(kid.clone()),
                ..CommonParameters::default()
            },
            algorithm: params,
        };
        Ok(Self {
            kid,
            alg,
            pkcs8_pem,
            encoding,
            jwk,
            published: true,
        })
    }
}

/// RFC 7638 thumbprint: SHA-256 over the required members in lexicographic order, no whitespace.
/// Computed here rather than with `Jwk::thumbprint` so it does not depend on jsonwebtoken's
/// process-wide crypto provider selection.
fn rfc7638_thumbprint(params: &AlgorithmParameters) -> anyhow::Result<String> {
    // `x`, `y`, `n`, `e` are base64url strings, so they need no JSON escaping.
    let canonical = match params {
        AlgorithmParameters::EllipticCurve(ec) => {
            format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                ec.x, ec.y
            )
        }
        AlgorithmParameters::RSA(rsa) => {
            format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, rsa.e, rsa.n)
        }
        _ => anyhow::bail!("thumbprint of an unsupported key type"),
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    Ok(URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

// === serve ===

/// A running issuer server. Dropping it does not stop the server (so `let _handle = serve(..)`
/// patterns cannot stop it by accident); call [`shutdown`](Self::shutdown).
pub struct IssuerHandle {
    pub addr: SocketAddr,
    /// Requests for the discovery document, counted on arrival (also while failing), so outage
    /// tests can check the relay's retry pacing.
    pub discovery_fetches: Arc<AtomicU64>,
    /// Requests for the JWKS, counted on arrival (also while failing).
    pub jwks_fetches: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    cancel: CancellationToken,
}

impl IssuerHandle {
    /// Stops accepting and closes every open connection (in-flight requests are dropped).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// While `true`, every request is answered 500 (an issuer outage).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for IssuerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerHandle")
            .field("addr", &self.addr)
            .field("failing", &self.failing.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

/// What the per-connection service needs; shared by all connections.
struct ServeState {
    issuer: DevIssuer,
    /// Discovery documents by path (one for a plain issuer; v1 and v2 for an Entra tenant).
    discovery: Vec<(String, Value)>,
    /// Paths answered with the JWKS.
    jwks_paths: Vec<String>,
    discovery_fetches: Arc<AtomicU64>,
    jwks_fetches: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    /// The authorization server, when started with [`serve_oauth`].
    oauth: Option<crate::issuer::oauth::OAuthServer>,
}

/// Serves `/.well-known/openid-configuration` (issuer, jwks_uri = issuer_url + "/keys",
/// id_token_signing_alg_values_supported, response_types_supported, subject_types_supported)
/// and the JWKS over HTTPS (or HTTP when tls is None) with hyper 1 / hyper-util.
///
/// Both paths are taken from the issuer URL's path, as OIDC discovery defines them: issuer
/// `https://127.0.0.1:P/tenant/v2.0` is discovered at
/// `/tenant/v2.0/.well-known/openid-configuration` with keys at `/tenant/v2.0/keys`. So the
/// issuer URL should name this listener's address (bind first, then build the issuer).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    issuer: DevIssuer,
) -> anyhow::Result<IssuerHandle> {
    let issuer_uri: http::Uri = issuer
        .issuer_url()
        .parse()
        .with_context(|| format!("issuer URL {:?} is not a URI", issuer.issuer_url()))?;
    let base_path = issuer_uri.path().trim_end_matches('/').to_owned();
    let document = issuer.discovery_document();
    start_server(
        listener,
        tls,
        issuer,
        vec![(
            format!("{base_path}/.well-known/openid-configuration"),
            document,
        )],
        vec![format!("{base_path}/keys")],
        None,
    )
}

/// Like [`serve`], and also an OAuth 2.0 / OIDC authorization server for `oauth`'s users and
/// clients (see [`crate::issuer::oauth`]): `/authorize`, `/token`, `/device/code` and `/device` under
/// the issuer path, listed in the discovery document.
pub async fn serve_oauth(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    issuer: DevIssuer,
    oauth: crate::issuer::oauth::OAuthConfig,
) -> anyhow::Result<IssuerHandle> {
    let issuer_uri: http::Uri = issuer
        .issuer_url()
        .parse()
        .with_context(|| format!("issuer URL {:?} is not a URI", issuer.issuer_url()))?;
    let base_path = issuer_uri.path().trim_end_matches('/').to_owned();
    let server = crate::issuer::oauth::OAuthServer::new(issuer.clone(), oauth, &base_path);
    let mut document = issuer.discovery_document();
    server.extend_discovery(&mut document);
    start_server(
        listener,
        tls,
        issuer,
        vec![(
            format!("{base_path}/.well-known/openid-configuration"),
            document,
        )],
        vec![format!("{base_path}/keys")],
        Some(server),
    )
}

/// Serves an Entra-shaped authority for `tenant` at `authority` (this listener's URL, e.g.
/// `https://127.0.0.1:P`): v1 metadata at `/{tenant}/.well-known/openid-configuration` (issuer
/// `https://sts.windows.net/{tenant}/`, keys at `/{tenant}/discovery/keys`) and v2 metadata at
/// `/{tenant}/v2.0/.well-known/openid-configuration` (issuer `{authority}/{tenant}/v2.0`, keys
/// at `/{tenant}/discovery/v2.0/keys`), both from `issuer`'s key set, as Entra publishes them.
/// Tokens are minted with an explicit `iss` (v1 or v2 form).
pub async fn serve_entra(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    authority: &str,
    tenant: &str,
    issuer: DevIssuer,
) -> anyhow::Result<IssuerHandle> {
    let authority = authority.trim_end_matches('/');
    let doc = |iss: String, jwks: String| {
        serde_json::json!({
            "issuer": iss,
            "jwks_uri": jwks,
            "token_endpoint": format!("{authority}/{tenant}/oauth2/v2.0/token"),
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
            "subject_types_supported": ["pairwise"],
        })
    };
    let discovery = vec![
        (
            format!("/{tenant}/.well-known/openid-configuration"),
            doc(
                format!("https://sts.windows.net/{tenant}/"),
                format!("{authority}/{tenant}/discovery/keys"),
            ),
        ),
        (
            format!("/{tenant}/v2.0/.well-known/openid-configuration"),
            doc(
                format!("{authority}/{tenant}/v2.0"),
                format!("{authority}/{tenant}/discovery/v2.0/keys"),
            ),
        ),
    ];
    let jwks = vec![
        format!("/{tenant}/discovery/keys"),
        format!("/{tenant}/discovery/v2.0/keys"),
    ];
    start_server(listener, tls, issuer, discovery, jwks, None)
}

fn start_server(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    issuer: DevIssuer,
    discovery: Vec<(String, Value)>,
    jwks_paths: Vec<String>,
    oauth: Option<crate::issuer::oauth::OAuthServer>,
) -> anyhow::Result<IssuerHandle> {
    let addr = listener
        .local_addr()
        .context("reading the listener address")?;
    let state = Arc::new(ServeState {
        discovery,
        jwks_paths,
        issuer,
        discovery_fetches: Arc::new(AtomicU64::new(0)),
        jwks_fetches: Arc::new(AtomicU64::new(0)),
        failing: Arc::new(AtomicBool::new(false)),
        oauth,
    });
    let handle = IssuerHandle {
        addr,
        discovery_fetches: state.discovery_fetches.clone(),
        jwks_fetches: state.jwks_fetches.clone(),
        failing: state.failing.clone(),
        cancel: CancellationToken::new(),
    };
    // Cancellation drops the connections, which closes their sockets: shutdown must look like
    // an outage to clients, including ones holding keep-alive connections.
    crate::loopback::spawn_server(
        "dev issuer",
        listener,
        tls,
        handle.cancel.clone(),
        move |request: Request<Incoming>| {
            let state = state.clone();
            async move {
                let oauth = state
                    .oauth
                    .as_ref()
                    .filter(|o| o.serves(request.uri().path()));
                // An outage covers the authorization server too: `respond` answers 500.
                if let Some(oauth) = oauth.filter(|_| !state.failing.load(Ordering::SeqCst)) {
                    return oauth.handle(request).await;
                }
                respond(&state, &request)
            }
        },
    );
    Ok(handle)
}

/// Routes one discovery or JWKS request (and answers everything while failing). Only the method
/// and path are looked at; the body is never read.
fn respond(state: &ServeState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    // Count before the failing check: outage tests assert how often the relay retried.
    let document = if let Some((_, doc)) = state.discovery.iter().find(|(p, _)| p == path) {
        state.discovery_fetches.fetch_add(1, Ordering::SeqCst);
        Some(Document::Discovery(doc))
    } else if state.jwks_paths.iter().any(|p| p == path) {
        state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
        Some(Document::Jwks)
    } else {
        None
    };

    if state.failing.load(Ordering::SeqCst) {
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"error":"server_error","error_description":"dev issuer is failing on purpose"}"#
                .to_vec(),
        );
    }
    let Some(document) = document else {
        return json_response(StatusCode::NOT_FOUND, br#"{"error":"not_found"}"#.to_vec());
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            br#"{"error":"method_not_allowed"}"#.to_vec(),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let body = match document {
        Document::Discovery(doc) => serde_json::to_vec(doc),
        Document::Jwks => serde_json::to_vec(&state.issuer.jwks()),
    };
    match body {
        Ok(body) => json_response(StatusCode::OK, body),
        // Serialising plain JSON values and JWKs cannot realistically fail; answer like an outage.
        Err(_) => json_response(StatusCode::INTERNAL_SERVER_ERROR, b"{}".to_vec()),
    }
}

enum Document<'a> {
    Discovery(&'a Value),
    Jwks,
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    // Tests rotate keys and expect the next fetch to see it; a caching relay should rely on its
    // own refresh policy, not on us.
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    use hyper_util::rt::TokioIo;
    use jsonwebtoken::jwk::ThumbprintHash;
    use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};

    const ISSUER: &str = "https://issuer.test/tenant/v2.0";

    /// Validates `token` the way a relay would: `kid` looked up in the JWKS, alg pinned to the
    /// key's, iss/aud/exp/nbf required.
    fn validate(jwks: &JwkSet, token: &str, aud: &str) -> jsonwebtoken::errors::Result<Value> {
        let header = decode_header(token)?;
        let kid = header
            .kid
            .ok_or(jsonwebtoken::errors::ErrorKind::InvalidToken)?;
        let jwk = jwks
            .find(&kid)
            .ok_or(jsonwebtoken::errors::ErrorKind::InvalidToken)?;
        let alg = match jwk.common.key_algorithm {
            Some(KeyAlgorithm::ES256) => Algorithm::ES256,
            Some(KeyAlgorithm::RS256) => Algorithm::RS256,
            _ => return Err(jsonwebtoken::errors::ErrorKind::InvalidAlgorithm.into()),
        };
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[aud]);
        validation.set_required_spec_claims(&["iss", "aud", "exp", "nbf"]);
        validation.validate_nbf = true;
        Ok(decode::<Value>(token, &DecodingKey::from_jwk(jwk)?, &validation)?.claims)
    }

    #[test]
    fn mints_tokens_that_validate_against_the_jwks_for_both_algs() {
        for alg in [KeyAlg::Es256, KeyAlg::Rs256] {
            let issuer = DevIssuer::generate(ISSUER, alg).unwrap();
            let token = issuer.mint(json!({"aud": "api://kube-relay", "sub": "alice"}));
            let header = decode_header(&token).unwrap();
            assert_eq!(header.alg, alg.algorithm());
            assert_eq!(header.kid.as_deref(), Some(issuer.kid().as_str()));
            assert_eq!(header.typ.as_deref(), Some("JWT"));

            let claims = validate(&issuer.jwks(), &token, "api://kube-relay").unwrap();
            assert_eq!(claims["iss"], ISSUER);
            assert_eq!(claims["sub"], "alice");
            let iat = claims["iat"].as_u64().unwrap();
            assert_eq!(claims["nbf"].as_u64(), Some(iat));
            assert_eq!(claims["exp"].as_u64(), Some(iat + 3600));

            assert!(validate(&issuer.jwks(), &token, "someone-else").is_err());
        }
    }

    #[test]
    fn jwks_has_public_parameters_and_kid_is_the_rfc7638_thumbprint() {
        for alg in [KeyAlg::Es256, KeyAlg::Rs256] {
            let issuer = DevIssuer::generate(ISSUER, alg).unwrap();
            let jwks = issuer.jwks();
            assert_eq!(jwks.keys.len(), 1);
            let jwk = &jwks.keys[0];
            // Cross-check our thumbprint with jsonwebtoken's independent implementation.
            assert_eq!(
                jwk.thumbprint(ThumbprintHash::SHA256).unwrap(),
                issuer.kid()
            );

            let json = serde_json::to_value(&jwks).unwrap();
            let key = &json["keys"][0];
            assert_eq!(key["use"], "sig");
            assert_eq!(key["kid"], issuer.kid().as_str());
            match alg {
                KeyAlg::Es256 => {
                    assert_eq!(key["kty"], "EC");
                    assert_eq!(key["crv"], "P-256");
                    assert_eq!(key["alg"], "ES256");
                    for coord in ["x", "y"] {
                        let bytes = URL_SAFE_NO_PAD
                            .decode(key[coord].as_str().unwrap())
                            .unwrap();
                        assert_eq!(bytes.len(), 32);
                    }
                }
                KeyAlg::Rs256 => {
                    assert_eq!(key["kty"], "RSA");
                    assert_eq!(key["alg"], "RS256");
                    assert_eq!(key["e"], "AQAB");
                    let n = URL_SAFE_NO_PAD.decode(key["n"].as_str().unwrap()).unwrap();
                    assert_eq!(n.len(), 256, "2048-bit modulus without a leading zero");
                    assert_ne!(n[0], 0);
                }
            }
            // Public only: no private members anywhere.
            for private in ["d", "p", "q", "dp", "dq", "qi"] {
                assert!(key.get(private).is_none(), "{private} leaked");
            }
        }
    }

    #[test]
    fn a_saved_key_reloads_with_the_same_kid_and_signs_compatible_tokens() {
        for alg in [KeyAlg::Es256, KeyAlg::Rs256] {
            let original = DevIssuer::generate(ISSUER, alg).unwrap();
            let pem = original.signing_key_pem();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
            let reloaded = DevIssuer::from_pkcs8_pem(ISSUER, alg, &pem).unwrap();
            assert_eq!(reloaded.kid(), original.kid());
            assert_eq!(reloaded.jwks(), original.jwks());
            let token = reloaded.mint(json!({"aud": "a"}));
            validate(&original.jwks(), &token, "a").unwrap();
        }
    }

    #[test]
    fn from_pkcs8_pem_rejects_garbage_and_mismatched_algorithms() {
        let ec_pem = DevIssuer::generate(ISSUER, KeyAlg::Es256)
            .unwrap()
            .signing_key_pem();
        assert!(DevIssuer::from_pkcs8_pem(ISSUER, KeyAlg::Rs256, &ec_pem).is_err());
        assert!(DevIssuer::from_pkcs8_pem(ISSUER, KeyAlg::Es256, "not a pem").is_err());
        let relabelled = ec_pem.replace("PRIVATE KEY", "CERTIFICATE");
        assert!(DevIssuer::from_pkcs8_pem(ISSUER, KeyAlg::Es256, &relabelled).is_err());
        let mut lines: Vec<&str> = ec_pem.lines().collect();
        lines.remove(1);
        let truncated = lines.join("\n");
        assert!(DevIssuer::from_pkcs8_pem(ISSUER, KeyAlg::Es256, &truncated).is_err());
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_until_the_old_key_is_retired() {
        let issuer = DevIssuer::generate(ISSUER, KeyAlg::Rs256).unwrap();
        let old_kid = issuer.kid();
        let old_token = issuer.mint(json!({"aud": "a"}));

        let new_kid = issuer.rotate(KeyAlg::Es256).unwrap();
        assert_ne!(new_kid, old_kid);
        assert_eq!(issuer.kid(), new_kid);
        let new_token = issuer.mint(json!({"aud": "a"}));
        assert_eq!(decode_header(&new_token).unwrap().alg, Algorithm::ES256);

        let jwks = issuer.jwks();
        assert_eq!(jwks.keys.len(), 2);
        validate(&jwks, &old_token, "a").unwrap();
        validate(&jwks, &new_token, "a").unwrap();

        issuer.retire(&old_kid);
        let jwks = issuer.jwks();
        assert_eq!(jwks.keys.len(), 1);
        assert!(validate(&jwks, &old_token, "a").is_err());
        validate(&jwks, &new_token, "a").unwrap();

        // Retiring the signer unpublishes it but keeps signing with it (a withdrawn key).
        issuer.retire(&new_kid);
        assert!(issuer.jwks().keys.is_empty());
        assert_eq!(issuer.kid(), new_kid);
        issuer.retire("no-such-kid");
    }

    #[test]
    fn clones_share_keys() {
        let issuer = DevIssuer::generate(ISSUER, KeyAlg::Es256).unwrap();
        let clone = issuer.clone();
        let kid = issuer.rotate(KeyAlg::Es256).unwrap();
        assert_eq!(clone.kid(), kid);
        assert_eq!(clone.jwks().keys.len(), 2);
    }

    #[test]
    fn explicit_claims_win_and_null_removes_a_claim() {
        let issuer = DevIssuer::generate(ISSUER, KeyAlg::Es256).unwrap();
        let token = issuer.mint(json!({
            "iss": "https://sts.windows.net/tid/",
            "exp": 42,
            "nbf": null,
            "aud": ["a", "b"],
        }));
        let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&token).unwrap();
        assert_eq!(claims["iss"], "https://sts.windows.net/tid/");
        assert_eq!(claims["exp"], 42);
        assert!(claims.get("nbf").is_none());
        assert!(claims["iat"].is_u64());
        // Expired, so a validating relay must refuse it.
        assert!(validate(&issuer.jwks(), &token, "a").is_err());
    }

    #[test]
    fn mint_with_header_keeps_the_callers_header() {
        let issuer = DevIssuer::generate(ISSUER, KeyAlg::Es256).unwrap();
        let jwks = issuer.jwks();

        // Unknown kid: well signed, but the kid is not in the JWKS.
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("unknown".into());
        let token = issuer
            .mint_with_header(header, json!({"aud": "a"}))
            .unwrap();
        assert!(validate(&jwks, &token, "a").is_err());

        // Extra header fields survive; a correct header still validates.
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(issuer.kid());
        header.x5t = Some(issuer.kid());
        header.extras.insert("nonce-ish", "x");
        let token = issuer
            .mint_with_header(header, json!({"aud": "a"}))
            .unwrap();
        let decoded = decode_header(&token).unwrap();
        assert_eq!(decoded.x5t.as_deref(), Some(issuer.kid().as_str()));
        assert_eq!(
            decoded
                .extras
                .get::<String>("nonce-ish")
                .unwrap()
                .as_deref(),
            Some("x")
        );
        validate(&jwks, &token, "a").unwrap();

        // Header claims RS256 but the signature is ES256: must not validate as either.
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(issuer.kid());
        let token = issuer
            .mint_with_header(header, json!({"aud": "a"}))
            .unwrap();
        assert_eq!(decode_header(&token).unwrap().alg, Algorithm::RS256);
        let jwk = jwks.find(&issuer.kid()).unwrap();
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&["a"]);
        assert!(decode::<Value>(&token, &key, &validation).is_err());

        // Missing kid stays missing.
        let token = issuer
            .mint_with_header(Header::new(Algorithm::ES256), json!({}))
            .unwrap();
        assert!(decode_header(&token).unwrap().kid.is_none());

        assert!(issuer
            .mint_with_header(
                Header::new(Algorithm::ES256),
                json!(["not", "an", "object"])
            )
            .is_err());
    }

    #[test]
    fn discovery_document_points_at_the_keys() {
        let issuer = DevIssuer::generate("https://sts.windows.net/tid/", KeyAlg::Rs256).unwrap();
        let doc = issuer.discovery_document();
        assert_eq!(doc["issuer"], "https://sts.windows.net/tid/");
        assert_eq!(doc["jwks_uri"], "https://sts.windows.net/tid/keys");
        assert_eq!(
            doc["id_token_signing_alg_values_supported"],
            json!(["RS256"])
        );
        assert!(doc["response_types_supported"].is_array());
        assert!(doc["subject_types_supported"].is_array());
    }

    // --- server tests ---

    /// One HTTP/1.1 GET over a fresh connection (TLS when `ca_pem` is given); returns status and
    /// body. Hand-rolled because kube-sim has no HTTP client dependency.
    async fn get(
        addr: SocketAddr,
        ca_pem: Option<&str>,
        path: &str,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        use http_body_util::{BodyExt as _, Empty};

        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let request = Request::get(path)
            .header(header::HOST, "127.0.0.1")
            .body(Empty::<Bytes>::new())?;
        let response = match ca_pem {
            Some(ca_pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                    roots.add(cert?)?;
                }
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::aws_lc_rs::default_provider(),
                ))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
                let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
                let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?;
                let tls = connector.connect(name, tcp).await?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(conn);
                sender.send_request(request).await?
            }
            None => {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                sender.send_request(request).await?
            }
        };
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    fn server_tls(ca: &crate::pki::TestCa) -> Arc<rustls::ServerConfig> {
        let leaf = ca.issue(&["127.0.0.1", "localhost"]).unwrap();
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Arc::new(config)
    }

    #[tokio::test]
    async fn serves_discovery_and_jwks_over_https_and_sees_rotations() {
        let ca = crate::pki::TestCa::new("issuer test ca").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issuer_url = format!("https://{addr}/tenant/v2.0");
        let issuer = DevIssuer::generate(&issuer_url, KeyAlg::Es256).unwrap();
        let handle = serve(listener, Some(server_tls(&ca)), issuer.clone())
            .await
            .unwrap();
        let ca_pem = Some(ca.cert_pem());

        let (status, body) = get(
            addr,
            ca_pem,
            "/tenant/v2.0/.well-known/openid-configuration",
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
        let doc: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["issuer"], issuer_url.as_str());
        let jwks_uri = doc["jwks_uri"].as_str().unwrap();
        assert_eq!(jwks_uri, format!("{issuer_url}/keys"));
        let jwks_path = jwks_uri.parse::<http::Uri>().unwrap().path().to_owned();

        let (status, body) = get(addr, ca_pem, &jwks_path).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let served: JwkSet = serde_json::from_slice(&body).unwrap();
        assert_eq!(served, issuer.jwks());

        // A rotation through any clone is visible on the next fetch.
        let old_token = issuer.mint(json!({"aud": "a"}));
        issuer.rotate(KeyAlg::Rs256).unwrap();
        let (_, body) = get(addr, ca_pem, &jwks_path).await.unwrap();
        let served: JwkSet = serde_json::from_slice(&body).unwrap();
        assert_eq!(served.keys.len(), 2);
        assert!(decode_header(&old_token)
            .ok()
            .and_then(|h| served.find(&h.kid?).cloned())
            .is_some());

        let (status, _) = get(addr, ca_pem, "/.well-known/openid-configuration")
            .await
            .unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND, "only under the issuer path");

        assert_eq!(handle.discovery_fetches.load(Ordering::SeqCst), 1);
        assert_eq!(handle.jwks_fetches.load(Ordering::SeqCst), 2);

        handle.shutdown();
        // After shutdown the listener is closed (connect fails) or the connection is dropped.
        let after = tokio::time::timeout(Duration::from_secs(5), async {
            // The accept loop notices cancellation asynchronously; give it a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            get(addr, ca_pem, &jwks_path).await
        })
        .await
        .expect("a shut-down issuer must not hang clients");
        assert!(after.is_err());
    }

    #[tokio::test]
    async fn set_failing_answers_500_and_still_counts() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issuer = DevIssuer::generate(&format!("http://{addr}"), KeyAlg::Es256).unwrap();
        let handle = serve(listener, None, issuer).await.unwrap();

        let (status, _) = get(addr, None, "/keys").await.unwrap();
        assert_eq!(status, StatusCode::OK);

        handle.set_failing(true);
        for path in ["/keys", "/.well-known/openid-configuration", "/anything"] {
            let (status, _) = get(addr, None, path).await.unwrap();
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        }
        assert_eq!(handle.jwks_fetches.load(Ordering::SeqCst), 2);
        assert_eq!(handle.discovery_fetches.load(Ordering::SeqCst), 1);

        handle.set_failing(false);
        let (status, body) = get(addr, None, "/.well-known/openid-configuration")
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        let doc: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["jwks_uri"], format!("http://{addr}/keys"));
        assert_eq!(handle.discovery_fetches.load(Ordering::SeqCst), 2);
        handle.shutdown();
    }
}
