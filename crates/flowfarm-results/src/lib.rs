//! Where rendered images go: an object store that workers write and the
//! coordinator's GetResult reads. A local folder (the default, for one
//! machine or a shared file system) or an S3-compatible bucket.
//!
//! S3 locations are URLs, `s3://bucket` or `s3://bucket/prefix`; endpoint,
//! region and credentials come from the standard AWS variables
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`; `AWS_ALLOW_HTTP=true` for a
//! plain-HTTP endpoint such as a local MinIO).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
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

/// The results store; cheap to clone.
#[derive(Debug, Clone)]
pub struct ResultStore {
    store: Arc<dyn ObjectStore>,
    /// The folder or URL, for messages.
    location: String,
}

/// A results store that cannot be opened, written or read.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    /// The configured location is not usable.
    #[error("results store `{location}`: {reason}")]
    Location { location: String, reason: String },
    /// An object could not be written or read.
    #[error("results store `{location}`, object `{key}`: {source}")]
    Object { location: String, key: String, source: object_store::Error },
    /// No object under that key.
    #[error("results store `{location}` has no object `{key}`")]
    Missing { location: String, key: String },
}

impl ResultStore {
    /// Opens `url` when given (`s3://bucket[/prefix]`), else the folder `dir`.
    ///
    /// # Errors
    /// [`ResultError::Location`] for a URL scheme other than `s3`, an S3
    /// configuration the AWS variables do not complete, or a folder that
    /// cannot be created.
    pub fn open(url: Option<&str>, dir: &Path) -> Result<Self, ResultError> {
        match url {
            Some(url) => Self::s3(url),
            None => Self::local(dir),
        }
    }

    /// A store writing below `dir` (created if missing).
    ///
    /// # Errors
    /// [`ResultError::Location`] if the folder cannot be created or opened.
    pub fn local(dir: &Path) -> Result<Self, ResultError> {
        let location = dir.display().to_string();
        let bad = |reason: String| ResultError::Location { location: location.clone(), reason };
        std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create the folder: {e}")))?;
        let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| bad(e.to_string()))?;
        Ok(ResultStore { store: Arc::new(store), location })
    }

    /// A store in an S3-compatible bucket, `s3://bucket` or `s3://bucket/prefix`.
    ///
    /// # Errors
    /// [`ResultError::Location`] naming what is wrong with the URL or the
    /// AWS settings.
    pub fn s3(url: &str) -> Result<Self, ResultError> {
        let bad = |reason: String| ResultError::Location { location: url.to_owned(), reason };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("expected an `s3://bucket[/prefix]` URL (or leave it out for a local folder)".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("the URL names no bucket".into()));
        }
        let s3 = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| bad(format!("{e} (set AWS_ENDPOINT_URL, AWS_REGION and credentials)")))?;
        let prefix = prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) };
        Ok(ResultStore { store, location: url.to_owned() })
    }

    /// The folder or URL this store was opened on.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The key of the image one attempt of a job rendered on one worker.
    ///
    /// Invariant: two renders that may both be uploaded never share a key.
    /// A worker that lost its lease (paused, cut off) and uploads late writes
    /// under its own attempt's key, never over the bytes the store accepted
    /// from the attempt that succeeded; the completion records which key that is.
    pub fn key_for(batch_id: &str, job_id: Uuid, attempt: u32, worker_id: &str) -> String {
        format!("{batch_id}/{job_id}/a{attempt}-{worker_id}.png")
    }

    /// Removes the object under `key`; a missing one is not an error.
    ///
    /// # Errors
    /// [`ResultError::Object`] from the store.
    pub async fn delete(&self, key: &str) -> Result<(), ResultError> {
        match self.store.delete(&object_store::path::Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.object(key, e)),
        }
    }

    /// Every object below `prefix` (a folder: `{batch}`), with when it was
    /// last written.
    ///
    /// # Errors
    /// [`ResultError::Object`] from the store.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, std::time::SystemTime)>, ResultError> {
        let mut listing = self.store.list(Some(&object_store::path::Path::from(prefix)));
        let mut out = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.object(prefix, e))?;
            out.push((meta.location.to_string(), meta.last_modified.into()));
        }
        Ok(out)
    }

    /// Writes `bytes` under `key` (atomically: readers see all or nothing).
    ///
    /// # Errors
    /// [`ResultError::Object`] from the store.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<StoredResult, ResultError> {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let size_bytes = bytes.len() as u64;
        self.store.put(&object_store::path::Path::from(key), PutPayload::from(bytes)).await.map_err(|e| self.object(key, e))?;
        Ok(StoredResult { key: key.to_owned(), sha256, size_bytes })
    }

    /// The object under `key`: its size and its bytes as a stream of chunks.
    ///
    /// # Errors
    /// [`ResultError::Missing`] when there is no such object;
    /// [`ResultError::Object`] when the store cannot be read. Errors while
    /// streaming come as stream items.
    pub async fn get(&self, key: &str) -> Result<(u64, BoxStream<'static, Result<Bytes, ResultError>>), ResultError> {
        let got = match self.store.get(&object_store::path::Path::from(key)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ResultError::Missing { location: self.location.clone(), key: key.to_owned() })
            }
            Err(e) => return Err(self.object(key, e)),
        };
        let size = got.meta.size;
        let (location, key) = (self.location.clone(), key.to_owned());
        let stream = got
            .into_stream()
            .map(move |chunk| chunk.map_err(|source| ResultError::Object { location: location.clone(), key: key.clone(), source }))
            .boxed();
        Ok((size, stream))
    }

    fn object(&self, key: &str, source: object_store::Error) -> ResultError {
        ResultError::Object { location: self.location.clone(), key: key.to_owned(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_store_round_trips_and_names_missing_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultStore::open(None, &dir.path().join("results")).unwrap();
        let stored = store.put("b/j.png", b"png bytes".to_vec()).await.unwrap();
        assert_eq!(stored.size_bytes, 9);
        assert_eq!(stored.sha256, hex::encode(Sha256::digest(b"png bytes")));
        assert_eq!(std::fs::read(dir.path().join("results/b/j.png")).unwrap(), b"png bytes");
        let (size, stream) = store.get("b/j.png").await.unwrap();
        let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
        assert_eq!((size, chunks.concat()), (9, b"png bytes".to_vec()));
        let missing = store.get("b/other.png").await.err().unwrap();
        assert!(matches!(missing, ResultError::Missing { .. }), "{missing}");
        store.delete("b/j.png").await.unwrap();
        assert!(!dir.path().join("results/b/j.png").exists());
        store.delete("b/j.png").await.unwrap();
    }

    #[test]
    fn keys_differ_by_attempt_and_worker() {
        let job = Uuid::nil();
        let keys =
            [ResultStore::key_for("b", job, 1, "w1"), ResultStore::key_for("b", job, 2, "w1"), ResultStore::key_for("b", job, 1, "w2")];
        assert_eq!(keys.iter().collect::<std::collections::HashSet<_>>().len(), 3, "{keys:?}");
        assert!(keys.iter().all(|k| k.starts_with(&format!("b/{job}/"))));
    }

    #[test]
    fn bad_locations_say_what_is_expected() {
        let err = ResultStore::s3("gs://bucket").unwrap_err().to_string();
        assert!(err.contains("expected an `s3://bucket[/prefix]` URL"), "{err}");
        let err = ResultStore::s3("s3:///prefix").unwrap_err().to_string();
        assert!(err.contains("names no bucket"), "{err}");
    }
}
