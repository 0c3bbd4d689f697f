//! Client-facing TLS: the relay's serving config, and the one crypto provider of the process.
//!
//! rustls panics at start-up when two crypto providers are linked and none is chosen, so every
//! config in the relay is built with [`provider()`] explicitly (never the process default).

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::ServerConfig;

use crate::config::ServingCert;

/// TLS 1.2 sessions remembered for resumption by session ID.
const SESSION_CACHE_ENTRIES: usize = 16 * 1024;

/// The aws-lc-rs provider, shared by every rustls config the relay builds.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// The serving config: TLS 1.2 and 1.3 only, ALPN h2 then http/1.1 (upgrades arrive on
/// http/1.1, often with no ALPN at all), the configured chain and key (checked to match).
pub fn server_config(cert: &ServingCert) -> anyhow::Result<Arc<ServerConfig>> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(|e| {
            anyhow::anyhow!("tls: the certificate and key do not form a usable pair: {e}")
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Resumption: stateless TLS 1.3 tickets (keys rotate every 6 h, in memory only) instead of
    // rustls's default 256-entry session cache, which forgets a session after 256 newer ones —
    // a fleet of kubectl clients would mostly pay full handshakes. TLS 1.2 session IDs get a
    // larger cache for the same reason.
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| anyhow::anyhow!("tls: cannot create a session ticketer: {e}"))?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    Ok(Arc::new(cfg))
}

/// Installs the process-wide crypto providers explicitly, both on aws-lc-rs: rustls's default
/// (for code that does not pass [`provider`]) and jsonwebtoken's own slot. Two providers in one
/// tree make rustls refuse to pick one at start-up, so this never leaves the choice implicit.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}
