//! The on-disk token cache of `kube-relay token`.
//!
//! kubectl runs the plugin once per invocation (client-go caches only in memory), so without
//! this every `kubectl get` would be a sign-in. One JSON file per login (the key is a SHA-256
//! of what makes two logins different), next to a lock file of the same name.
//!
//! Invariants:
//! - The directory is created 0700 and every file 0600, with that mode at creation (no window
//!   where a token is readable by others); existing modes are never widened. A directory any
//!   user can write to is refused, and temporary files are created exclusively under random
//!   names, so nothing another user planted is ever read or written through.
//! - An entry is replaced by writing a temporary file in the same directory and renaming it over
//!   the old one, so a reader sees the old entry or the new one, never half of one.
//! - Whoever talks to the identity provider for an entry holds its lock file's exclusive lock
//!   (`File::lock`, an OS advisory lock released when the process dies, so a crash never leaves
//!   it stuck); the others wait and then read the result instead of signing in again.
//! - A file that cannot be parsed is treated as absent (it is overwritten by the next sign-in).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// How often a waiter retries the lock. Short: the holder usually finishes within a second.
const LOCK_POLL: Duration = Duration::from_millis(50);

/// What one entry holds. Secrets: the file is 0600 and its content is never printed.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub access_token: String,
    /// Unix seconds.
    pub expires_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("expires_at", &self.expires_at)
            .field("refresh_token", &self.refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

impl Stored {
    /// Whether the access token is still good for at least `margin`.
    pub(crate) fn usable_for(&self, margin: Duration) -> bool {
        let now = unix_now();
        self.expires_at > now.saturating_add(margin.as_secs())
    }

    pub(crate) fn expiry(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires_at)
    }
}

pub(crate) use crate::clock::unix_now;

/// The cache directory.
#[derive(Debug, Clone)]
pub(crate) struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// Opens `dir`, creating it (and missing parents) with mode 0700. An existing directory
    /// that other users can write to (`/tmp`, a shared `--cache-dir`) is refused: anyone who can
    /// create files in it could plant a token for us to use, or a file for us to write into.
    pub(super) fn open(dir: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the token cache {}", dir.display()))?;
        let mode = fs::metadata(dir)
            .with_context(|| format!("reading the token cache {}", dir.display()))?
            .permissions()
            .mode();
        anyhow::ensure!(
            mode & 0o002 == 0,
            "the token cache {} is writable by every user (mode {:o}); use a private directory (--cache-dir or KUBECACHEDIR) or `chmod 700` it",
            dir.display(),
            mode & 0o7777
        );
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The entry for `key` (hex SHA-256, so it is a safe file name).
    pub(super) fn entry(&self, key: &str) -> Entry {
        Entry {
            path: self.dir.join(format!("{key}.json")),
            lock_path: self.dir.join(format!("{key}.lock")),
        }
    }

    /// Removes every entry and lock file this cache wrote (`--logout --all`); other files in
    /// the directory are left alone. Returns how many entries were removed.
    pub(super) fn clear(&self) -> anyhow::Result<usize> {
        let mut removed = 0;
        let dir = match fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.dir.display())),
        };
        for f in dir.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let ours = name
                .strip_suffix(".json")
                .or_else(|| name.strip_suffix(".lock"))
                .is_some_and(is_key);
            if ours {
                if name.ends_with(".json") {
                    removed += 1;
                }
                remove_if_present(&f.path())?;
            }
        }
        Ok(removed)
    }
}

fn is_key(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn remove_if_present(p: &Path) -> anyhow::Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

/// One login's file and lock.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    path: PathBuf,
    lock_path: PathBuf,
}

/// Holds an entry's exclusive lock until dropped.
#[derive(Debug)]
pub(crate) struct Locked {
    file: File,
}

impl Drop for Locked {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes it explicit.
        let _ = self.file.unlock();
    }
}

