//! The local-directory store: each object is written to a temporary file beside its final path
//! and renamed into place (without replacing anything) once complete and synced.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Listed, Piece, StoreError};

/// How temporary files start: hidden, and recognisable as incomplete objects, which listings
/// skip (a process killed mid-write leaves one behind, never a partial object under its name).
pub const PARTIAL_PREFIX: &str = ".partial-";

/// A directory holding objects as files (object names become relative paths).
#[derive(Clone, Debug)]
pub struct LocalStore {
    root: PathBuf,
    timeout: Duration,
}

impl LocalStore {
    /// Creates the directory if needed and checks it is writable; each later call on an
    /// object may take at most `timeout` (a stalled network mount must not hang a request).
    pub async fn open(root: PathBuf, timeout: Duration) -> Result<Self, StoreError> {
        let unavailable =
            |e: std::io::Error| StoreError::Unavailable(format!("{}: {e}", root.display()));
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(unavailable)?;
        let probe = root.clone();
        tokio::task::spawn_blocking(move || partial_file(&probe).map(drop))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .map_err(unavailable)?;
        Ok(Self { root, timeout })
    }

    /// An existing directory, opened for reading only.
    pub async fn existing(root: PathBuf, timeout: Duration) -> Result<Self, StoreError> {
        match tokio::fs::metadata(&root).await {
            Ok(metadata) if metadata.is_dir() => Ok(Self { root, timeout }),
            Ok(_) => Err(StoreError::Unavailable(format!(
                "{} is not a directory",
                root.display()
            ))),
            Err(e) => Err(StoreError::Unavailable(format!("{}: {e}", root.display()))),
        }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How long one call on an object may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Every file below the root, recursively, as `/`-separated relative names in name order.
    /// Temporary files, names that are not UTF-8 and symbolic links to directories (which could
    /// loop) are left out.
    pub async fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            walk(&root, "", &mut found)
                .map_err(|e| StoreError::Unavailable(format!("listing {}: {e}", root.display())))?;
            found.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(found)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }

    /// Opens a file for reading in chunks.
    pub async fn open_object(&self, name: &str) -> Result<(tokio::fs::File, u64), StoreError> {
        let path = self.root.join(name);
        let failed = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound(name.to_string()),
            _ => StoreError::Unavailable(format!("{}: {e}", path.display())),
        };
        let file = tokio::fs::File::open(&path).await.map_err(failed)?;
        let metadata = file.metadata().await.map_err(failed)?;
        if !metadata.is_file() {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok((file, metadata.len()))
    }

    /// Where `other` lies inside this directory, as a `/`-separated prefix, if it does.
    pub fn prefix_of(&self, other: &LocalStore) -> Option<String> {
        let outer = std::fs::canonicalize(&self.root).ok()?;
        let inner = std::fs::canonicalize(&other.root).ok()?;
        let relative = inner.strip_prefix(&outer).ok()?;
        let parts: Option<Vec<&str>> = relative.iter().map(|part| part.to_str()).collect();
        Some(parts?.join("/"))
    }

    /// Receives an object's pieces and commits it on [`Piece::Finish`]; returns its size.
    pub(super) async fn write(
        self,
        name: String,
        mut pieces: mpsc::Receiver<Piece>,
    ) -> Result<u64, StoreError> {
        let target = self.root.join(&name);
        let unavailable =
            |e: std::io::Error| StoreError::Unavailable(format!("{}: {e}", target.display()));
        let directory = target.parent().unwrap_or(&self.root).to_path_buf();
        tokio::fs::create_dir_all(&directory)
            .await
            .map_err(unavailable)?;
        let temp = tokio::task::spawn_blocking(move || partial_file(&directory))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .map_err(unavailable)?;
        let (file, temp_path) = temp.into_parts();
        let mut file = tokio::fs::File::from_std(file);
        let mut size = 0u64;
        // The temporary file is deleted when `temp_path` drops, unless it has been persisted.
        loop {
            match pieces.recv().await {
                Some(Piece::Chunk(chunk)) => {
                    size += chunk.len() as u64;
                    tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                        .await
                        .map_err(unavailable)?;
                }
                Some(Piece::Finish) => break,
                None => return Err(StoreError::Cancelled),
            }
        }
        let mut file = file.into_std().await;
        let committed = tokio::task::spawn_blocking(move || {
            file.flush()?;
            file.sync_all()?;
            temp_path.persist_noclobber(&target).map_err(|e| e.error)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        match committed {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StoreError::Exists(name))
            }
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }
}

/// A new temporary file in `directory`, named so that listings skip it.
fn partial_file(directory: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .tempfile_in(directory)
}

/// Appends the files below `dir` (named `prefix` relative to the root) to `found`.
fn walk(dir: &Path, prefix: &str, found: &mut Vec<Listed>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
            tracing::warn!(path = %entry.path().display(), "skipping a name that is not UTF-8");
            continue;
        };
        if file_name.starts_with(PARTIAL_PREFIX) {
            continue;
        }
        let name = format!("{prefix}{file_name}");
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), &format!("{name}/"), found)?;
        } else if kind.is_symlink() {
            // A link to a file is its target's data; a link to a directory is not followed.
            if let Ok(metadata) = std::fs::metadata(entry.path())
                && metadata.is_file()
            {
                found.push(Listed {
                    name,
                    size: metadata.len(),
                });
            }
        } else if kind.is_file() {
            found.push(Listed {
                name,
                size: entry.metadata()?.len(),
            });
        }
    }
    Ok(())
}
