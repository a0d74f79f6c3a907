//! Content-addressed blob storage and upload staging over Apache OpenDAL.
//!
//! [`BlobStore`] is the registry's whole view of storage: a handful of operations on
//! verified blobs and on staged uploads. OpenDAL types never leave this crate, so the
//! backend (filesystem, memory, S3 and friends) is configuration, and an OpenDAL API
//! change touches this crate only.
//!
//! Architecture invariants:
//! - Keys come only from [`layout`].
//! - A blob key is written only by [`BlobStore::commit_upload`] or [`BlobStore::put_blob`],
//!   each of which publishes the key atomically (rename, multipart completion, or an
//!   atomic write), after the caller has verified the digest of the bytes.
//! - Bytes stream through; nothing here buffers a whole blob in memory.

mod direct;
pub mod layout;
mod local;

use std::pin::Pin;
use std::sync::Arc;

use berth_oci::range::ByteRange;
use berth_oci::{Digest, Digester, UploadId};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use opendal::{services, ErrorKind, Operator};
use serde::{Deserialize, Serialize};

/// Which storage backend to use, chosen by configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    /// Local filesystem under `root` (the embedded default: `<data dir>/blobs`).
    Fs {
        root: String,
        /// Write blobs, and read those not in the page cache, with direct I/O
        /// (`O_DIRECT`) where the filesystem supports it. On by default.
        #[serde(default = "yes")]
        direct_io: bool,
    },
    /// Process memory; lost at exit. For tests and throwaway registries.
    Memory,
    /// S3 or an S3-compatible service.
    S3 {
        bucket: String,
        #[serde(default)]
        endpoint: Option<String>,
        #[serde(default)]
        region: Option<String>,
        #[serde(default)]
        root: Option<String>,
        #[serde(default)]
        access_key_id: Option<String>,
        #[serde(default)]
        secret_access_key: Option<String>,
        /// The longest one request to the store may take (a read of one piece, a
        /// part, a server-side copy of at most 256 MiB, a listing page);
        /// a request that takes longer is cut off and retried, like any
        /// temporary failure, so a store that stops answering fails requests
        /// instead of holding them.
        #[serde(default = "request_timeout_secs")]
        request_timeout_secs: u64,
    },
}

fn yes() -> bool {
    true
}

fn request_timeout_secs() -> u64 {
    60
}

impl StorageConfig {
    /// The filesystem backend under `root`, with the default options.
    pub fn fs(root: impl Into<String>) -> Self {
        StorageConfig::Fs { root: root.into(), direct_io: true }
    }
}

/// A storage failure. `NotFound` is a normal answer; `Backend` is logged and
/// answered as 500 by the caller.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("not found")]
    NotFound,
    #[error("upload staging is inconsistent: {0}")]
    Staging(String),
    #[error("client stream failed: {0}")]
    Client(String),
    #[error("upload exceeds the size limit")]
    TooLarge,
    #[error("storage backend: {0}")]
    Backend(#[from] opendal::Error),
    #[error("local file: {0}")]
    Io(#[from] std::io::Error),
}

impl StorageError {
    /// Whether the store did not answer, or kept failing in a way that may pass
    /// (after the retries): a condition to try again, not a fault.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StorageError::Backend(e) if e.is_temporary() || e.is_persistent())
    }

    /// Whether the store's disk is full (or the process's disk quota spent): an
    /// operator's matter, told as such rather than as an opaque fault.
    pub fn is_out_of_space(&self) -> bool {
        fn full(e: &std::io::Error) -> bool {
            matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = match self {
            StorageError::Io(e) => Some(e),
            StorageError::Backend(e) => Some(e),
            _ => None,
        };
        while let Some(e) = cause {
            if e.downcast_ref::<std::io::Error>().is_some_and(full) {
                return true;
            }
            cause = e.source();
        }
        false
    }

    fn from_dal(e: opendal::Error) -> Self {
        if e.kind() == ErrorKind::NotFound {
            StorageError::NotFound
        } else {
            StorageError::Backend(e)
        }
    }

    /// An error of a stream read from the backend (OpenDAL's own, carried in an
    /// I/O error), classified as its own would be.
    fn from_stream(e: std::io::Error) -> Self {
        if e.get_ref().is_none() {
            return StorageError::from_io(e);
        }
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<opendal::Error>()) {
            Some(Ok(dal)) => StorageError::from_dal(*dal),
            Some(Err(other)) => StorageError::from_io(std::io::Error::new(kind, other)),
            None => StorageError::from_io(std::io::Error::from(kind)),
        }
    }

    fn from_io(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            StorageError::NotFound
        } else {
            StorageError::Io(e)
        }
    }
}

/// How an upload's bytes are staged; persisted with the session so another process
/// (after a restart, or another replica) can continue the upload.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Staging {
    /// Append mode: the generation of `uploads/<id>/data-<gen>`. A generation is
    /// replaced when a failed chunk left bytes past the recorded offset.
    #[serde(default)]
    pub generation: u32,
    /// Parts mode: the start offsets of the committed chunks, in order.
    #[serde(default)]
    pub parts: Vec<u64>,
}

/// A stream of blob bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// The registry's blob store.
#[derive(Clone)]
pub struct BlobStore {
    op: Operator,
    /// The `fs` backend's bulk data path (see [`local`]); `None` for other backends.
    local: Option<local::LocalFiles>,
    append: bool,
    rename: bool,
    copy: bool,
    /// Copies of any size (in parts; S3), not only up to [`COPY_MAX`].
    copy_multi: bool,
    /// The most one server-side copy request copies ([`COPY_PIECE`]).
    copy_piece: u64,
    compose: bool,
    /// Received upload bytes not yet hashed and written, across all uploads.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The most one upload may hold of it.
    upload_in_flight_kib: usize,
}

/// Reads are fetched from the backend in pieces of this size.
const READ_CHUNK: usize = 2 * 1024 * 1024;
/// Pieces of one blob read in flight at once: while one is sent to the client,
/// the next ones are on their way. At most this many pieces of a read are held
/// in memory.
const READ_AHEAD: usize = 3;
/// Writes are gathered into pieces of this size before reaching the backend: on
/// S3, the parts of a multipart upload (S3 refuses parts under 5 MiB but the last).
const WRITE_CHUNK: usize = 8 * 1024 * 1024;
/// The largest object one server-side copy may publish (S3's CopyObject limit);
/// on a store without multipart copies, a larger one-part upload is streamed
/// through a multipart writer instead.
const COPY_MAX: u64 = 5 << 30;
/// Parts of one multipart upload sent at once.
const WRITE_CONCURRENT: usize = 2;
/// The most one server-side copy request copies (a single copy or one part of a
/// multipart copy): a bound on how long one request to the store lasts.
const COPY_PIECE: u64 = 256 << 20;
/// Server-side copies of one commit in flight at once.
const COPY_CONCURRENT: usize = 4;
/// Retries of a request that failed temporarily (or stalled past its deadline).
const RETRIES: usize = 4;
/// Chunks in flight between the writer and the hashing thread.
const HASH_QUEUE: usize = 64;
/// Bytes of one upload in flight between the socket and the disk (received but
/// not yet both hashed and written); the request body is read no faster than that.
const IN_FLIGHT_KIB: usize = 32 * 1024;
/// Bytes in flight across all uploads: many concurrent large pushes that arrive
/// faster than they can be hashed wait on their sockets instead of each buffering
/// [`IN_FLIGHT_KIB`].
const ALL_IN_FLIGHT_KIB: usize = 256 * 1024;
/// Most request-body frames gathered into one batch for the hasher and writer.
const BATCH_FRAMES: usize = 64;

