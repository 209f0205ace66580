//! The inventory's store: `workers.redb` in the data directory, and the task that samples the
//! sessions and writes the changes in the background.
//!
//! redb rather than SQLite: pure Rust (no C build), one file, and copy-on-write B-trees whose
//! two-phase commit is atomic, so a crash at any moment leaves the last committed state and there
//! is no journal to replay. A commit is durable (fsynced) when it returns.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::{backends::InMemoryBackend, Builder, Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::time::{interval, interval_at, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{decay, unix_now, Inventory, Worker, WorkerState, HASHES_PER_DIFFICULTY, HASHRATE_TAUS};
use crate::config::{InventoryConfig, StoreErrorPolicy};
use crate::registry::ConnectionManager;

/// Worker name → its [`Record`] as JSON.
const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
/// (worker name, unix seconds) → hashes per second over the point's interval.
const HISTORY: TableDefinition<(&str, u64), f64> = TableDefinition::new("history");
/// redb's page cache: the store is written in batches and read rarely.
const CACHE_BYTES: usize = 1024 * 1024;
/// How long the history is kept.
const HISTORY_SPAN: u64 = 86_400;
pub const FILE_NAME: &str = "workers.redb";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the worker store {path}: {reason} (set inventory.data_dir to a writable directory, or inventory.on_store_error = \"memory\" to run without it)", path = .path.display())]
    Open { path: PathBuf, reason: String },
    #[error("worker store: {0}")]
    Db(Box<redb::Error>),
    /// The runtime shut down before the store's work on its blocking pool ran.
    #[error("worker store: the runtime stopped before the work ran")]
    Cancelled,
}

/// Runs `work` on the blocking pool, where a database's file I/O belongs.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(StoreError::Cancelled),
    }
}

fn db_error(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

/// A worker as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    first_seen: u32,
    last_seen: u32,
    last_share: u32,
    address: Option<IpAddr>,
    pub(super) pool: Option<String>,
    difficulty: f64,
    dsps: [f64; 3],
    accepted: u64,
    rejected_by: [u32; 7],
    pool_accepted: u64,
    pool_rejected: u64,
    reconnects: [u16; 24],
    reconnect_hour: u32,
    /// When it was written: the hashrates decay from here over the time the proxy was down.
    saved_at: u32,
}

impl Record {
    fn of(worker: &Worker, pool: Option<&str>, now: u32) -> Self {
        Record {
            first_seen: worker.first_seen,
            last_seen: worker.last_seen,
            last_share: worker.last_share,
            address: worker.address,
            pool: pool.map(str::to_owned),
            difficulty: worker.difficulty,
            dsps: worker.dsps,
            accepted: worker.accepted,
            rejected_by: worker.rejected_by,
            pool_accepted: worker.pool_accepted,
            pool_rejected: worker.pool_rejected,
            reconnects: worker.reconnects,
            reconnect_hour: worker.reconnect_hour,
            saved_at: now,
        }
    }

    /// The worker it was, not seen since this start; `pool` is set by the caller.
    pub(super) fn into_worker(self, now: u32) -> Worker {
        let down = f64::from(now.saturating_sub(self.saved_at));
        let mut worker = Worker::new(self.first_seen);
        worker.state = WorkerState::NeverSeen;
        worker.dirty = false;
        worker.last_seen = self.last_seen;
        worker.last_share = self.last_share;
        worker.online_since = self.last_seen;
        worker.address = self.address;
        worker.difficulty = self.difficulty;
        worker.dsps = std::array::from_fn(|i| decay(self.dsps[i], 0.0, down, HASHRATE_TAUS[i]));
        worker.accepted = self.accepted;
        worker.rejected_by = self.rejected_by;
        worker.pool_accepted = self.pool_accepted;
        worker.pool_rejected = self.pool_rejected;
        worker.reconnects = self.reconnects;
        worker.reconnect_hour = self.reconnect_hour;
        worker
    }
}

/// The open database, or none once closed at shutdown.
#[derive(Debug)]
pub struct Store {
    db: Mutex<Option<Arc<Database>>>,
    /// The file, or `memory` for a store that is not kept.
    path: String,
}

/// What one flush writes.
#[derive(Default)]
struct Batch {
    records: Vec<(Box<str>, Vec<u8>)>,
    removed: Vec<Box<str>>,
    points: Vec<(Box<str>, f64)>,
    /// Workers whose history older than `cutoff` is dropped.
    prune: Vec<Box<str>>,
    at: u64,
}

