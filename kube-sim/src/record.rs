//! The record of what the simulator received, so tests can assert on exactly what crossed the
//! relay (headers after hygiene, the exact request-target, the identity that reached the cluster).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The identity a request reached the cluster as (after bearer validation and impersonation),
/// the same fields `kubectl auth whoami` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct UserInfo {
    pub username: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub groups: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// One request as the simulator saw it, before it answered.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// The request-target exactly as received (path and query, not decoded).
    pub path_and_query: String,
    pub version: http::Version,
    /// Header names lower-cased, in arrival order; values lossily decoded as UTF-8.
    pub headers: Vec<(String, String)>,
    /// The identity after authentication and impersonation; `None` when rejected.
    pub user: Option<UserInfo>,
}

impl RecordedRequest {
    /// All values of a header (name compared case-insensitively).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of a header, if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).into_iter().next()
    }
}

/// Shared, append-only record of received requests. Cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct Record {
    inner: Arc<Mutex<Vec<RecordedRequest>>>,
}

impl Record {
    pub fn push(&self, req: RecordedRequest) {
        self.lock().push(req);
    }

    /// A snapshot of everything received so far.
    pub fn all(&self) -> Vec<RecordedRequest> {
        self.lock().clone()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Requests whose path starts with `prefix`.
    pub fn matching(&self, prefix: &str) -> Vec<RecordedRequest> {
        self.lock()
            .iter()
            .filter(|r| r.path_and_query.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RecordedRequest>> {
        // A panicking test thread must not hide the record from the others.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
