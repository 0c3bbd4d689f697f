//! Issuer keys: each issuer's metadata and JWKS, fetched through the relay's outbound stack,
//! cached, refreshed in the background, and fetched again (single flight, rate limited) for a
//! `kid` not seen before.

use super::*;

pub(super) struct CachedKey {
    pub(super) key: DecodingKey,
    pub(super) alg: Algorithm,
}

pub(super) type KeyMap = HashMap<String, Arc<CachedKey>>;

/// One metadata document and its keys: an OIDC issuer has one, an Entra tenant two (v1, v2).
pub(super) struct KeySource {
    pub(super) issuer: Arc<IssuerConfig>,
    pub(super) name: Arc<str>,
    /// The exact `iss` tokens verified with these keys carry.
    pub(super) iss: String,
    pub(super) discovery_url: Url,
    pub(super) keys: RwLock<Arc<KeyMap>>,
    /// When keys were last fetched successfully.
    pub(super) fetched_at: Mutex<Option<Instant>>,
    /// Serialises fetches (single flight) and remembers when the last unknown-kid fetch began.
    pub(super) refresh: AsyncMutex<Option<Instant>>,
    pub(super) client: crate::net::PooledClient,
}

impl KeySource {
    /// The keys usable now: empty when none were ever loaded or they are too stale.
    pub(super) fn usable_keys(&self) -> Arc<KeyMap> {
        let fresh = self
            .fetched_at
            .lock()
            .is_some_and(|at| at.elapsed() <= self.issuer.keys.max_staleness);
        if fresh {
            self.keys.read().clone()
        } else {
            Arc::new(HashMap::new())
        }
    }

    pub(super) fn has_stale_keys(&self) -> bool {
        !self.keys.read().is_empty()
    }

    /// One fetch for an unknown `kid`, unless another ran within the cooldown. Concurrent
    /// callers wait for the one in flight instead of fetching again.
    pub(super) async fn refresh_for_unknown_kid(&self, metrics: &Metrics) {
        let mut last = self.refresh.lock().await;
        if let Some(at) = *last {
            if at.elapsed() < self.issuer.keys.unknown_kid_cooldown {
                return;
            }
        }
        *last = Some(Instant::now());
        if let Err(e) = self.fetch_locked(metrics).await {
            tracing::warn!(issuer = %self.name, error = %e, "key refresh for an unknown kid failed");
        }
    }

    /// A scheduled fetch (background task), serialised with unknown-kid fetches.
    pub(super) async fn fetch(&self, metrics: &Metrics) -> Result<(), String> {
        let _guard = self.refresh.lock().await;
        self.fetch_locked(metrics).await
    }

    pub(super) async fn fetch_locked(&self, metrics: &Metrics) -> Result<(), String> {
        let r = self.fetch_keys().await;
        metrics
            .jwks_refresh
            .get_or_create(&IssuerResultLabels {
                issuer: self.name.to_string(),
                result: if r.is_ok() { "success" } else { "failure" },
            })
            .inc();
        let map = r?;
        tracing::info!(issuer = %self.name, iss = %self.iss, keys = map.len(), "loaded signing keys");
        *self.keys.write() = Arc::new(map);
        *self.fetched_at.lock() = Some(Instant::now());
        Ok(())
    }

    /// Discovery, then JWKS. A document naming another issuer is refused.
    pub(super) async fn fetch_keys(&self) -> Result<KeyMap, String> {
        let discovery = self.fetch_json(&self.discovery_url).await?;
        let issuer = discovery
            .get("issuer")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if issuer != self.iss {
            return Err(format!(
                "discovery names issuer {issuer:?}, expected {:?}",
                self.iss
            ));
        }
        let jwks_uri = discovery
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or("discovery document has no jwks_uri")?;
        let jwks_url = Url::parse(jwks_uri).map_err(|e| format!("jwks_uri: {e}"))?;
        if jwks_url.scheme() != "https" {
            return Err("jwks_uri must be https".into());
        }
        let jwks: JwkSet = serde_json::from_value(self.fetch_json(&jwks_url).await?)
            .map_err(|e| format!("JWKS: {e}"))?;
        let mut map = KeyMap::new();
        for jwk in &jwks.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                _ => continue,
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                map.insert(kid, Arc::new(CachedKey { key, alg }));
            }
        }
        if map.is_empty() {
            return Err("JWKS holds no usable RS256/ES256 key".into());
        }
        Ok(map)
    }

    pub(super) async fn fetch_json(&self, url: &Url) -> Result<Value, String> {
        crate::net::get_json(
            &self.client,
            url.as_str(),
            MAX_DOCUMENT_BYTES,
            FETCH_TIMEOUT,
        )
        .await
    }
}