impl Store {
    /// Opens (or creates) the store, with its records; or, as `on_store_error` says, an
    /// in-memory store with none.
    pub(super) fn open(config: &InventoryConfig) -> Result<(Store, Vec<(String, Record)>), StoreError> {
        let path = Path::new(&config.data_dir).join(FILE_NAME);
        match open_file(&path).and_then(|db| Ok((load(&db)?, db))) {
            Ok((records, db)) => {
                Ok((Store { db: Mutex::new(Some(Arc::new(db))), path: path.display().to_string() }, records))
            }
            Err(e) if config.on_store_error == StoreErrorPolicy::Memory => {
                tracing::warn!(error = %e, "the worker inventory is kept in memory only and will be lost on restart");
                let db = Builder::new().create_with_backend(InMemoryBackend::new()).map_err(db_error)?;
                create_tables(&db)?;
                Ok((Store { db: Mutex::new(Some(Arc::new(db))), path: "memory".into() }, Vec::new()))
            }
            Err(e) => Err(e),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn db(&self) -> Option<Arc<Database>> {
        self.db.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Closes the file; later writes are dropped. The last flush has been made.
    fn close(&self) {
        self.db.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// `name`'s points from `cutoff` on, oldest first.
    pub async fn history(&self, name: &str, cutoff: u64) -> Result<Vec<(u64, f64)>, StoreError> {
        let Some(db) = self.db() else { return Ok(Vec::new()) };
        let name = name.to_owned();
        let read = move || -> Result<Vec<(u64, f64)>, StoreError> {
            let tx = db.begin_read().map_err(db_error)?;
            let table = tx.open_table(HISTORY).map_err(db_error)?;
            let mut points = Vec::new();
            for entry in table.range((name.as_str(), cutoff)..=(name.as_str(), u64::MAX)).map_err(db_error)? {
                let (key, value) = entry.map_err(db_error)?;
                points.push((key.value().1, value.value()));
            }
            Ok(points)
        };
        blocking(read).await
    }

    /// Writes `batch` in one durable transaction.
    async fn write(&self, batch: Batch) -> Result<(), StoreError> {
        let Some(db) = self.db() else { return Ok(()) };
        let write = move || -> Result<(), StoreError> {
            let mut tx = db.begin_write().map_err(db_error)?;
            // The allocator state goes with each commit, so that opening after a crash needs no
            // walk of the whole file.
            tx.set_quick_repair(true);
            {
                let mut workers = tx.open_table(WORKERS).map_err(db_error)?;
                let mut history = tx.open_table(HISTORY).map_err(db_error)?;
                for name in &batch.removed {
                    workers.remove(&**name).map_err(db_error)?;
                    history.retain_in((&**name, 0)..=(&**name, u64::MAX), |_, _| false).map_err(db_error)?;
                }
                for (name, record) in &batch.records {
                    workers.insert(&**name, record.as_slice()).map_err(db_error)?;
                }
                for (name, hashrate) in &batch.points {
                    history.insert((&**name, batch.at), *hashrate).map_err(db_error)?;
                }
                let cutoff = batch.at.saturating_sub(HISTORY_SPAN);
                for name in &batch.prune {
                    history.retain_in((&**name, 0)..(&**name, cutoff), |_, _| false).map_err(db_error)?;
                }
            }
            tx.commit().map_err(db_error)
        };
        blocking(write).await
    }
}

fn open_file(path: &Path) -> Result<Database, StoreError> {
    let failed = |reason: String| StoreError::Open { path: path.to_owned(), reason };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
    }
    let mut db = Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(|e| failed(e.to_string()))?;
    // Space freed by forgotten workers and pruned history goes back to the file system.
    if let Err(e) = db.compact() {
        tracing::warn!(error = %e, path = %path.display(), "could not compact the worker store");
    }
    create_tables(&db).map_err(|e| failed(e.to_string()))?;
    Ok(db)
}

fn create_tables(db: &Database) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(db_error)?;
    tx.open_table(WORKERS).map_err(db_error)?;
    tx.open_table(HISTORY).map_err(db_error)?;
    tx.commit().map_err(db_error)
}

fn load(db: &Database) -> Result<Vec<(String, Record)>, StoreError> {
    let tx = db.begin_read().map_err(db_error)?;
    let table = tx.open_table(WORKERS).map_err(db_error)?;
    let mut records = Vec::new();
    for entry in table.iter().map_err(db_error)? {
        let (name, record) = entry.map_err(db_error)?;
        match serde_json::from_slice::<Record>(record.value()) {
            Ok(record) => records.push((name.value().to_owned(), record)),
            Err(e) => tracing::warn!(worker = name.value(), error = %e, "skipping an unreadable worker record"),
        }
    }
    Ok(records)
}

impl Inventory {
    /// Samples the sessions every [`super::SAMPLE_INTERVAL`], commits the changes every
    /// `flush_interval`, and every `history_interval` writes a hashrate point per online worker,
    /// prunes the history and forgets the workers gone past `worker_forget_after`. Returns on
    /// `stop`; [`Inventory::shutdown`] makes the last flush.
    pub async fn run(self: Arc<Self>, registry: Arc<ConnectionManager>, stop: CancellationToken) {
        let mut sample = interval(super::SAMPLE_INTERVAL);
        let mut flush = interval(self.flush_interval);
        let mut point = interval_at(Instant::now() + self.history_interval, self.history_interval);
        for timer in [&mut sample, &mut flush, &mut point] {
            timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = sample.tick() => self.sample(&registry),
                _ = flush.tick() => self.flush(false).await,
                _ = point.tick() => self.flush(true).await,
            }
        }
    }

    /// The last sample and flush, after the sessions have closed; then the store is closed.
    pub async fn shutdown(&self, registry: &ConnectionManager) {
        self.sample(registry);
        self.flush(false).await;
        self.store.close();
    }

    /// Commits what changed; with `points`, also the history point and the forgetting.
    async fn flush(&self, points: bool) {
        let mut batch = Batch::default();
        let now = unix_now();
        batch.at = u64::from(now);
        {
            let mut inner = self.lock();
            if points {
                let interval = self.history_interval.as_secs_f64();
                let forget_after = inner.timing.forget_after;
                let mut forget = Vec::new();
                for (name, worker) in inner.workers.iter_mut() {
                    if worker.state.is_live() {
                        // Its `last_seen`, kept current in memory, reaches the store here too.
                        worker.dirty = true;
                        batch.points.push((name.clone(), worker.work_point * HASHES_PER_DIFFICULTY / interval));
                    } else if worker.sessions == 0 && u64::from(now.saturating_sub(worker.last_seen)) >= forget_after {
                        forget.push(name.clone());
                    }
                    worker.work_point = 0.0;
                    batch.prune.push(name.clone());
                }
                for name in forget {
                    let (name, worker) = inner.workers.remove_entry(&name).expect("listed above");
                    tracing::info!(worker = &*name, "forgetting a worker not seen for inventory.worker_forget_after");
                    self.forgotten(&mut inner, name, worker.state);
                }
            }
            batch.removed = std::mem::take(&mut inner.removed);
        }
        // In transactions of at most FLUSH_CHUNK workers: what a flush holds in memory at once
        // does not grow with the farm.
        loop {
            {
                let mut inner = self.lock();
                let inner = &mut *inner;
                for (name, worker) in inner.workers.iter_mut().filter(|(_, w)| w.dirty).take(FLUSH_CHUNK) {
                    worker.dirty = false;
                    let pool = inner.pools.get(usize::from(worker.pool)).map(|p| &**p);
                    let record = serde_json::to_vec(&Record::of(worker, pool, now)).expect("a record serializes");
                    batch.records.push((name.clone(), record));
                }
            }
            let more = batch.records.len() == FLUSH_CHUNK;
            if batch.records.is_empty() && batch.removed.is_empty() && batch.points.is_empty() && batch.prune.is_empty()
            {
                return;
            }
            let (names, removed): (Vec<_>, _) =
                (batch.records.iter().map(|(n, _)| n.clone()).collect(), batch.removed.clone());
            if let Err(e) = self.store.write(std::mem::take(&mut batch)).await {
                tracing::error!(error = %e, "cannot write the worker store; retrying with the next flush");
                let mut inner = self.lock();
                for name in names {
                    if let Some(worker) = inner.workers.get_mut(&name) {
                        worker.dirty = true;
                    }
                }
                inner.removed.extend(removed);
                return;
            }
            if !more {
                return;
            }
            batch.at = u64::from(now);
        }
    }
}

/// Workers written in one transaction.
const FLUSH_CHUNK: usize = 512;

/// How long a flush may take before the shutdown stops waiting for it.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(10);