impl BlobStore {
    /// Open the configured backend and check it is reachable.
    pub async fn open(config: &StorageConfig) -> Result<Self, StorageError> {
        let local = match config {
            StorageConfig::Fs { root, direct_io } => Some(local::LocalFiles::new(root, *direct_io)),
            _ => None,
        };
        let op = match config {
            StorageConfig::Fs { root, .. } => {
                std::fs::create_dir_all(root).map_err(|e| StorageError::Staging(format!("create {root}: {e}")))?;
                let tmp = std::path::Path::new(root).join(layout::TMP_DIR);
                Operator::new(services::Fs::default().root(root).atomic_write_dir(&tmp.to_string_lossy()))?
            }
            StorageConfig::Memory => Operator::new(services::Memory::default())?,
            StorageConfig::S3 { bucket, endpoint, region, root, access_key_id, secret_access_key, request_timeout_secs } => {
                let mut b = services::S3::default().bucket(bucket);
                if let Some(v) = endpoint {
                    b = b.endpoint(v);
                }
                b = b.region(region.as_deref().unwrap_or("us-east-1"));
                if let Some(v) = root {
                    b = b.root(v);
                }
                if let Some(v) = access_key_id {
                    b = b.access_key_id(v);
                }
                if let Some(v) = secret_access_key {
                    b = b.secret_access_key(v);
                }
                // A remote store answers "slow down", resets connections and
                // stalls now and then: such temporary failures are retried with
                // jittered backoff before they become a request's error. Each
                // attempt has a deadline (inside the retries, so a stalled
                // attempt is cut and tried again on a fresh connection).
                let deadline = std::time::Duration::from_secs((*request_timeout_secs).max(1));
                Operator::new(b)?
                    .layer(opendal::layers::TimeoutLayer::new().with_timeout(deadline).with_io_timeout(deadline))
                    .layer(opendal::layers::RetryLayer::new().with_jitter().with_max_times(RETRIES))
            }
        };
        let cap = op.info().capability();
        // OpenDAL's S3 service claims appends (S3 Express One Zone has them);
        // S3 itself, and the S3-compatible stores, have not: stage parts there.
        let append = cap.write_can_append && !matches!(config, StorageConfig::S3 { .. });
        let store = BlobStore {
            local,
            append,
            rename: cap.rename,
            copy: cap.copy,
            copy_multi: cap.copy_can_multi,
            copy_piece: COPY_PIECE,
            compose: cap.compose,
            op,
            in_flight: Arc::new(tokio::sync::Semaphore::new(ALL_IN_FLIGHT_KIB)),
            upload_in_flight_kib: IN_FLIGHT_KIB,
        };
        store.probe().await?;
        Ok(store)
    }

    /// Whether the backend answers (a listing of at most one entry of the root:
    /// cheap on every backend, S3 included).
    pub async fn probe(&self) -> Result<(), StorageError> {
        self.op.check().await.map_err(StorageError::from_dal)
    }

    /// Whether uploads stage into one appended file (else one object per chunk).
    pub fn appends(&self) -> bool {
        self.append
    }

    /// Size of a stored blob, or `None` if absent.
    pub async fn stat_blob(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        match self.op.stat(&layout::blob(digest)).await {
            Ok(m) => Ok(Some(m.content_length())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stream a blob of `size` bytes (its recorded size), or one byte range of it.
    ///
    /// On S3 the blob is read as ranged `GET`s of [`READ_CHUNK`], [`READ_AHEAD`]
    /// of them in flight: the next pieces are on their way while one is sent to
    /// the client, and a failed piece is retried alone. The recorded size bounds the
    /// reads, so no `HEAD` precedes them; the first piece is awaited here, so a
    /// blob missing from the store is [`StorageError::NotFound`] before an answer
    /// has begun.
    pub async fn read_blob(&self, digest: &Digest, size: u64, range: Option<ByteRange>) -> Result<ByteStream, StorageError> {
        if let Some(local) = &self.local {
            let range = range.map(|r| (r.start, r.end + 1));
            return local.read(&layout::blob(digest), range).await.map_err(StorageError::from_io);
        }
        let span = match range {
            Some(r) => r.start..r.end + 1,
            None => 0..size,
        };
        let reader =
            self.op.reader_with(&layout::blob(digest)).chunk(READ_CHUNK).concurrent(READ_AHEAD).await.map_err(StorageError::from_dal)?;
        let mut stream = reader.into_bytes_stream(span).await.map_err(StorageError::from_dal)?;
        match stream.next().await {
            None => Ok(Box::pin(futures::stream::empty())),
            Some(Err(e)) => Err(StorageError::from_stream(e)),
            Some(Ok(first)) => Ok(Box::pin(futures::stream::once(async { Ok(first) }).chain(stream))),
        }
    }

    /// Read a whole small blob of `size` bytes (its recorded size), such as a
    /// manifest, in one read of that size: a read of unknown length fills (and
    /// first zeroes) a 2 MiB buffer, which cost a cold manifest GET more than
    /// the rest of it.
    ///
    /// The bytes are a copy of their own: the read lands in a pooled I/O buffer,
    /// which a caller keeping the bytes (the manifest cache) would otherwise
    /// keep whole; 1,000 manifests read cold held 2 GiB.
    pub async fn read_blob_bytes(&self, digest: &Digest, size: u64) -> Result<Bytes, StorageError> {
        if size == 0 {
            return match self.stat_blob(digest).await? {
                Some(_) => Ok(Bytes::new()),
                None => Err(StorageError::NotFound),
            };
        }
        let buf = self.op.read_with(&layout::blob(digest)).range(0..size).await.map_err(StorageError::from_dal)?;
        Ok(Bytes::from(buf.to_vec()))
    }

    /// Store small verified content (a manifest) under its digest. The caller has
    /// computed `digest` from `bytes`. Writing an existing blob is a no-op.
    pub async fn put_blob(&self, digest: &Digest, bytes: Bytes) -> Result<(), StorageError> {
        debug_assert_eq!(&Digest::of(digest.algorithm(), &bytes), digest);
        if self.stat_blob(digest).await?.is_some() {
            return Ok(());
        }
        self.op.write(&layout::blob(digest), bytes).await?;
        Ok(())
    }

    /// Delete a blob's bytes. Absent is not an error.
    pub async fn delete_blob(&self, digest: &Digest) -> Result<(), StorageError> {
        self.op.delete(&layout::blob(digest)).await?;
        Ok(())
    }

    /// Append one chunk of an upload at `offset`, feeding every byte to `digester`.
    ///
    /// On success returns the number of bytes written and updates `staging`. On
    /// failure `staging` is unchanged and the caller must discard `digester`; bytes a
    /// failed chunk left behind are never counted (append mode repairs them on the
    /// next chunk, parts mode overwrites the part).
    pub async fn write_chunk<S, E>(
        &self,
        id: &UploadId,
        staging: &mut Staging,
        offset: u64,
        body: S,
        digester: &mut Digester,
        max_total: u64,
    ) -> Result<u64, StorageError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let key = if self.local.is_some() {
            // The staging writer checks (and repairs) the file's length itself, on
            // its own thread: one blocking hand-off per chunk.
            layout::upload_data(id, staging.generation)
        } else if self.append {
            let key = layout::upload_data(id, staging.generation);
            let on_disk = match self.op.stat(&key).await {
                Ok(m) => m.content_length(),
                Err(e) if e.kind() == ErrorKind::NotFound => 0,
                Err(e) => return Err(e.into()),
            };
            if on_disk < offset {
                return Err(StorageError::Staging(format!("staging holds {on_disk} bytes, session says {offset}")));
            }
            if on_disk > offset {
                // A chunk failed mid-stream earlier: keep only the recorded prefix.
                let next = layout::upload_data(id, staging.generation + 1);
                self.copy_prefix(&key, &next, offset).await?;
                self.op.delete(&key).await?;
                staging.generation += 1;
                next
            } else {
                key
            }
        } else {
            layout::upload_part(id, offset)
        };
        let mut sink = match &self.local {
            Some(local) => Sink::local(local.path(&key), offset, local.direct(), digester.clone()),
            None => Sink::dal(
                self.op.writer_with(&key).append(self.append).chunk(WRITE_CHUNK).concurrent(WRITE_CONCURRENT).await?,
                digester.clone(),
            ),
        };
        let written = match self.pour(&mut sink, offset, body, max_total).await {
            Ok(n) => n,
            Err(e) => return Err(sink.abort(e).await),
        };
        let hashed = sink.close().await?;
        if !self.append && written > 0 {
            staging.parts.push(offset);
        }
        *digester = hashed;
        Ok(written)
    }

    /// Feed a chunk's body to `sink` batch by batch, within the upload's and the
    /// store's in-flight budgets; `offset` is where the chunk starts in its blob
    /// (for the size limit). Returns the bytes fed; on an error the caller aborts
    /// the sink.
    async fn pour<S, E>(&self, sink: &mut Sink, offset: u64, body: S, max_total: u64) -> Result<u64, StorageError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let mut written = 0u64;
        // Frames that are already received travel together: one wake-up of the
        // hashing and writing threads per batch rather than per frame.
        let mut body = body.ready_chunks(BATCH_FRAMES);
        let budget = Arc::new(tokio::sync::Semaphore::new(self.upload_in_flight_kib));
        while let Some(frames) = body.next().await {
            let mut batch = Vec::with_capacity(frames.len());
            for frame in frames {
                let frame = frame.map_err(|e| StorageError::Client(e.to_string()))?;
                written += frame.len() as u64;
                batch.push(frame);
            }
            if offset + written > max_total {
                return Err(StorageError::TooLarge);
            }
            // A batch larger than the budget takes all of it (it is still bounded
            // by the frames one poll gathers), so no batch waits forever.
            let kib = batch.iter().map(|b| b.len()).sum::<usize>().div_ceil(1024).clamp(1, self.upload_in_flight_kib);
            let permit = budget.clone().acquire_many_owned(kib as u32).await.expect("budget is never closed");
            let shared = self.in_flight.clone().acquire_many_owned(kib as u32).await.expect("budget is never closed");
            sink.write(Arc::new(Frames { bytes: batch, _permits: (permit, shared) })).await?;
        }
        Ok(written)
    }

    /// Whether a blob received whole in one request is written straight to its
    /// key ([`Self::write_unpublished`]) rather than staged: on stores that stage
    /// uploads as one object per chunk, where staging would cost a copy of the
    /// object and a delete at commit.
    pub fn writes_in_place(&self) -> bool {
        self.local.is_none() && !self.append
    }

    /// Write a blob received whole, expected to be `digest`, straight to its key,
    /// feeding every byte to `digester`. Nothing is visible until
    /// [`Unpublished::publish`], which only bytes that hash to `digest` pass (on
    /// S3 the object is a multipart upload not yet completed, or a body not yet
    /// sent). Only where [`Self::writes_in_place`].
    pub async fn write_unpublished<S, E>(
        &self,
        digest: &Digest,
        body: S,
        digester: &mut Digester,
        max_total: u64,
    ) -> Result<(u64, Unpublished), StorageError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        if !self.writes_in_place() || digester.algorithm() != digest.algorithm() {
            return Err(StorageError::Staging("this store stages uploads; it does not write them in place".into()));
        }
        let key = layout::blob(digest);
        let writer = self.op.writer_with(&key).chunk(WRITE_CHUNK).concurrent(WRITE_CONCURRENT).await?;
        let mut sink = Sink::dal(writer, digester.clone());
        let written = match self.pour(&mut sink, 0, body, max_total).await {
            Ok(n) => n,
            Err(e) => return Err(sink.abort(e).await),
        };
        let (hashed, writer) = sink.hashed_unclosed().await?;
        *digester = hashed.clone();
        Ok((written, Unpublished { writer, expected: digest.clone(), computed: hashed.finish() }))
    }

