//! Where recordings are kept: a directory (`kind: file`) or append blobs in an Azure Blob
//! Storage container (`kind: azure_blob`), written through azure_storage_blob over the relay's
//! own HTTP and TLS stack (src/net/azure.rs).
//!
//! Names are flat, `<cluster>_<UTC time>_<session id>.cast`, so they sort by cluster then time,
//! need no directories, and are the same in both stores.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt as _;

use crate::config::RecordingStoreConfig;

/// A store that could not be written or read; the message is safe to show (no secrets).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// One recording in a listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub name: String,
    pub bytes: u64,
}

pub enum RecordingStore {
    Dir(PathBuf),
    Blob(Box<BlobStore>),
}

pub struct BlobStore {
    container: azure_storage_blob::BlobContainerClient,
    /// `<account_url>/<container>`, for messages.
    location: String,
}

/// A recording open for appending.
pub enum Object {
    File(tokio::fs::File),
    Blob(azure_storage_blob::AppendBlobClient),
}

/// A recording's name is what `Recording::open` makes; anything else is refused before it
/// reaches a path or a URL.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 200
        && name.ends_with(".cast")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
}

impl RecordingStore {
    pub fn new(cfg: &RecordingStoreConfig) -> anyhow::Result<Self> {
        match cfg {
            RecordingStoreConfig::Dir(dir) => Ok(Self::Dir(dir.clone())),
            RecordingStoreConfig::AzureBlob(b) => {
                let token = crate::credentials::AzureToken::new(&b.credential)?;
                let transport = crate::net::azure::HyperTransport::for_storage(b.ca.as_deref())?;
                let client_options = azure_core::http::ClientOptions {
                    transport: Some(azure_core::http::Transport::new(Arc::new(transport))),
                    // A few quick retries, then the failure is the session's to handle: the
                    // SDK's default (8 tries over a minute) would hold a required session
                    // open on a store that is gone.
                    retry: azure_core::http::RetryOptions::exponential(
                        azure_core::http::ExponentialRetryOptions {
                            initial_delay: azure_core::time::Duration::milliseconds(200),
                            max_retries: 3,
                            max_total_elapsed: azure_core::time::Duration::seconds(10),
                            max_delay: azure_core::time::Duration::seconds(2),
                        },
                    ),
                    ..Default::default()
                };
                let mut url = b.account_url.clone();
                url.path_segments_mut()
                    .map_err(|()| anyhow::anyhow!("account_url cannot carry a path"))?
                    .pop_if_empty()
                    .push(&b.container);
                let location = url.to_string();
                let container = azure_storage_blob::BlobContainerClient::new(
                    url,
                    Some(token.token_credential()),
                    Some(azure_storage_blob::BlobContainerClientOptions {
                        client_options,
                        ..Default::default()
                    }),
                )
                .map_err(|e| anyhow::anyhow!("blob container client: {e}"))?;
                Ok(Self::Blob(Box::new(BlobStore {
                    container,
                    location,
                })))
            }
        }
    }

    /// Where recordings go, for messages and `doctor`.
    pub fn location(&self) -> String {
        match self {
            Self::Dir(d) => d.display().to_string(),
            Self::Blob(b) => b.location.clone(),
        }
    }

    /// `kube-relay doctor`: can the relay use this store? A directory must take a file (written
    /// and removed again); a container must answer a listing with the relay's identity (a
    /// missing container is fine: the first session creates it). Says what it found.
    pub async fn probe(&self) -> Result<String, StoreError> {
        match self {
            Self::Dir(dir) => {
                private_dir(dir).await?;
                let probe = dir.join(".kube-relay-doctor");
                tokio::fs::write(&probe, b"")
                    .await
                    .map_err(|e| StoreError(format!("{} is not writable: {e}", dir.display())))?;
                let _ = tokio::fs::remove_file(&probe).await;
                let n = self.list().await?.len();
                Ok(format!("{} is writable; {n} recordings", dir.display()))
            }
            Self::Blob(b) => {
                use futures_util::TryStreamExt as _;
                let mut pages = b
                    .container
                    .list_blobs(None)
                    .map_err(|e| b.error("listing recordings", &e))?;
                match pages.try_next().await {
                    Ok(_) => Ok(format!("{} answers with the relay's identity", b.location)),
                    Err(e) if e.http_status() == Some(azure_core::http::StatusCode::NotFound) => {
                        Ok(format!(
                            "{} reachable; the container does not exist yet (the first session creates it)",
                            b.location
                        ))
                    }
                    Err(e) => Err(b.error("listing recordings", &e)),
                }
            }
        }
    }

