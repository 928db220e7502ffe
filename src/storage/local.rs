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
    /// Temporary files are left out. Entries that cannot be read as objects (a FIFO, a device,
    /// a name that is not UTF-8, a link that loops or to a directory, an unreadable
    /// subdirectory) are listed with [`Listed::unreadable`] set, so a caller reports them
    /// instead of losing them; only an unreadable root fails the listing.
    pub async fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            let entries = std::fs::read_dir(&root)
                .map_err(|e| StoreError::Unavailable(format!("listing {}: {e}", root.display())))?;
            walk(entries, "", &mut found);
            found.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(found)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }

    /// Opens a file for reading in chunks. The open never blocks: it is non-blocking (a FIFO
    /// opens at once instead of waiting for a writer) and anything but a regular file is then
    /// refused as [`StoreError::Unreadable`].
    pub async fn open_object(&self, name: &str) -> Result<(tokio::fs::File, u64), StoreError> {
        let path = self.root.join(name);
        let owned = name.to_string();
        tokio::task::spawn_blocking(move || open_regular(&path, &owned))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .map(|(file, size)| (tokio::fs::File::from_std(file), size))
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

/// Opens `path` (object `name`) for reading if it is a regular file; see
/// [`LocalStore::open_object`].
fn open_regular(path: &Path, name: &str) -> Result<(std::fs::File, u64), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(|e| open_error(name, &e))?;
    let metadata = file.metadata().map_err(|e| open_error(name, &e))?;
    if !metadata.is_file() {
        return Err(StoreError::Unreadable {
            name: name.to_string(),
            code: "not_regular_file",
            reason: format!("it is a {}", kind_name(metadata.file_type())),
        });
    }
    Ok((file, metadata.len()))
}

/// What an error opening object `name` means: absent, the object's own failure, or the
/// store's.
fn open_error(name: &str, error: &std::io::Error) -> StoreError {
    if error.kind() == std::io::ErrorKind::NotFound {
        return StoreError::NotFound(name.to_string());
    }
    match unreadable_code(error) {
        Some(code) => StoreError::Unreadable {
            name: name.to_string(),
            code,
            reason: error.to_string(),
        },
        None => StoreError::Unavailable(format!("{name}: {error}")),
    }
}

/// The code of an error that belongs to one entry rather than to the whole directory.
fn unreadable_code(error: &std::io::Error) -> Option<&'static str> {
    #[cfg(unix)]
    if error.raw_os_error() == Some(libc::ELOOP) {
        return Some("symlink_loop");
    }
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => Some("permission_denied"),
        std::io::ErrorKind::NotFound => Some("dangling_symlink"),
        _ => None,
    }
}

/// A file type in words, for messages.
fn kind_name(kind: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "FIFO";
        }
        if kind.is_socket() {
            return "socket";
        }
        if kind.is_block_device() || kind.is_char_device() {
            return "device";
        }
    }
    if kind.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// An entry listed so that it is reported: see [`Listed::unreadable`].
fn unreadable(name: String, code: &'static str, reason: String) -> Listed {
    Listed {
        name,
        size: 0,
        unreadable: Some((code, reason)),
    }
}

/// Appends the entries of `entries` (a directory named `prefix` relative to the root) and of
/// its subdirectories to `found`. Links to files are followed, wherever they lead (the link's
/// name is the object's); links to directories are not, as they could loop.
fn walk(entries: std::fs::ReadDir, prefix: &str, found: &mut Vec<Listed>) {
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                let name = prefix.trim_end_matches('/').to_string();
                found.push(unreadable(name, "unreadable_directory", error.to_string()));
                return;
            }
        };
        let file_name = match entry.file_name().into_string() {
            Ok(file_name) => file_name,
            Err(raw) => {
                let name = format!("{prefix}{}", raw.to_string_lossy());
                let reason = "the name is not UTF-8".to_string();
                found.push(unreadable(name, "non_utf8_name", reason));
                continue;
            }
        };
        if file_name.starts_with(PARTIAL_PREFIX) {
            continue;
        }
        let name = format!("{prefix}{file_name}");
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => match std::fs::read_dir(&path) {
                Ok(children) => walk(children, &format!("{name}/"), found),
                Err(error) => {
                    found.push(unreadable(name, "unreadable_directory", error.to_string()))
                }
            },
            Ok(kind) if kind.is_symlink() => match std::fs::metadata(&path) {
                Ok(metadata) if metadata.is_file() => found.push(Listed {
                    name,
                    size: metadata.len(),
                    unreadable: None,
                }),
                Ok(metadata) => {
                    let what = kind_name(metadata.file_type());
                    let reason = format!("a symbolic link to a {what}, which is not followed");
                    found.push(unreadable(name, "not_regular_file", reason));
                }
                Err(error) => {
                    let code = unreadable_code(&error).unwrap_or("unreadable");
                    found.push(unreadable(name, code, error.to_string()));
                }
            },
            Ok(kind) if kind.is_file() => match entry.metadata() {
                Ok(metadata) => found.push(Listed {
                    name,
                    size: metadata.len(),
                    unreadable: None,
                }),
                Err(error) => found.push(unreadable(name, "unreadable", error.to_string())),
            },
            Ok(kind) => {
                let reason = format!("it is a {}", kind_name(kind));
                found.push(unreadable(name, "not_regular_file", reason));
            }
            Err(error) => found.push(unreadable(name, "unreadable", error.to_string())),
        }
    }
}
