//! What the authorization server hands out: codes, device codes and refresh tokens, and the
//! tokens they are exchanged for.

use super::*;

// === grants ===

pub(super) struct Grants {
    pub(super) codes: Bounded<CodeGrant>,
    /// By device code.
    pub(super) devices: Bounded<DeviceGrant>,
    pub(super) refresh: Bounded<RefreshGrant>,
    /// Rotated-out refresh tokens and their family, to detect replay.
    pub(super) retired: Bounded<u64>,
    pub(super) families: u64,
}

pub(super) struct CodeGrant {
    pub(super) client_id: String,
    pub(super) redirect_uri: String,
    pub(super) challenge: Option<String>,
    pub(super) user: String,
    pub(super) scopes: Vec<String>,
    pub(super) nonce: Option<String>,
    /// Authentication contexts the sign-in satisfied (the `claims` request's `acrs`).
    pub(super) acrs: Vec<String>,
    pub(super) expires: Instant,
    /// Kept after use (until evicted) so a replay is recognised and revokes what it produced.
    pub(super) consumed: bool,
    pub(super) family: Option<u64>,
}

pub(super) struct DeviceGrant {
    pub(super) client_id: String,
    /// Normalised: the letters only, upper case.
    pub(super) user_code: String,
    pub(super) scopes: Vec<String>,
    pub(super) acrs: Vec<String>,
    pub(super) expires: Instant,
    pub(super) interval: Duration,
    pub(super) last_poll: Option<Instant>,
    pub(super) status: DeviceStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DeviceStatus {
    Pending,
    Approved(String),
    Denied,
}

pub(super) struct RefreshGrant {
    pub(super) client_id: String,
    pub(super) user: String,
    /// As originally granted; a refresh may narrow the access token's scope, not this.
    pub(super) scopes: Vec<String>,
    /// The sign-in's authentication contexts: refreshed tokens carry them on.
    pub(super) acrs: Vec<String>,
    /// Every refresh token descending from one sign-in shares a family.
    pub(super) family: u64,
    pub(super) expires: Instant,
}

/// What a successful grant issues.
pub(super) struct Issue {
    pub(super) client_id: String,
    pub(super) user: String,
    /// The sign-in's scopes (what a refresh token carries on).
    pub(super) granted: Vec<String>,
    /// This response's scopes.
    pub(super) scopes: Vec<String>,
    pub(super) nonce: Option<String>,
    /// Authentication contexts for the access token's `acrs`.
    pub(super) acrs: Vec<String>,
    pub(super) family: u64,
    pub(super) refresh_token: Option<String>,
}

impl std::fmt::Debug for Issue {
    /// Never prints the refresh token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issue")
            .field("client_id", &self.client_id)
            .field("user", &self.user)
            .field("scopes", &self.scopes)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

impl Grants {
    pub(super) fn new(max: usize) -> Self {
        Self {
            codes: Bounded::new(max),
            devices: Bounded::new(max),
            refresh: Bounded::new(max),
            retired: Bounded::new(max),
            families: 0,
        }
    }

    pub(super) fn next_family(&mut self) -> u64 {
        self.families += 1;
        self.families
    }

    /// Adds the refresh token (when `offline_access` was granted) to an issue.
    pub(super) fn finish(&mut self, mut issue: Issue, now: Instant) -> Result<Issue, OAuthError> {
        if issue.granted.iter().any(|s| s == "offline_access") {
            let rt = random_token().map_err(OAuthError::server)?;
            self.refresh.insert(
                rt.clone(),
                RefreshGrant {
                    client_id: issue.client_id.clone(),
                    user: issue.user.clone(),
                    scopes: issue.granted.clone(),
                    acrs: issue.acrs.clone(),
                    family: issue.family,
                    expires: now + REFRESH_LIFETIME,
                },
            );
            issue.refresh_token = Some(rt);
        }
        Ok(issue)
    }

    pub(super) fn revoke_family(&mut self, family: u64) {
        self.refresh.retain(|g| g.family != family);
    }

    pub(super) fn device_by_user_code(&self, user_code: &str) -> Option<(&str, &DeviceGrant)> {
        self.devices
            .map
            .iter()
            .find(|(_, (_, d))| d.user_code == user_code)
            .map(|(k, (_, d))| (k.as_str(), d))
    }
}

/// A map holding at most `cap` entries: inserting into a full map evicts the oldest insert.
pub(super) struct Bounded<V> {
    pub(super) cap: usize,
    pub(super) seq: u64,
    pub(super) map: HashMap<String, (u64, V)>,
}

impl<V> Bounded<V> {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            cap,
            seq: 0,
            map: HashMap::new(),
        }
    }

    pub(super) fn insert(&mut self, key: String, value: V) {
        if !self.map.contains_key(&key) && self.map.len() >= self.cap {
            // O(n) in a map of at most `cap` (a few hundred) entries; inserts are rare.
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (seq, _))| *seq)
                .map(|(k, _)| k.clone())
            {
                self.map.remove(&oldest);
            }
        }
        self.seq += 1;
        self.map.insert(key, (self.seq, value));
    }

    pub(super) fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.map.get_mut(key).map(|(_, v)| v)
    }

    pub(super) fn remove(&mut self, key: &str) -> Option<V> {
        self.map.remove(key).map(|(_, v)| v)
    }

    pub(super) fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.map.retain(|_, (_, v)| keep(v));
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}