    /// Creates an empty recording named `name`, failing if it exists.
    pub async fn create(&self, name: &str) -> Result<Object, StoreError> {
        if !valid_name(name) {
            return Err(StoreError(format!("`{name}` is not a recording name")));
        }
        match self {
            Self::Dir(dir) => {
                private_dir(dir).await?;
                let path = dir.join(name);
                let f = tokio::fs::OpenOptions::new()
                    .create_new(true)
                    .append(true)
                    .mode(0o600)
                    .open(&path)
                    .await
                    .map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
                Ok(Object::File(f))
            }
            Self::Blob(b) => {
                let blob = b.container.blob_client(name).append_blob_client();
                let options = azure_storage_blob::models::AppendBlobClientCreateOptions {
                    blob_content_type: Some("application/x-asciicast".into()),
                    ..Default::default()
                }
                .if_not_exists();
                match blob.create(Some(options)).await {
                    Ok(_) => Ok(Object::Blob(blob)),
                    Err(e) if e.http_status() == Some(azure_core::http::StatusCode::NotFound) => {
                        // A new store: make its container once, then the blob.
                        b.ensure_container().await?;
                        let options = azure_storage_blob::models::AppendBlobClientCreateOptions {
                            blob_content_type: Some("application/x-asciicast".into()),
                            ..Default::default()
                        }
                        .if_not_exists();
                        blob.create(Some(options))
                            .await
                            .map_err(|e| b.error("creating the recording", &e))?;
                        Ok(Object::Blob(blob))
                    }
                    Err(e) => Err(b.error("creating the recording", &e)),
                }
            }
        }
    }

