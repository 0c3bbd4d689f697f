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

/// The most recent requests a [`Record`] keeps: enough for any test's questions, and a bound on
/// the memory of a simulator that runs for hours (`kube-relay dev`, the soak).
pub const RECORD_CAPACITY: usize = 4096;

/// Shared record of the most recent [`RECORD_CAPACITY`] received requests. Cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct Record {
    inner: Arc<Mutex<std::collections::VecDeque<RecordedRequest>>>,
}

impl Record {
    pub fn push(&self, req: RecordedRequest) {
        let mut r = self.lock();
        if r.len() == RECORD_CAPACITY {
            r.pop_front();
        }
        r.push_back(req);
    }

    /// A snapshot of what was received (the most recent [`RECORD_CAPACITY`] requests).
    pub fn all(&self) -> Vec<RecordedRequest> {
        self.lock().iter().cloned().collect()
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

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<RecordedRequest>> {
        // A panicking test thread must not hide the record from the others.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
