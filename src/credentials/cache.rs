//! Cached upstream tokens: served until shortly before expiry, refreshed in the background
//! (single flight per key), with every fetch bounded in time.

use super::*;

// === token cache ===

/// A token with its lifetime, as fetched.
pub(super) struct Fetched {
    pub(super) value: HeaderValue,
    pub(super) expires_in: Duration,
}

#[derive(Clone)]
pub(super) struct Cached {
    pub(super) value: HeaderValue,
    /// After this the token is not sent any more.
    pub(super) usable_until: Instant,
    /// After this a background refresh starts.
    pub(super) refresh_at: Instant,
}

impl Cached {
    pub(super) fn new(f: Fetched) -> Self {
        let now = Instant::now();
        // Both bounds shrink with short lifetimes so a short-lived token is still used for
        // most of its life (and the tests can use seconds-long tokens).
        let usable = f
            .expires_in
            .saturating_sub(EXPIRY_MARGIN.min(f.expires_in / 4));
        let lead = REFRESH_LEAD.min(f.expires_in / 2);
        Self {
            value: f.value,
            usable_until: now + usable,
            refresh_at: now + f.expires_in.saturating_sub(lead).min(usable),
        }
    }
}

pub(super) struct Slot {
    pub(super) current: RwLock<Option<Cached>>,
    /// Held by the one fetch in flight for this key (single flight).
    pub(super) fetch: Arc<tokio::sync::Mutex<()>>,
}

/// Tokens by key, each fetched by at most one task at a time.
pub(super) struct TokenCache<K> {
    /// A `std` lock: held only to look up or insert a slot, never across an await.
    pub(super) slots: Mutex<HashMap<K, Arc<Slot>>>,
    pub(super) fetches: AtomicU64,
    pub(super) hits: AtomicU64,
}

impl<K: Hash + Eq + Clone + Send + 'static> TokenCache<K> {
    pub(super) fn new() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            fetches: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    pub(super) fn stats(&self) -> CredentialStats {
        CredentialStats {
            fetches: self.fetches.load(Ordering::Relaxed),
            cache_hits: self.hits.load(Ordering::Relaxed),
        }
    }

    pub(super) fn slot(&self, key: &K) -> Arc<Slot> {
        let mut slots = self.slots.lock();
        if let Some(s) = slots.get(key) {
            return s.clone();
        }
        if slots.len() >= MAX_CACHED_USERS {
            // Drop expired entries first; if the map is still full, start over rather than
            // grow without bound (a refetch costs one exchange per user).
            let now = Instant::now();
            slots.retain(|_, s| {
                s.current
                    .read()
                    .as_ref()
                    .is_some_and(|c| c.usable_until > now)
            });
            if slots.len() >= MAX_CACHED_USERS {
                slots.clear();
            }
        }
        let s = Arc::new(Slot {
            current: RwLock::new(None),
            fetch: Arc::new(tokio::sync::Mutex::new(())),
        });
        slots.insert(key.clone(), s.clone());
        s
    }

    /// The token for `key`: cached when usable (refreshed in the background once it is due),
    /// else fetched by exactly one caller while the others wait for its result.
    pub(super) async fn get<F, Fut>(
        &self,
        key: &K,
        fetch: F,
    ) -> Result<HeaderValue, CredentialError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Fetched, CredentialError>> + Send + 'static,
    {
        let slot = self.slot(key);
        let now = Instant::now();
        if let Some(c) = read_slot(&slot) {
            if now < c.usable_until {
                self.hits.fetch_add(1, Ordering::Relaxed);
                if now >= c.refresh_at {
                    // Refresh in the background; skip if a fetch is already running.
                    if let Ok(guard) = slot.fetch.clone().try_lock_owned() {
                        self.fetches.fetch_add(1, Ordering::Relaxed);
                        let fut = fetch();
                        let slot = slot.clone();
                        tokio::spawn(async move {
                            let _guard = guard;
                            match bounded(fut).await {
                                Ok(f) => store(&slot, f),
                                Err(e) => {
                                    tracing::debug!(error = %e, "background token refresh failed; the cached token stays in use")
                                }
                            }
                        });
                    }
                }
                return Ok(c.value);
            }
        }
        let _guard = tokio::time::timeout(FETCH_TIMEOUT, slot.fetch.lock())
            .await
            .map_err(|_| {
                CredentialError::Unavailable("timed out waiting for a token fetch".into())
            })?;
        // Whoever held the lock may have stored a token meanwhile.
        if let Some(c) = read_slot(&slot) {
            if Instant::now() < c.usable_until {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(c.value);
            }
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let fetched = bounded(fetch()).await?;
        let value = fetched.value.clone();
        store(&slot, fetched);
        Ok(value)
    }
}

pub(super) fn read_slot(slot: &Slot) -> Option<Cached> {
    slot.current.read().clone()
}

pub(super) fn store(slot: &Slot, f: Fetched) {
    *slot.current.write() = Some(Cached::new(f));
}

pub(super) async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, CredentialError>>,
) -> Result<T, CredentialError> {
    tokio::time::timeout(FETCH_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| {
            Err(CredentialError::Unavailable(format!(
                "no answer from the token endpoint within {}s",
                FETCH_TIMEOUT.as_secs()
            )))
        })
}
