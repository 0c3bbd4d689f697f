//! `recording` (top level) and `clusters[].recording`: where exec and attach sessions are
//! recorded and who may play them back (docs/architecture.md "Session recording").

use super::*;

/// A cluster's `recording`: whether its exec and attach sessions are recorded.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecordingMode {
    /// Not recorded.
    #[default]
    Off,
    /// Recorded when the store can be written; a session goes on without it otherwise.
    Optional,
    /// No session without its recording: refused when the store cannot be written at the
    /// start, ended when writing fails later.
    Required,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRecording {
    store: FileRecordingStore,
    /// Also record what is typed into sessions (`i` events).
    #[serde(default)]
    stdin: bool,
    /// The most one session's recording may hold: bytes, or with Ki, Mi, Gi or Ti.
    max_session_size: Option<FileSize>,
    #[serde(default)]
    auditors: FileAuditors,
}

/// A size as written: a number of bytes, or text such as `512Mi`.
#[derive(Deserialize)]
#[serde(untagged)]
enum FileSize {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum FileStoreKind {
    AzureBlob,
    File,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRecordingStore {
    kind: FileStoreKind,
    dir: Option<String>,
    account_url: Option<String>,
    container: Option<String>,
    credential: Option<FileStoreCredential>,
    ca_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStoreCredential {
    azure: FileAzure,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileAuditors {
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
}

/// Azure Storage's OAuth scope.
pub const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";

/// Where recordings are kept.
#[derive(Debug)]
pub enum RecordingStoreConfig {
    /// One file per session in this directory.
    Dir(PathBuf),
    /// One append blob per session in a container of a storage account.
    AzureBlob(Box<BlobStoreConfig>),
}

/// `recording.store` with `kind: azure_blob`.
#[derive(Debug)]
pub struct BlobStoreConfig {
    pub account_url: Url,
    pub container: String,
    /// The relay's own Azure identity; its scope is Azure Storage's.
    pub credential: AzureCredentialConfig,
    /// Extra trust anchors for `account_url` (a test emulator on a private CA).
    pub ca: Option<Vec<CertificateDer<'static>>>,
}

/// The top-level `recording` section.
#[derive(Debug)]
pub struct RecordingConfig {
    pub store: RecordingStoreConfig,
    pub stdin: bool,
    /// `recording.max_session_size`: a session's recording stops at this many bytes.
    pub max_session_bytes: u64,
    /// Portal users who may list and play recordings: members of these groups ...
    pub auditor_groups: Vec<String>,
    /// ... or these `issuer/subject` users. Nobody else.
    pub auditor_users: Vec<String>,
}

impl RecordingConfig {
    /// Whether the portal user `user_key` (`issuer/subject`) in `groups` may play recordings.
    pub fn is_auditor(&self, user_key: &str, groups: &[String]) -> bool {
        self.auditor_users.iter().any(|u| u == user_key)
            || groups
                .iter()
                .any(|g| self.auditor_groups.iter().any(|a| a == g))
    }
}

/// `recording.max_session_size` when not set. Ordinary terminal sessions stay far below it; a
/// session streaming a large file (`kubectl cp` is `tar` over exec) can reach it, and without a
/// bound one such session could fill the store the audit log may share.
pub const DEFAULT_MAX_SESSION_BYTES: u64 = 1 << 30;
/// Below this a recording would hardly hold its header and a screenful.
const MIN_SESSION_BYTES: u64 = 64 << 10;

/// Reads `recording.max_session_size`: bytes, or a number with a binary unit (`Ki`, `Mi`, `Gi`,
/// `Ti`), as Kubernetes writes memory quantities.
fn parse_size(v: &FileSize, path: &str, errs: &mut Errors) -> Option<u64> {
    let bytes = match v {
        FileSize::Bytes(n) => Some(*n),
        FileSize::Text(t) => {
            let t = t.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (digits, unit) = t.split_at(split);
            let shift = match unit {
                "" => Some(0),
                "Ki" => Some(10),
                "Mi" => Some(20),
                "Gi" => Some(30),
                "Ti" => Some(40),
                _ => None,
            };
            match (digits.parse::<u64>(), shift) {
                (Ok(n), Some(shift)) => n.checked_mul(1 << shift),
                _ => {
                    errs.add(
                        path,
                        format!("`{t}` is not a size: a number of bytes, or a number with Ki, Mi, Gi or Ti (e.g. 512Mi)"),
                    );
                    return None;
                }
            }
        }
    };
    match bytes {
        Some(n) if n >= MIN_SESSION_BYTES => Some(n),
        Some(_) => {
            errs.add(path, "must be at least 64Ki");
            None
        }
        None => {
            errs.add(path, "is too large");
            None
        }
    }
}

/// An Azure Blob Storage container name: 3-63 lower-case letters, digits and single hyphens.
fn is_container_name(s: &str) -> bool {
    (3..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

pub(super) fn parse_recording(
    root: &Mapping,
    base: &Path,
    issuer_names: &BTreeSet<String>,
    clusters: &[Arc<ClusterConfig>],
    errs: &mut Errors,
) -> Option<RecordingConfig> {
    let file = optional::<FileRecording>(root, "recording", errs).flatten();
    let records: Vec<&str> = clusters
        .iter()
        .filter(|c| c.recording != RecordingMode::Off)
        .map(|c| c.name.as_str())
        .collect();
    let Some(f) = file else {
        if let Some(first) = records.first() {
            errs.add(
                "recording",
                format!(
                    "cluster `{first}` records sessions but no recording store is configured (recording: {{store: {{kind: file, dir: ...}}}} or kind: azure_blob)"
                ),
            );
        }
        return None;
    };
    for (i, u) in f.auditors.users.iter().enumerate() {
        let known = u
            .split_once('/')
            .is_some_and(|(iss, sub)| issuer_names.contains(iss) && !sub.is_empty());
        if !known {
            errs.add(
                format!("recording.auditors.users[{i}]"),
                format!("`{u}` must be issuer-name/subject with a configured issuer"),
            );
        }
    }
    // Read before the store, so that errors in both are reported together.
    let max_session_bytes = match &f.max_session_size {
        Some(v) => parse_size(v, "recording.max_session_size", errs),
        None => Some(DEFAULT_MAX_SESSION_BYTES),
    };
    let s = &f.store;
    let only = |errs: &mut Errors, key: &str, present: bool, kind: &str| {
        if present {
            errs.add(
                format!("recording.store.{key}"),
                format!("not used with kind: {kind}"),
            );
        }
    };
    let store = match s.kind {
        FileStoreKind::File => {
            for (key, present) in [
                ("account_url", s.account_url.is_some()),
                ("container", s.container.is_some()),
                ("credential", s.credential.is_some()),
                ("ca_file", s.ca_file.is_some()),
            ] {
                only(errs, key, present, "file");
            }
            match &s.dir {
                Some(d) if !d.is_empty() => Some(RecordingStoreConfig::Dir(base.join(d))),
                _ => {
                    errs.add(
                        "recording.store.dir",
                        "is required for kind: file (a directory the relay can write)",
                    );
                    None
                }
            }
        }
        FileStoreKind::AzureBlob => {
            only(errs, "dir", s.dir.is_some(), "azure_blob");
            let url = match &s.account_url {
                Some(u) => parse_https_url(u, "recording.store.account_url", errs),
                None => {
                    errs.add(
                        "recording.store.account_url",
                        "is required for kind: azure_blob (https://<account>.blob.core.windows.net)",
                    );
                    None
                }
            };
            let container = match &s.container {
                Some(c) if is_container_name(c) => Some(c.clone()),
                Some(c) => {
                    errs.add(
                        "recording.store.container",
                        format!("`{c}` is not a container name: 3-63 lower-case letters, digits and single hyphens"),
                    );
                    None
                }
                None => {
                    errs.add(
                        "recording.store.container",
                        "is required for kind: azure_blob",
                    );
                    None
                }
            };
            let ca = match &s.ca_file {
                Some(file) => load_certs(base, file, "recording.store.ca_file", errs).map(Some),
                None => Some(None),
            };
            let credential = match &s.credential {
                Some(c) => {
                    let scope_given = c.azure.scope_given();
                    parse_azure(&c.azure, base, "recording.store.credential.azure", errs).map(
                        |mut cred| {
                            if !scope_given {
                                cred.endpoint.scope = STORAGE_SCOPE.to_owned();
                            }
                            cred
                        },
                    )
                }
                None => {
                    errs.add(
                        "recording.store.credential",
                        "kind: azure_blob needs the relay's Azure identity, e.g. {azure: {credential: managed_identity}} with the Storage Blob Data Contributor role on the container",
                    );
                    None
                }
            };
            match (url, container, credential, ca) {
                (Some(account_url), Some(container), Some(credential), Some(ca)) => {
                    Some(RecordingStoreConfig::AzureBlob(Box::new(BlobStoreConfig {
                        account_url,
                        container,
                        credential,
                        ca,
                    })))
                }
                _ => None,
            }
        }
    }?;
    Some(RecordingConfig {
        store,
        stdin: f.stdin,
        max_session_bytes: max_session_bytes?,
        auditor_groups: f.auditors.groups,
        auditor_users: f.auditors.users,
    })
}