impl Entry {
    #[cfg(test)]
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the entry's exclusive lock, waiting at most `wait` for another process to finish.
    /// Polls `try_lock` so the wait is bounded and never blocks the async runtime.
    pub(super) async fn lock(&self, wait: Duration) -> anyhow::Result<Locked> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.lock_path)
            .with_context(|| format!("opening {}", self.lock_path.display()))?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Locked { file }),
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking {}", self.lock_path.display()))
                }
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "another kube-relay token process has been signing in for {}s (lock {}); finish or cancel that sign-in and retry",
                    wait.as_secs(),
                    self.lock_path.display()
                );
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }

    /// The stored entry, if there is a readable one. Needs the lock (the type says so).
    pub(super) fn read(&self, _lock: &Locked) -> Option<Stored> {
        let bytes = fs::read(&self.path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Replaces the entry atomically (temp file + rename), the file created 0600. The temporary
    /// name is random and created exclusively (`O_EXCL`: never an existing file, never through a
    /// symlink), so the token only ever lands in a file this process just made.
    pub(super) fn write(&self, _lock: &Locked, s: &Stored) -> anyhow::Result<()> {
        crate::private_file::replace(&self.path, &serde_json::to_vec(s)?)
    }

    /// Deletes the entry (`--logout`).
    pub(super) fn remove(&self, _lock: &Locked) -> anyhow::Result<bool> {
        let existed = self.path.exists();
        remove_if_present(&self.path)?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn stored(exp: u64) -> Stored {
        Stored {
            access_token: "at".into(),
            expires_at: exp,
            refresh_token: Some("rt".into()),
        }
    }

    #[tokio::test]
    async fn modes_atomic_write_and_clear() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let cache = Cache::open(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let key = "ab".repeat(32);
        let e = cache.entry(&key);
        let lock = e.lock(Duration::from_secs(1)).await.unwrap();
        assert!(e.read(&lock).is_none());
        e.write(&lock, &stored(unix_now() + 3600)).unwrap();
        e.write(&lock, &stored(unix_now() + 7200)).unwrap();
        let meta = fs::metadata(e.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let back = e.read(&lock).unwrap();
        assert!(back.usable_for(Duration::from_secs(3700)));
        assert!(!format!("{back:?}").contains("at\""));
        // Only the entry and its lock remain: no temporary files left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        fs::write(dir.join("unrelated.txt"), "x").unwrap();
        drop(lock);
        assert_eq!(cache.clear().unwrap(), 1);
        assert!(dir.join("unrelated.txt").exists());
        assert!(!e.path().exists());
    }

    #[tokio::test]
    async fn second_locker_waits_then_times_out() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let e = cache.entry(&"cd".repeat(32));
        let held = e.lock(Duration::from_secs(1)).await.unwrap();
        let err = e.lock(Duration::from_millis(200)).await.unwrap_err();
        assert!(
            err.to_string().contains("another kube-relay token"),
            "{err}"
        );
        drop(held);
        e.lock(Duration::from_millis(200)).await.unwrap();
    }

    /// A file or symlink planted where a temporary file might go is never written through:
    /// the token only lands in a file the writer created itself.
    #[tokio::test]
    async fn write_never_goes_through_a_planted_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let cache = Cache::open(&dir).unwrap();
        let key = "12".repeat(32);
        let e = cache.entry(&key);
        let victim = tmp.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        // The name the writer used to derive from the process id.
        let guessed = dir.join(format!(".{key}.json.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &guessed).unwrap();
        let lock = e.lock(Duration::from_secs(1)).await.unwrap();
        e.write(&lock, &stored(unix_now() + 3600)).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(fs::symlink_metadata(e.path())
            .unwrap()
            .file_type()
            .is_file());
        assert_eq!(
            fs::metadata(e.path()).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(e.read(&lock).is_some());
    }

    #[test]
    fn world_writable_cache_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shared");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        let err = Cache::open(&dir).unwrap_err().to_string();
        assert!(err.contains("writable by every user"), "{err}");
        // Group-writable (umask 002 systems) and private directories are fine.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        Cache::open(&dir).unwrap();
    }

    #[test]
    fn corrupt_entries_read_as_absent() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let e = cache.entry(&"ef".repeat(32));
        fs::write(e.path(), "{not json").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let lock = rt.block_on(e.lock(Duration::from_secs(1))).unwrap();
        assert!(e.read(&lock).is_none());
    }
}
