//! The local-directory store: each object is written to a temporary file beside its final path
//! and renamed into place (without replacing anything) once complete and synced.

use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use super::{Piece, StoreError};

/// A directory holding objects as files (object names become relative paths).
#[derive(Clone, Debug)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Creates the directory if needed and checks it is writable.
    pub async fn open(root: PathBuf) -> Result<Self, StoreError> {
        let unavailable =
            |e: std::io::Error| StoreError::Unavailable(format!("{}: {e}", root.display()));
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(unavailable)?;
        let probe = root.clone();
        tokio::task::spawn_blocking(move || tempfile::NamedTempFile::new_in(&probe).map(drop))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .map_err(unavailable)?;
        Ok(Self { root })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
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
        let temp = tokio::task::spawn_blocking(move || tempfile::NamedTempFile::new_in(directory))
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