    async fn copy_prefix(&self, from: &str, to: &str, len: u64) -> Result<(), StorageError> {
        let mut w = self.op.writer(to).await?;
        if len > 0 {
            let reader = self.op.reader_with(from).chunk(READ_CHUNK).await?;
            let mut s = reader.into_bytes_stream(0..len).await?;
            while let Some(b) = s.next().await {
                w.write(b.map_err(|e| StorageError::Staging(e.to_string()))?).await?;
            }
        }
        w.close().await?;
        Ok(())
    }

    /// Publish a fully staged and verified upload as the blob `digest`, then drop the
    /// staging data. If the blob already exists the staged copy is simply dropped.
    pub async fn commit_upload(&self, id: &UploadId, staging: &Staging, total: u64, digest: &Digest) -> Result<(), StorageError> {
        let target = layout::blob(digest);
        if let Some(local) = &self.local {
            // Stat, rename, directory sync and staging removal in one blocking call.
            let (local, staged, dir) = (local.clone(), layout::upload_data(id, staging.generation), layout::upload_dir(id));
            return tokio::task::spawn_blocking(move || local.publish(&staged, &target, total, &dir))
                .await
                .map_err(|e| StorageError::Staging(format!("publish: {e}")))?
                .map_err(StorageError::from_io);
        }
        if self.stat_blob(digest).await?.is_none() {
            if self.append {
                let mut key = layout::upload_data(id, staging.generation);
                let on_disk = match self.op.stat(&key).await {
                    Ok(m) => m.content_length(),
                    Err(e) if e.kind() == ErrorKind::NotFound => 0,
                    Err(e) => return Err(e.into()),
                };
                if on_disk > total {
                    // A chunk failed part-way after the last recorded one: publish
                    // only the recorded prefix.
                    let next = layout::upload_data(id, staging.generation + 1);
                    self.copy_prefix(&key, &next, total).await?;
                    key = next;
                }
                if total == 0 {
                    self.op.write(&target, Bytes::new()).await?;
                } else if self.rename {
                    self.op.rename(&key, &target).await?;
                } else {
                    self.op.copy(&key, &target).await?;
                }
            } else {
                let parts = part_spans(id, staging, total);
                match parts.as_slice() {
                    [] => {
                        self.op.write(&target, Bytes::new()).await?;
                    }
                    [(key, _)] if self.rename => self.op.rename(key, &target).await?,
                    [(key, len)] if self.copy && (self.copy_multi || *len <= COPY_MAX) => {
                        // A server-side copy; one larger than a piece goes as a
                        // multipart copy of pieces. The length is the recorded
                        // one (a part is never rewritten once recorded), which
                        // spares a HEAD of the part.
                        let options = opendal::options::CopyOptions {
                            source_content_length_hint: Some(*len),
                            chunk: Some(self.copy_piece as usize),
                            concurrent: COPY_CONCURRENT,
                            ..Default::default()
                        };
                        self.op.copy_options(key, &target, options).await?;
                    }
                    _ if self.compose => {
                        self.op.compose(parts.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), &target).await?;
                    }
                    _ => {
                        // Concatenated by one writer, published on close. Where
                        // the store copies server-side (S3's UploadPartCopy),
                        // OpenDAL copies each part there, in pieces; elsewhere,
                        // and for a part under the store's least part size, it
                        // streams the bytes through.
                        let mut w = self.op.writer_with(&target).concurrent(COPY_CONCURRENT).await?;
                        if let Err(e) = concatenate(&mut w, &parts, self.copy_piece).await {
                            let _ = w.abort().await;
                            return Err(e.into());
                        }
                        w.close().await?;
                    }
                }
            }
        }
        if self.append {
            return self.delete_upload(id).await;
        }
        // The parts recorded, by key: no listing of the upload's prefix. A part a
        // failed last chunk left unrecorded goes with the sweep of staging no
        // session owns.
        self.op.delete_iter(part_keys(id, staging)).await?;
        Ok(())
    }

    /// Stream the `total` bytes staged so far for an upload (to re-hash them with a
    /// different digest algorithm than the one the session started with).
    pub async fn read_staged(&self, id: &UploadId, staging: &Staging, total: u64) -> Result<ByteStream, StorageError> {
        if total == 0 {
            return Ok(Box::pin(futures::stream::empty()));
        }
        let keys: Vec<String> = if self.append { vec![layout::upload_data(id, staging.generation)] } else { part_keys(id, staging) };
        let op = self.op.clone();
        let limit = if self.append { Some(total) } else { None };
        let stream = futures::stream::iter(keys)
            .then(move |key| {
                let op = op.clone();
                async move {
                    let reader = op.reader_with(&key).chunk(READ_CHUNK).await?;
                    match limit {
                        Some(n) => reader.into_bytes_stream(0..n).await,
                        None => reader.into_bytes_stream(..).await,
                    }
                }
            })
            .map(|r| r.map_err(std::io::Error::other))
            .try_flatten();
        Ok(Box::pin(stream))
    }

    /// Remove everything staged for an upload. Absent is not an error.
    pub async fn delete_upload(&self, id: &UploadId) -> Result<(), StorageError> {
        if let Some(local) = &self.local {
            let (local, dir) = (local.clone(), layout::upload_dir(id));
            return tokio::task::spawn_blocking(move || local.remove_dir(&dir))
                .await
                .map_err(|e| StorageError::Staging(format!("remove staging: {e}")))?
                .map_err(StorageError::from_io);
        }
        match self.op.delete_with(&layout::upload_dir(id)).recursive(true).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every stored blob: digest, size and last-modified time in ms (for `fsck`).
    /// Keys that are not a blob's (stray files) are skipped.
    pub async fn list_blobs(&self) -> Result<Vec<(Digest, u64, i64)>, StorageError> {
        let entries = match self.op.list_with("blobs/").recursive(true).await {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for e in entries {
            let path = e.path();
            let mut parts = path.trim_start_matches("blobs/").split('/');
            let (Some(alg), Some(_), Some(hex), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else { continue };
            let Ok(digest) = format!("{alg}:{hex}").parse::<Digest>() else { continue };
            if layout::blob(&digest) != path {
                continue;
            }
            let meta = self.op.stat(path).await?;
            let modified = meta.last_modified().map(|t| t.into_inner().as_millisecond()).unwrap_or(0);
            out.push((digest, meta.content_length(), modified));
        }
        Ok(out)
    }

    /// Upload ids that have staging data (for sweeping data no session owns).
    pub async fn staged_uploads(&self) -> Result<Vec<UploadId>, StorageError> {
        let entries = match self.op.list("uploads/").await {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e.into()),
        };
        Ok(entries.iter().filter_map(|e| e.name().trim_end_matches('/').parse::<UploadId>().ok()).collect())
    }
}

#[cfg(test)]
impl BlobStore {
    /// The same store with other in-flight budgets (tests).
    fn with_in_flight(mut self, all_kib: usize, upload_kib: usize) -> Self {
        assert!(upload_kib <= all_kib, "one upload's budget must fit in the shared one");
        self.in_flight = Arc::new(tokio::sync::Semaphore::new(all_kib));
        self.upload_in_flight_kib = upload_kib;
        self
    }
}

/// Received frames on their way to the hasher and the writer; their share of the
/// upload's and the store's in-flight budgets returns when both are done with them.
struct Frames {
    bytes: Vec<Bytes>,
    _permits: (tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit),
}

impl Frames {
    fn hash_into(&self, digester: &mut Digester) {
        for b in &self.bytes {
            digester.update(b);
        }
    }
}

impl std::ops::Deref for Frames {
    type Target = Vec<Bytes>;
    fn deref(&self) -> &Vec<Bytes> {
        &self.bytes
    }
}

type Batch = Arc<Frames>;

/// The keys of an upload's staged parts (parts mode), in order.
fn part_keys(id: &UploadId, staging: &Staging) -> Vec<String> {
    staging.parts.iter().map(|o| layout::upload_part(id, *o)).collect()
}

/// The keys and lengths of an upload's staged parts, `total` bytes in all.
fn part_spans(id: &UploadId, staging: &Staging, total: u64) -> Vec<(String, u64)> {
    let ends = staging.parts.iter().skip(1).copied().chain(std::iter::once(total));
    staging.parts.iter().zip(ends).map(|(start, end)| (layout::upload_part(id, *start), end.saturating_sub(*start))).collect()
}

/// Write `parts` into `w` in order, each by server-side copies of at most
/// `piece` bytes where the store has them.
async fn concatenate(w: &mut opendal::Writer, parts: &[(String, u64)], piece: u64) -> opendal::Result<()> {
    for (key, len) in parts {
        let mut at = 0;
        while at < *len {
            let n = (*len - at).min(piece);
            w.copy_from(key, at..at + n).await?;
            at += n;
        }
    }
    Ok(())
}

/// A blob written to its key by [`BlobStore::write_unpublished`] and not yet
/// visible. Dropped or discarded, it never becomes visible.
pub struct Unpublished {
    writer: opendal::Writer,
    expected: Digest,
    computed: Digest,
}

impl Unpublished {
    /// The digest of the bytes written.
    pub fn computed(&self) -> &Digest {
        &self.computed
    }

    /// Make the blob visible under its key, if its bytes are the digest it was
    /// written for; otherwise it is discarded and an error returned.
    pub async fn publish(mut self) -> Result<(), StorageError> {
        if self.computed != self.expected {
            let _ = self.writer.abort().await;
            return Err(StorageError::Staging(format!("content digest is {}, not {}", self.computed, self.expected)));
        }
        if let Err(e) = self.writer.close().await {
            // Given up in the background: on a store that stopped answering the
            // abort waits out its own deadline, and the client's answer need not.
            let mut writer = self.writer;
            tokio::spawn(async move {
                let _ = writer.abort().await;
            });
            return Err(e.into());
        }
        Ok(())
    }

    /// Give the blob up (an S3 multipart upload is aborted).
    pub async fn discard(mut self) {
        if let Err(e) = self.writer.abort().await {
            tracing::warn!(error = %e, digest = %self.expected, "aborting an unpublished blob failed");
        }
    }
}

/// Where [`BlobStore::write_chunk`] sends a chunk's bytes to be hashed and stored.
// One per chunk being written, held by its task: its size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Sink {
    /// An OpenDAL writer (every backend but `fs`), with the hash computed on a
    /// blocking thread so hashing overlaps the backend's writes.
    Dal { writer: opendal::Writer, tx: tokio::sync::mpsc::Sender<Batch>, hasher: tokio::task::JoinHandle<Digester> },
    /// One blocking thread that hashes and appends to the staging file (see
    /// [`local_worker`]), fed through a channel. The thread starts only once
    /// [`SMALL_CHUNK`] bytes have arrived: a smaller chunk is handed over whole, in
    /// one thread hand-off instead of one wake-up per batch.
    Local { pending: Option<Pending>, started: Option<LocalWorker> },
}

