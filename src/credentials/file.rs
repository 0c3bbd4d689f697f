//! A token file the relay presents (a projected ServiceAccount token): re-read when it changes.

use super::*;

// === token file ===

/// A token file re-read when its modification time or size changes.
pub(super) struct TokenFile {
    pub(super) path: PathBuf,
    /// A `std` lock: held only for field copies, never across an await.
    pub(super) state: RwLock<FileState>,
}

pub(super) struct FileState {
    pub(super) token: SecretString,
    /// (mtime, len) when last read; `None` until the first stat.
    pub(super) stamp: Option<(SystemTime, u64)>,
    pub(super) checked: Instant,
}

impl TokenFile {
    pub(super) fn new(path: PathBuf, token: String) -> Self {
        // The first call stats the file, so the stamp of the content read at start-up is
        // learned then (a rewrite between start-up and the first request is picked up too).
        let checked = Instant::now()
            .checked_sub(FILE_CHECK_INTERVAL)
            .unwrap_or_else(Instant::now);
        Self {
            path,
            state: RwLock::new(FileState {
                token: SecretString::new(token),
                stamp: None,
                checked,
            }),
        }
    }

    /// The current token: the cached one, unless the check interval has passed and the file
    /// changed. A file that has become unreadable or empty keeps the last good token (logged):
    /// a kubelet rewriting the projected token must not fail requests.
    pub(super) async fn current(&self) -> Result<SecretString, CredentialError> {
        let (token, stamp, due) = {
            let st = self.state.read();
            (
                st.token.clone(),
                st.stamp,
                st.checked.elapsed() >= FILE_CHECK_INTERVAL,
            )
        };
        if !due {
            return Ok(token);
        }
        let new_stamp = match tokio::fs::metadata(&self.path).await {
            Ok(m) => m.modified().ok().map(|t| (t, m.len())),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "token file: cannot stat; keeping the last token");
                None
            }
        };
        let mut fresh = token;
        if new_stamp.is_some() && new_stamp != stamp {
            match tokio::fs::read_to_string(&self.path).await {
                Ok(s) if !s.trim().is_empty() => {
                    fresh = SecretString::new(s.trim().to_owned());
                    tracing::debug!(path = %self.path.display(), "token file: re-read");
                }
                Ok(_) => {
                    tracing::warn!(path = %self.path.display(), "token file: empty; keeping the last token")
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "token file: cannot read; keeping the last token")
                }
            }
        }
        let mut st = self.state.write();
        st.token = fresh.clone();
        if new_stamp.is_some() {
            st.stamp = new_stamp;
        }
        st.checked = Instant::now();
        Ok(fresh)
    }
}