    /// Every recording, newest first.
    pub async fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let mut all = match self {
            Self::Dir(dir) => {
                let mut out = Vec::new();
                let mut rd = match tokio::fs::read_dir(dir).await {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(StoreError(format!("{}: {e}", dir.display()))),
                };
                while let Some(entry) = rd
                    .next_entry()
                    .await
                    .map_err(|e| StoreError(format!("{}: {e}", dir.display())))?
                {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if valid_name(&name) {
                        let bytes = entry.metadata().await.map(|m| m.len()).unwrap_or(0);
                        out.push(Listed { name, bytes });
                    }
                }
                out
            }
            Self::Blob(b) => b.list().await?,
        };
        all.sort_by(|a, b| b.name.cmp(&a.name));
        Ok(all)
    }

    /// One recording, streamed (a recording can be larger than the relay should hold).
    pub async fn open_read(
        &self,
        name: &str,
    ) -> Result<Option<crate::body::RelayBody>, StoreError> {
        use futures_util::TryStreamExt as _;
        use http_body_util::BodyExt as _;
        if !valid_name(name) {
            return Ok(None);
        }
        match self {
            Self::Dir(dir) => match tokio::fs::File::open(dir.join(name)).await {
                Ok(f) => {
                    let frames = tokio_util::io::ReaderStream::new(f)
                        .map_ok(hyper::body::Frame::data)
                        .map_err(|e| Box::new(e) as crate::body::BoxError);
                    Ok(Some(http_body_util::StreamBody::new(frames).boxed()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError(format!("{}: {e}", dir.display()))),
            },
            Self::Blob(b) => {
                let blob = b.container.blob_client(name);
                match blob.download(None).await {
                    Ok(r) => {
                        // The SDK's stream is not Sync, which the relay's bodies are: a task
                        // moves it through a small channel (backpressure: four pieces).
                        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
                        let mut body = r.body;
                        tokio::spawn(async move {
                            while let Some(piece) = body.try_next().await.transpose() {
                                let failed = piece.is_err();
                                let piece = piece
                                    .map(hyper::body::Frame::data)
                                    .map_err(|e| Box::new(e) as crate::body::BoxError);
                                // An error ends the body; so does a client that went away.
                                if tx.send(piece).await.is_err() || failed {
                                    return;
                                }
                            }
                        });
                        let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
                        Ok(Some(http_body_util::StreamBody::new(frames).boxed()))
                    }
                    Err(e) if e.http_status() == Some(azure_core::http::StatusCode::NotFound) => {
                        Ok(None)
                    }
                    Err(e) => Err(b.error("reading the recording", &e)),
                }
            }
        }
    }

    /// One recording's bytes, whole (tests and small recordings; playback streams).
    pub async fn read(&self, name: &str) -> Result<Option<Bytes>, StoreError> {
        use http_body_util::BodyExt as _;
        match self.open_read(name).await? {
            None => Ok(None),
            Some(body) => body
                .collect()
                .await
                .map(|b| Some(b.to_bytes()))
                .map_err(|e| StoreError(format!("reading the recording: {e}"))),
        }
    }
}

/// Creates `dir` if needed, readable by the relay's user only: terminal output holds secrets as
/// often as not.
async fn private_dir(dir: &std::path::Path) -> Result<(), StoreError> {
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .await
        .map_err(|e| StoreError(format!("{}: {e}", dir.display())))
}

impl BlobStore {
    async fn ensure_container(&self) -> Result<(), StoreError> {
        match self.container.create(None).await {
            Ok(_) => Ok(()),
            Err(e) if e.http_status() == Some(azure_core::http::StatusCode::Conflict) => Ok(()),
            Err(e) => Err(self.error("creating the container", &e)),
        }
    }

    async fn list(&self) -> Result<Vec<Listed>, StoreError> {
        use futures_util::TryStreamExt as _;
        let mut out = Vec::new();
        let mut items = match self.container.list_blobs(None) {
            Ok(p) => p,
            Err(e) => return Err(self.error("listing recordings", &e)),
        };
        loop {
            match items.try_next().await {
                Ok(Some(item)) => {
                    let name = item.name.clone().unwrap_or_default();
                    if valid_name(&name) {
                        let bytes = item
                            .properties
                            .as_ref()
                            .and_then(|p| p.content_length)
                            .unwrap_or(0);
                        out.push(Listed { name, bytes });
                    }
                }
                Ok(None) => return Ok(out),
                Err(e) if e.http_status() == Some(azure_core::http::StatusCode::NotFound) => {
                    return Ok(out); // no container yet: no recordings yet
                }
                Err(e) => return Err(self.error("listing recordings", &e)),
            }
        }
    }

    /// The store's answer, without request details that could carry a token.
    fn error(&self, doing: &str, e: &azure_core::Error) -> StoreError {
        let status = e
            .http_status()
            .map(|s| format!(" (HTTP {})", u16::from(s)))
            .unwrap_or_default();
        let code = match e.kind() {
            azure_core::error::ErrorKind::HttpResponse {
                error_code: Some(c),
                ..
            } => format!(" {c}"),
            _ => String::new(),
        };
        StoreError(format!("{doing} in {}:{code}{status}", self.location))
    }
}

impl Object {
    /// Appends `lines` (whole asciicast lines) to the recording.
    pub async fn append(&mut self, lines: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Self::File(f) => {
                f.write_all(&lines)
                    .await
                    .map_err(|e| StoreError(format!("writing the recording: {e}")))?;
                f.flush()
                    .await
                    .map_err(|e| StoreError(format!("writing the recording: {e}")))
            }
            Self::Blob(blob) => {
                // Appended blocks are at most 4 MiB in older service versions; the spool's
                // budget keeps each batch well under that.
                let len = lines.len() as u64;
                blob.append_block(azure_core::http::RequestContent::from(lines), len, None)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        let status = e
                            .http_status()
                            .map(|s| format!(" (HTTP {})", u16::from(s)))
                            .unwrap_or_default();
                        StoreError(format!("appending to the recording{status}"))
                    })
            }
        }
    }
}