/// A local chunk's first batches, held until the chunk is known to be small or not.
struct Pending {
    path: std::path::PathBuf,
    offset: u64,
    direct: bool,
    digester: Digester,
    batches: Vec<Batch>,
    len: usize,
}

struct LocalWorker {
    tx: tokio::sync::mpsc::Sender<Batch>,
    abort: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<std::io::Result<Digester>>,
}

/// Chunks up to this size reach the local staging thread in one piece.
const SMALL_CHUNK: usize = 2 * 1024 * 1024;

impl Pending {
    /// Start the staging thread with the batches held so far; with `more` false the
    /// chunk is complete and the thread needs no channel.
    fn start(self, more: bool) -> LocalWorker {
        let (tx, rx) = tokio::sync::mpsc::channel::<Batch>(HASH_QUEUE);
        let rx = more.then_some(rx);
        let abort = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let aborted = abort.clone();
        let Pending { path, offset, direct, digester, batches, .. } = self;
        let task = tokio::task::spawn_blocking(move || {
            let mut rx = rx;
            let incoming = batches.into_iter().chain(std::iter::from_fn(move || rx.as_mut()?.blocking_recv()));
            local_worker(&path, offset, direct, digester, incoming, &aborted)
        });
        LocalWorker { tx, abort, task }
    }
}

