//! Where rendered images go: an object store (a local folder for now, the
//! folder the coordinator serves GetResult from).

use std::path::Path;
use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What a stored result is, as CompleteJob reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResult {
    pub key: String,
    pub sha256: String,
    pub size_bytes: u64,
}

/// The results store.
#[derive(Debug, Clone)]
pub struct ResultStore {
    store: Arc<dyn ObjectStore>,
}

/// A result that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("storing {key}: {source}")]
pub struct ResultError {
    key: String,
    source: object_store::Error,
}

impl ResultStore {
    /// A store writing below `dir` (created if missing).
    ///
    /// # Errors
    /// The folder cannot be created or opened.
    pub fn local(dir: &Path) -> Result<Self, ResultError> {
        let wrap = |source| ResultError { key: dir.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(|e| wrap(object_store::Error::Generic { store: "local", source: Box::new(e) }))?;
        Ok(ResultStore { store: Arc::new(LocalFileSystem::new_with_prefix(dir).map_err(wrap)?) })
    }

    /// The key of a job's image: one per job, whatever the attempt, so a
    /// retried job overwrites a half-finished earlier try instead of adding one.
    pub fn key_for(batch_id: &str, job_id: Uuid) -> String {
        format!("{batch_id}/{job_id}.png")
    }

    /// Writes `bytes` under `key` (atomically: readers see all or nothing).
    ///
    /// # Errors
    /// [`ResultError`] from the store.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<StoredResult, ResultError> {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let size_bytes = bytes.len() as u64;
        let path = object_store::path::Path::from(key);
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|source| ResultError { key: key.to_owned(), source })?;
        Ok(StoredResult { key: key.to_owned(), sha256, size_bytes })
    }
}
