//! The simulated pods' filesystems (what `kubectl cp` reads and writes).

use super::*;

// === PodFiles: the pods' filesystems ===

/// An in-memory filesystem per (namespace, pod), shared by every session of one server, so
/// `kubectl cp` into a pod and back out returns the same bytes. Cheap to clone.
#[derive(Clone, Default)]
pub struct PodFiles {
    pub(super) inner: Arc<Mutex<HashMap<(String, String), PodFs>>>,
}

impl PodFiles {
    /// A file's contents, if `path` (absolute, or relative to `/`) is a regular file.
    pub fn read_file(&self, namespace: &str, pod: &str, path: &str) -> Option<Vec<u8>> {
        self.with(namespace, pod, |fs| match fs.nodes.get(&normalize(path)) {
            Some(Node::File { data, .. }) => Some(data.to_vec()),
            _ => None,
        })
    }

    /// Creates or replaces a file, creating parent directories as needed.
    pub fn write_file(&self, namespace: &str, pod: &str, path: &str, data: &[u8]) {
        self.with(namespace, pod, |fs| {
            fs.write(&normalize(path), Bytes::copy_from_slice(data), 0o644)
        });
    }

    /// Whether `path` is a directory in the pod.
    pub fn is_dir(&self, namespace: &str, pod: &str, path: &str) -> bool {
        self.with(namespace, pod, |fs| fs.is_dir(&normalize(path)))
    }

    pub(super) fn with<R>(&self, namespace: &str, pod: &str, f: impl FnOnce(&mut PodFs) -> R) -> R {
        let mut map = self.lock();
        let fs = map
            .entry((namespace.to_owned(), pod.to_owned()))
            .or_insert_with(|| PodFs::new(pod));
        f(fs)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), PodFs>> {
        // Short, non-async critical sections; a panicked holder must not wedge the others.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone, Debug)]
pub(super) enum Node {
    Dir { mtime: u64 },
    File { data: Bytes, mode: u32, mtime: u64 },
}

/// Absolute normalised paths ("/", "/tmp/a") to nodes; parents always exist.
pub(super) struct PodFs {
    pub(super) nodes: BTreeMap<String, Node>,
}

impl PodFs {
    pub(super) fn new(pod: &str) -> Self {
        let mut fs = Self {
            nodes: BTreeMap::new(),
        };
        for dir in [
            "/", "/bin", "/dev", "/etc", "/home", "/root", "/tmp", "/usr", "/usr/bin", "/var",
        ] {
            fs.nodes.insert(dir.to_owned(), Node::Dir { mtime: now() });
        }
        fs.write("/etc/hostname", Bytes::from(format!("{pod}\n")), 0o644);
        fs
    }

    pub(super) fn is_dir(&self, path: &str) -> bool {
        matches!(self.nodes.get(path), Some(Node::Dir { .. }))
    }

    pub(super) fn exists(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
    }

    /// `mkdir -p`; fails if a file is in the way.
    pub(super) fn mkdir_all(&mut self, path: &str) -> Result<(), String> {
        let mut current = String::from("/");
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if current != "/" {
                current.push('/');
            }
            current.push_str(part);
            match self.nodes.get(&current) {
                Some(Node::Dir { .. }) => {}
                Some(Node::File { .. }) => return Err(format!("{current}: Not a directory")),
                None => {
                    self.nodes
                        .insert(current.clone(), Node::Dir { mtime: now() });
                }
            }
        }
        Ok(())
    }

    pub(super) fn write(&mut self, path: &str, data: Bytes, mode: u32) {
        let parent = parent_of(path);
        // A file in the way of a parent is replaced by a directory, like `tar -x` recreating it.
        if self.mkdir_all(&parent).is_err() {
            let mut current = String::new();
            for part in parent.split('/').filter(|p| !p.is_empty()) {
                current.push('/');
                current.push_str(part);
                if !self.is_dir(&current) {
                    self.nodes
                        .insert(current.clone(), Node::Dir { mtime: now() });
                }
            }
        }
        self.nodes.insert(
            path.to_owned(),
            Node::File {
                data,
                mode,
                mtime: now(),
            },
        );
    }

    /// Direct children of a directory, by name.
    pub(super) fn children(&self, dir: &str) -> Vec<String> {
        let prefix = if dir == "/" {
            "/".to_owned()
        } else {
            format!("{dir}/")
        };
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, _)| {
                let rest = &k[prefix.len()..];
                (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_owned())
            })
            .collect()
    }

    /// Everything at and under `path`, in tar order (parents before children).
    pub(super) fn walk(&self, path: &str) -> Vec<(String, Node)> {
        let mut out = Vec::new();
        let Some(node) = self.nodes.get(path) else {
            return out;
        };
        out.push((path.to_owned(), node.clone()));
        if matches!(node, Node::Dir { .. }) {
            for child in self.children(path) {
                let child_path = if path == "/" {
                    format!("/{child}")
                } else {
                    format!("{path}/{child}")
                };
                out.extend(self.walk(&child_path));
            }
        }
        out
    }
}

pub(super) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Resolves `path` against `/` and removes `.`, `..` and repeated slashes.
pub(super) fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

pub(super) fn join_path(dir: &str, rel: &str) -> String {
    if rel.starts_with('/') {
        normalize(rel)
    } else {
        normalize(&format!("{dir}/{rel}"))
    }
}

pub(super) fn parent_of(path: &str) -> String {
    match path.rfind('/') {
        Some(0) | None => "/".to_owned(),
        Some(i) => path[..i].to_owned(),
    }
}