/// Bytes a local upload hashes on its writing thread before hashing moves to a
/// thread of its own: small blobs (most layers, configs) cost one thread hand-off,
/// large ones hash and write in parallel.
const INLINE_HASH: u64 = 8 * 1024 * 1024;

impl Sink {
    fn dal(writer: opendal::Writer, mut digester: Digester) -> Sink {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(HASH_QUEUE);
        let hasher = tokio::task::spawn_blocking(move || {
            while let Some(batch) = rx.blocking_recv() {
                batch.hash_into(&mut digester);
            }
            digester
        });
        Sink::Dal { writer, tx, hasher }
    }

    fn local(path: std::path::PathBuf, offset: u64, direct: bool, digester: Digester) -> Sink {
        Sink::Local { pending: Some(Pending { path, offset, direct, digester, batches: Vec::new(), len: 0 }), started: None }
    }

    async fn write(&mut self, batch: Batch) -> Result<(), StorageError> {
        match self {
            Sink::Dal { writer, tx, .. } => {
                if tx.send(batch.clone()).await.is_err() {
                    return Err(StorageError::Staging("hasher stopped".into()));
                }
                Ok(writer.write(batch.bytes.clone()).await?)
            }
            Sink::Local { pending, started } => {
                if let Some(p) = pending {
                    p.len += batch.iter().map(|b| b.len()).sum::<usize>();
                    p.batches.push(batch);
                    if p.len <= SMALL_CHUNK {
                        return Ok(());
                    }
                    *started = pending.take().map(|p| p.start(true));
                    return Ok(());
                }
                let w = started.as_ref().expect("a local sink is pending or started");
                w.tx.send(batch).await.map_err(|_| StorageError::Staging("staging writer stopped".into()))
            }
        }
    }

    /// An OpenDAL sink's digester, once it has seen every byte, and its writer
    /// not yet closed (nothing published).
    async fn hashed_unclosed(self) -> Result<(Digester, opendal::Writer), StorageError> {
        let Sink::Dal { writer, tx, hasher } = self else {
            return Err(StorageError::Staging("a local sink has no OpenDAL writer".into()));
        };
        drop(tx);
        let digester = hasher.await.map_err(|e| StorageError::Staging(format!("hasher: {e}")))?;
        Ok((digester, writer))
    }

    /// Make the written bytes durable; returns the digester having seen them.
    async fn close(self) -> Result<Digester, StorageError> {
        match self {
            dal @ Sink::Dal { .. } => {
                let (digester, mut writer) = dal.hashed_unclosed().await?;
                writer.close().await?;
                Ok(digester)
            }
            Sink::Local { pending, started } => {
                let LocalWorker { tx, task, .. } = match (pending, started) {
                    (Some(p), _) => p.start(false),
                    (None, Some(w)) => w,
                    (None, None) => unreachable!("a local sink is pending or started"),
                };
                drop(tx);
                Ok(task.await.map_err(|e| StorageError::Staging(format!("staging writer: {e}")))??)
            }
        }
    }

    /// Give up on the chunk; returns the error to report (the writer's own failure,
    /// when it is the reason the chunk stopped).
    async fn abort(self, cause: StorageError) -> StorageError {
        match self {
            Sink::Dal { mut writer, tx, hasher } => {
                drop(tx);
                let _ = hasher.await;
                let _ = writer.abort().await;
                cause
            }
            // Nothing was staged yet: nothing to undo.
            Sink::Local { started: None, .. } => cause,
            Sink::Local { started: Some(LocalWorker { tx, abort, task }), .. } => {
                abort.store(true, std::sync::atomic::Ordering::Release);
                drop(tx);
                match task.await {
                    Ok(Err(e)) => StorageError::Io(e),
                    _ => cause,
                }
            }
        }
    }
}

/// The local sink's thread: hash each batch, then append it with write-behind.
/// Past [`INLINE_HASH`] bytes the digester moves to a scoped thread of its own and
/// batches are handed to it, so a large upload hashes and writes in parallel.
fn local_worker(
    path: &std::path::Path,
    offset: u64,
    direct: bool,
    digester: Digester,
    incoming: impl Iterator<Item = Batch>,
    aborted: &std::sync::atomic::AtomicBool,
) -> std::io::Result<Digester> {
    let mut w = local::StagedWriter::open(path, offset, direct)?;
    std::thread::scope(|scope| {
        let mut inline = Some(digester);
        let mut hashed = 0u64;
        let mut offloaded: Option<(std::sync::mpsc::SyncSender<Batch>, std::thread::ScopedJoinHandle<'_, Digester>)> = None;
        let mut result = Ok(());
        for batch in incoming {
            if hashed >= INLINE_HASH {
                if let Some(mut d) = inline.take() {
                    let (htx, hrx) = std::sync::mpsc::sync_channel::<Batch>(HASH_QUEUE);
                    let handle = scope.spawn(move || {
                        hrx.iter().for_each(|batch| batch.hash_into(&mut d));
                        d
                    });
                    offloaded = Some((htx, handle));
                }
            }
            match (&mut inline, &offloaded) {
                (Some(d), _) => {
                    batch.hash_into(d);
                    hashed += batch.iter().map(|b| b.len() as u64).sum::<u64>();
                }
                (None, Some((htx, _))) => {
                    let _ = htx.send(batch.clone());
                }
                (None, None) => unreachable!("the digester is inline or offloaded"),
            }
            if let Err(e) = batch.iter().try_for_each(|b| w.push(b.clone())) {
                result = Err(e);
                break;
            }
        }
        let digester = match offloaded {
            Some((htx, handle)) => {
                drop(htx);
                handle.join().map_err(|_| std::io::Error::other("hasher panicked"))?
            }
            None => inline.expect("inline digester"),
        };
        result?;
        if !aborted.load(std::sync::atomic::Ordering::Acquire) {
            w.finish()?;
        }
        Ok(digester)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_oci::DigestAlgorithm;

    #[test]
    fn a_full_disk_is_told_apart() {
        // ENOSPC on Linux, where the tests run.
        let enospc = || std::io::Error::from_raw_os_error(28);
        assert!(StorageError::Io(enospc()).is_out_of_space());
        // OpenDAL's own error, carrying the file system's.
        let dal = opendal::Error::new(ErrorKind::Unexpected, "write").set_source(enospc());
        assert!(StorageError::Backend(dal).is_out_of_space());
        assert!(!StorageError::Io(std::io::Error::other("disk on fire")).is_out_of_space());
        assert!(!StorageError::Backend(opendal::Error::new(ErrorKind::Unexpected, "write")).is_out_of_space());
        assert!(!StorageError::NotFound.is_out_of_space());
    }

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        futures::stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect::<Vec<_>>())
    }

    async fn stores() -> Vec<(BlobStore, tempdir::Dir)> {
        let (dir, dir_buffered) = (tempdir::Dir::new(), tempdir::Dir::new());
        let fs = BlobStore::open(&StorageConfig::fs(dir.path())).await.unwrap();
        let buffered = BlobStore::open(&StorageConfig::Fs { root: dir_buffered.path().to_string(), direct_io: false }).await.unwrap();
        let mem = BlobStore::open(&StorageConfig::Memory).await.unwrap();
        assert!(fs.appends());
        assert!(!mem.appends(), "memory exercises the parts strategy");
        let mut all = vec![(fs, dir), (buffered, dir_buffered), (mem, tempdir::Dir::new())];
        // S3 on a real Garage, each test under a prefix of its own.
        match berth_testkit::Garage::shared() {
            Some(g) => {
                let config = StorageConfig::S3 {
                    bucket: g.bucket.clone(),
                    endpoint: Some(g.endpoint.clone()),
                    region: Some(g.region.clone()),
                    root: Some(format!("/{}/", UploadId::random())),
                    access_key_id: Some(g.access_key_id.clone()),
                    secret_access_key: Some(g.secret_access_key.clone()),
                    request_timeout_secs: 60,
                };
                let s3 = BlobStore::open(&config).await.unwrap();
                assert!(!s3.appends(), "S3 stages uploads as parts");
                all.push((s3, tempdir::Dir::new()));
            }
            None => {
                assert!(!berth_testkit::s3_wanted());
                eprintln!("no S3 store: set {} to a garage binary (.ci/run builds it)", berth_testkit::ENV_GARAGE);
            }
        }
        all
    }

    #[tokio::test]
    async fn chunked_upload_commits_verified_content() {
        for (store, _dir) in stores().await {
            let id = UploadId::random();
            let mut staging = Staging::default();
            let mut d = Digester::new(DigestAlgorithm::Sha256);
            let n1 = store.write_chunk(&id, &mut staging, 0, chunks(&[b"hello ", b"wor"]), &mut d, u64::MAX).await.unwrap();
            // A failed chunk leaves staging and the digester as they were.
            let failing = futures::stream::iter(vec![Ok(Bytes::from_static(b"garbage")), Err("reset".to_string())]);
            let saved = d.clone();
            let mut d_fail = d.clone();
            let before = staging.clone();
            assert!(store.write_chunk(&id, &mut staging, n1, failing, &mut d_fail, u64::MAX).await.is_err());
            assert_eq!(staging, before);
            let mut d = saved;
            let n2 = store.write_chunk(&id, &mut staging, n1, chunks(&[b"ld"]), &mut d, u64::MAX).await.unwrap();
            let digest = d.finish();
            assert_eq!(digest, Digest::sha256(b"hello world"));
            store.commit_upload(&id, &staging, n1 + n2, &digest).await.unwrap();
            assert_eq!(store.stat_blob(&digest).await.unwrap(), Some(11));
            assert_eq!(&store.read_blob_bytes(&digest, 11).await.unwrap()[..], b"hello world");
            let part: Vec<Bytes> =
                store.read_blob(&digest, 11, Some(ByteRange { start: 6, end: 9 })).await.unwrap().try_collect().await.unwrap();
            assert_eq!(part.concat(), b"worl");
            assert!(store.staged_uploads().await.unwrap().is_empty());
        }
    }

    /// Bytes a failed chunk left after the recorded ones never become part of the
    /// blob, even when the upload is completed without another chunk.
    #[tokio::test]
    async fn failed_chunk_tail_is_not_published() {
        for (store, _dir) in stores().await {
            let id = UploadId::random();
            let mut staging = Staging::default();
            let mut d = Digester::new(DigestAlgorithm::Sha256);
            let n = store.write_chunk(&id, &mut staging, 0, chunks(&[b"hello ", b"world"]), &mut d, u64::MAX).await.unwrap();
            // The bytes reach the staging file before the client's stream breaks.
            let failing = Box::pin(futures::stream::iter(vec![Ok(Bytes::from(vec![b'x'; 3 << 20]))]).chain(futures::stream::once(async {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                Err("reset".to_string())
            })));
            let mut d_fail = d.clone();
            assert!(store.write_chunk(&id, &mut staging, n, failing, &mut d_fail, u64::MAX).await.is_err());
            let digest = d.finish();
            store.commit_upload(&id, &staging, n, &digest).await.unwrap();
            assert_eq!(store.stat_blob(&digest).await.unwrap(), Some(n));
            assert_eq!(&store.read_blob_bytes(&digest, n).await.unwrap()[..], b"hello world");
            assert!(store.staged_uploads().await.unwrap().is_empty());
        }
    }

    /// A blob written in place is invisible until published, and only bytes that
    /// hash to its digest are published; one refused, discarded or cut off
    /// mid-body never appears. Small (one request to S3) and large (a multipart
    /// upload) alike.
    #[tokio::test]
    async fn blobs_written_in_place_appear_only_once_verified_and_published() {
        let mut in_place = 0;
        for (store, _dir) in stores().await {
            if !store.writes_in_place() {
                let mut d = Digester::new(DigestAlgorithm::Sha256);
                let refused = store.write_unpublished(&Digest::sha256(b"x"), chunks(&[b"x"]), &mut d, u64::MAX).await;
                assert!(refused.is_err(), "a store that stages uploads does not write them in place");
                continue;
            }
            in_place += 1;
            for size in [11usize, (13 << 20) + 7] {
                let data = Bytes::from((0..size).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[1]).collect::<Vec<u8>>());
                let pieces = |b: Bytes| {
                    futures::stream::iter((0..b.len()).step_by(65_537).map(move |i| Ok::<_, String>(b.slice(i..(i + 65_537).min(b.len())))))
                };
                let digest = Digest::sha256(&data);
                let write = || {
                    let (store, digest, data) = (store.clone(), digest.clone(), data.clone());
                    async move {
                        let mut d = Digester::new(DigestAlgorithm::Sha256);
                        (store.write_unpublished(&digest, pieces(data), &mut d, u64::MAX).await, d)
                    }
                };
                // Discarded: never visible.
                let (r, _) = write().await;
                let (n, unpublished) = r.unwrap();
                assert_eq!((n, unpublished.computed()), (size as u64, &digest));
                assert_eq!(store.stat_blob(&digest).await.unwrap(), None, "visible before it was published");
                unpublished.discard().await;
                assert_eq!(store.stat_blob(&digest).await.unwrap(), None);
                // Cut off mid-body: an error, nothing visible.
                let broken = pieces(data.slice(..size / 2)).chain(futures::stream::iter([Err("reset".to_string())]));
                let mut d = Digester::new(DigestAlgorithm::Sha256);
                assert!(store.write_unpublished(&digest, broken, &mut d, u64::MAX).await.is_err());
                assert_eq!(store.stat_blob(&digest).await.unwrap(), None);
                // Bytes that are not the digest: publishing refuses them.
                let other = Digest::sha256(b"something else");
                let mut d = Digester::new(DigestAlgorithm::Sha256);
                let (_, wrong) = store.write_unpublished(&other, pieces(data.clone()), &mut d, u64::MAX).await.unwrap();
                assert_eq!(wrong.computed(), &digest);
                assert!(wrong.publish().await.is_err());
                assert_eq!(store.stat_blob(&other).await.unwrap(), None);
                // Too large for the limit: refused while it arrives.
                let mut d = Digester::new(DigestAlgorithm::Sha256);
                let over = store.write_unpublished(&digest, pieces(data.clone()), &mut d, size as u64 - 1).await;
                assert!(matches!(over, Err(StorageError::TooLarge)));
                assert_eq!(store.stat_blob(&digest).await.unwrap(), None);
                // Verified and published: visible, exact, and nothing staged.
                let (r, d) = write().await;
                assert_eq!(d.finish(), digest, "the caller's digester saw every byte");
                r.unwrap().1.publish().await.unwrap();
                assert_eq!(store.stat_blob(&digest).await.unwrap(), Some(size as u64));
                assert_eq!(store.read_blob_bytes(&digest, size as u64).await.unwrap(), data);
                assert!(store.staged_uploads().await.unwrap().is_empty());
                // The same blob written again and given up leaves the stored one be.
                let (r, _) = write().await;
                r.unwrap().1.discard().await;
                assert_eq!(store.read_blob_bytes(&digest, size as u64).await.unwrap(), data);
            }
        }
        assert!(in_place >= 1, "the memory store writes in place");
    }

    /// Staged parts are published by server-side copies where the store has them
    /// (S3's UploadPartCopy), a part larger than a copy piece in several pieces,
    /// and parts under the store's least part size streamed in between: the
    /// blob is the parts' bytes in order, whatever their sizes.
    #[tokio::test]
    async fn staged_parts_publish_exactly_by_copies_in_pieces() {
        for (mut store, _dir) in stores().await {
            store.copy_piece = (5 << 20) + 3;
            let sizes: &[&[usize]] = &[&[(12 << 20) + 5, 1 << 20, 7 << 20, 3], &[(12 << 20) + 5], &[6 << 20, 6 << 20]];
            for (n, sizes) in sizes.iter().enumerate() {
                let total: usize = sizes.iter().sum();
                let data =
                    Bytes::from((0..total).map(|i| ((i as u32 ^ n as u32).wrapping_mul(2_654_435_761) >> 11) as u8).collect::<Vec<u8>>());
                let (id, mut staging, mut d, mut at) =
                    (UploadId::random(), Staging::default(), Digester::new(DigestAlgorithm::Sha256), 0u64);
                for size in sizes.iter() {
                    let chunk = data.slice(at as usize..at as usize + size);
                    let body = futures::stream::iter(
                        (0..chunk.len()).step_by(1 << 20).map(|i| Ok::<_, String>(chunk.slice(i..(i + (1 << 20)).min(chunk.len())))),
                    );
                    at += store.write_chunk(&id, &mut staging, at, body, &mut d, u64::MAX).await.unwrap();
                }
                let digest = d.finish();
                assert_eq!(digest, Digest::sha256(&data));
                store.commit_upload(&id, &staging, at, &digest).await.unwrap();
                assert_eq!(store.stat_blob(&digest).await.unwrap(), Some(total as u64));
                let whole: Vec<Bytes> = store.read_blob(&digest, total as u64, None).await.unwrap().try_collect().await.unwrap();
                assert!(whole.concat() == data[..], "parts {sizes:?} published out of order or incomplete");
                assert!(store.staged_uploads().await.unwrap().is_empty());
            }
        }
    }

    /// A store that stops answering fails each request at its deadline (after
    /// the retries) instead of holding it for as long as the store stalls; once
    /// it answers again, what was stored is intact and a cut-off commit
    /// completes.
    #[tokio::test]
    async fn a_stalled_store_fails_requests_instead_of_holding_them() {
        let Some(bin) = std::env::var_os(berth_testkit::ENV_GARAGE) else {
            assert!(!berth_testkit::s3_wanted());
            eprintln!("no S3 store: set {} to a garage binary (.ci/run builds it)", berth_testkit::ENV_GARAGE);
            return;
        };
        let dir = std::env::temp_dir().join(format!("berth-garage-stall-{}", UploadId::random()));
        let g = berth_testkit::Garage::start(std::path::Path::new(&bin), &dir);
        let config = |request_timeout_secs| StorageConfig::S3 {
            bucket: g.bucket.clone(),
            endpoint: Some(g.endpoint.clone()),
            region: Some(g.region.clone()),
            root: None,
            access_key_id: Some(g.access_key_id.clone()),
            secret_access_key: Some(g.secret_access_key.clone()),
            request_timeout_secs,
        };
        // What is stored before the stall goes through the default deadline (a
        // busy machine may take more than a second); the stalled requests
        // through a handle with a short one.
        let (store, hasty) = (BlobStore::open(&config(60)).await.unwrap(), BlobStore::open(&config(1)).await.unwrap());
        let kept = Bytes::from_static(b"stored before the stall");
        let kept_digest = Digest::sha256(&kept);
        store.put_blob(&kept_digest, kept.clone()).await.unwrap();
        let staged = Bytes::from(vec![7u8; 6 << 20]);
        let (id, mut staging, mut d) = (UploadId::random(), Staging::default(), Digester::new(DigestAlgorithm::Sha256));
        let n = store
            .write_chunk(&id, &mut staging, 0, futures::stream::iter([Ok::<_, String>(staged.clone())]), &mut d, u64::MAX)
            .await
            .unwrap();
        let staged_digest = d.finish();

        g.pause();
        let fresh = Bytes::from_static(b"sent while the store stalls");
        let fresh_digest = Digest::sha256(&fresh);
        let stalled = async {
            tokio::join!(
                hasty.probe(),
                hasty.stat_blob(&kept_digest),
                hasty.read_blob_bytes(&kept_digest, kept.len() as u64),
                hasty.read_blob(&kept_digest, kept.len() as u64, None),
                async {
                    let mut d = Digester::new(DigestAlgorithm::Sha256);
                    let (_, unpublished) =
                        hasty.write_unpublished(&fresh_digest, chunks(&[b"sent while the store stalls"]), &mut d, u64::MAX).await?;
                    unpublished.publish().await
                },
                hasty.commit_upload(&id, &staging, n, &staged_digest),
            )
        };
        // Not a timing assertion: a bound far past the deadlines and retries
        // (five 1 s attempts, about 15 s of backoff), to fail instead of hang.
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(240), stalled).await;
        g.resume();
        let (probe, stat, read, streamed, put, commit) = outcome.expect("requests to a stalled store were held, not failed");
        assert!(probe.is_err(), "the probe of a stalled store succeeded");
        assert!(stat.is_err() && read.is_err(), "a stat or read of a stalled store succeeded");
        // A streamed read fails before its stream is handed out (so before an
        // answer begins), as a store out of reach: the registry's 503.
        assert!(matches!(&streamed, Err(e) if e.is_unavailable()), "a streamed read of a stalled store did not fail as unavailable");
        assert!(put.is_err() && commit.is_err(), "a write to a stalled store succeeded");

        store.probe().await.unwrap();
        assert_eq!(store.read_blob_bytes(&kept_digest, kept.len() as u64).await.unwrap(), kept);
        store.commit_upload(&id, &staging, n, &staged_digest).await.unwrap();
        assert_eq!(store.read_blob_bytes(&staged_digest, n).await.unwrap(), staged);
    }

    /// An upload of no bytes at all publishes the empty blob.
    #[tokio::test]
    async fn empty_upload_publishes_empty_blob() {
        for (store, _dir) in stores().await {
            let id = UploadId::random();
            let digest = Digester::new(DigestAlgorithm::Sha256).finish();
            store.commit_upload(&id, &Staging::default(), 0, &digest).await.unwrap();
            assert_eq!(store.stat_blob(&digest).await.unwrap(), Some(0));
            assert!(store.read_blob_bytes(&digest, 0).await.unwrap().is_empty());
        }
    }

    /// Large, oddly sized chunks cross the write-behind windows and the read slices;
    /// ranges that straddle slice boundaries come back exact.
    #[tokio::test]
    async fn large_blob_crosses_windows_and_slices() {
        for (store, _dir) in stores().await {
            let data: Vec<u8> = (0..(13 << 20) + 7u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            let data = Bytes::from(data);
            let split = (9 << 20) + 3;
            let id = UploadId::random();
            let mut staging = Staging::default();
            let mut d = Digester::new(DigestAlgorithm::Sha256);
            let pieces = |b: Bytes| {
                futures::stream::iter((0..b.len()).step_by(65_537).map(move |i| Ok::<_, String>(b.slice(i..(i + 65_537).min(b.len())))))
            };
            let n1 = store.write_chunk(&id, &mut staging, 0, pieces(data.slice(..split)), &mut d, u64::MAX).await.unwrap();
            let n2 = store.write_chunk(&id, &mut staging, n1, pieces(data.slice(split..)), &mut d, u64::MAX).await.unwrap();
            assert_eq!(n1 + n2, data.len() as u64);
            let digest = d.finish();
            assert_eq!(digest, Digest::sha256(&data));
            store.commit_upload(&id, &staging, n1 + n2, &digest).await.unwrap();
            let whole: Vec<Bytes> = store.read_blob(&digest, n1 + n2, None).await.unwrap().try_collect().await.unwrap();
            assert_eq!(whole.concat(), &data[..]);
            for (start, end) in [(0u64, 0u64), (4 << 20, 4 << 20), ((4 << 20) - 1, (8 << 20) + 1), (5, (13 << 20) + 6)] {
                let part: Vec<Bytes> =
                    store.read_blob(&digest, n1 + n2, Some(ByteRange { start, end })).await.unwrap().try_collect().await.unwrap();
                assert_eq!(part.concat(), &data[start as usize..=end as usize], "range {start}-{end}");
            }
        }
    }

    /// With direct I/O the staged bytes bypass the page cache (heads and tails of
    /// unaligned chunks go through it), and direct reads return exact ranges,
    /// including ones that start and end off the alignment and cross read pieces.
    #[tokio::test]
    async fn direct_io_writes_and_reads_exact_bytes() {
        let dir = tempdir::Dir::new();
        let probe = std::path::Path::new(dir.path()).join("probe");
        std::fs::write(&probe, b"").unwrap();
        if direct::open(&probe, true).unwrap().is_none() {
            eprintln!("filesystem refuses O_DIRECT: nothing to check here");
            return;
        }
        let store = BlobStore::open(&StorageConfig::fs(dir.path())).await.unwrap();
        let local = store.local.clone().unwrap();
        let len = 2 * direct::BUF + 4099;
        let data = Bytes::from((0..len as u32).map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8).collect::<Vec<u8>>());
        let split = (1 << 20) + 5;
        let id = UploadId::random();
        let mut staging = Staging::default();
        let mut d = Digester::new(DigestAlgorithm::Sha256);
        let pieces = |b: Bytes| {
            futures::stream::iter((0..b.len()).step_by(100_003).map(move |i| Ok::<_, String>(b.slice(i..(i + 100_003).min(b.len())))))
        };
        let n1 = store.write_chunk(&id, &mut staging, 0, pieces(data.slice(..split)), &mut d, u64::MAX).await.unwrap();
        let n2 = store.write_chunk(&id, &mut staging, n1, pieces(data.slice(split..)), &mut d, u64::MAX).await.unwrap();
        let digest = d.finish();
        assert_eq!(digest, Digest::sha256(&data));
        store.commit_upload(&id, &staging, n1 + n2, &digest).await.unwrap();
        let key = layout::blob(&digest);
        assert!(!local.cached(&key), "direct writes leave the blob out of the page cache");
        let b = direct::BUF as u64;
        for (start, end) in [(0, len as u64), (1, 4097), (4096, 8192), (b - 1, b + 1), (5, len as u64 - 3), (2 * b, len as u64)] {
            let got: Vec<Bytes> = local.read_direct(&key, start, end).unwrap().try_collect().await.unwrap();
            assert_eq!(got.concat(), &data[start as usize..end as usize], "range {start}..{end}");
        }
        // The store picks direct reads for an uncached blob; the bytes are the same.
        let whole: Vec<Bytes> = store.read_blob(&digest, data.len() as u64, None).await.unwrap().try_collect().await.unwrap();
        assert_eq!(whole.concat(), &data[..]);
        assert!(!local.cached(&key), "a first cold read does not fill the page cache");
        // A second read goes through the page cache, which then keeps the blob.
        let again: Vec<Bytes> = store.read_blob(&digest, data.len() as u64, None).await.unwrap().try_collect().await.unwrap();
        assert_eq!(again.concat(), &data[..]);
        assert!(local.cached(&key), "a blob read twice ends up in the page cache");
    }

    /// Concurrent uploads that together (and batch by batch) want more than the
    /// shared in-flight budget all complete with the right content, and every
    /// permit is returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_share_a_bounded_in_flight_budget() {
        for (store, _dir) in stores().await {
            let store = Arc::new(store.with_in_flight(256, 128));
            let tasks: Vec<_> = (0..6u32)
                .map(|n| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let data = Bytes::from((0..(1 << 20) + n * 4099).map(|i| (i ^ n).wrapping_mul(31) as u8).collect::<Vec<u8>>());
                        let frames = futures::stream::iter(
                            (0..data.len())
                                .step_by(50_000)
                                .map(|i| Ok::<_, String>(data.slice(i..(i + 50_000).min(data.len()))))
                                .collect::<Vec<_>>(),
                        );
                        let id = UploadId::random();
                        let mut staging = Staging::default();
                        let mut d = Digester::new(DigestAlgorithm::Sha256);
                        let n = store.write_chunk(&id, &mut staging, 0, frames, &mut d, u64::MAX).await.unwrap();
                        let digest = d.finish();
                        assert_eq!(digest, Digest::sha256(&data));
                        store.commit_upload(&id, &staging, n, &digest).await.unwrap();
                        assert_eq!(store.read_blob_bytes(&digest, n).await.unwrap(), data);
                    })
                })
                .collect();
            let all = async {
                for t in tasks {
                    t.await.unwrap();
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(60), all).await.expect("uploads must not wait on each other forever");
            assert_eq!(store.in_flight.available_permits(), 256, "every in-flight permit is returned");
        }
    }

    #[tokio::test]
    async fn size_limit_and_missing() {
        for (store, _dir) in stores().await {
            let id = UploadId::random();
            let mut staging = Staging::default();
            let mut d = Digester::new(DigestAlgorithm::Sha256);
            let e = store.write_chunk(&id, &mut staging, 0, chunks(&[b"0123456789"]), &mut d, 5).await.unwrap_err();
            assert!(matches!(e, StorageError::TooLarge));
            assert_eq!(store.stat_blob(&Digest::sha256(b"nope")).await.unwrap(), None);
            assert!(matches!(store.read_blob_bytes(&Digest::sha256(b"nope"), 4).await, Err(StorageError::NotFound)));
            assert!(matches!(store.read_blob_bytes(&Digest::sha256(b"nope"), 0).await, Err(StorageError::NotFound)));
            // A streamed read of a missing blob fails before any byte is handed out.
            assert!(matches!(store.read_blob(&Digest::sha256(b"nope"), 4, None).await, Err(StorageError::NotFound)));
            assert!(matches!(
                store.read_blob(&Digest::sha256(b"nope"), 4, Some(ByteRange { start: 1, end: 2 })).await,
                Err(StorageError::NotFound)
            ));
            store.delete_upload(&id).await.unwrap();
        }
    }

    /// A minimal self-cleaning temporary directory.
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!("berth-storage-test-{}", berth_oci::UploadId::random()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &str {
                self.0.to_str().unwrap()
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
