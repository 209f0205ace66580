//! The worker inventory: every worker name ever authorized, its state, counters and hashrates,
//! kept across restarts. Here: the model, its states and the sampler; [`store`]: the redb file
//! and its writer; [`api`]: the JSON views of the admin port.
//!
//! The share path is not touched: sessions count their shares in their own `WorkerStats` (under
//! the lock they already take) and the pool's verdicts in atomics. The inventory learns of a
//! session once when it authorizes and once when it closes (folding in its last counts), and
//! from a sampler that reads each authorized session's counts every [`SAMPLE_INTERVAL`].

pub mod api;
pub mod store;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use metrics::{counter, gauge};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::config::InventoryConfig;
use crate::metrics as m;
use crate::registry::{ConnectionManager, Phase, SessionHandle};
use crate::submissions::Delta;
use store::Store;

/// How often the sampler reads the sessions' counts and decides the workers' states.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);
/// The time constants of the decaying hashrate averages: 10 minutes, 1 hour, 24 hours.
const HASHRATE_TAUS: [f64; 3] = [600.0, 3600.0, 86_400.0];
/// Hashes in a share of difficulty 1.
const HASHES_PER_DIFFICULTY: f64 = 4_294_967_296.0;
/// Reconnects are counted per hour, over the last 24.
const RECONNECT_HOURS: usize = 24;
/// Transitions a slow subscriber may fall behind by before it misses some.
const EVENTS_CAPACITY: usize = 4096;
/// `Worker::pool` for a worker that has had no pool.
const NO_POOL: u16 = u16::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// At least one authorized session is open, or the last one closed within the grace.
    Online,
    /// Online, but without an accepted share for `worker_stale_after`.
    Stale,
    Offline,
    /// Known from the store, not seen since this start.
    NeverSeen,
}

impl WorkerState {
    pub const ALL: [WorkerState; 4] =
        [WorkerState::Online, WorkerState::Stale, WorkerState::Offline, WorkerState::NeverSeen];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Online => "online",
            WorkerState::Stale => "stale",
            WorkerState::Offline => "offline",
            WorkerState::NeverSeen => "never_seen",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Online or stale: a machine that is there.
    pub fn is_live(self) -> bool {
        matches!(self, WorkerState::Online | WorkerState::Stale)
    }
}

/// A worker's change of state, as [`Inventory::subscribe`] sends it and the webhook delivers it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    pub worker: String,
    pub from: WorkerState,
    pub to: WorkerState,
    #[serde(serialize_with = "crate::notify::serialize_time")]
    pub at: SystemTime,
    pub address: Option<IpAddr>,
    pub pool: Option<String>,
}

/// The thresholds that a reload may change.
#[derive(Debug, Clone, Copy)]
struct Timing {
    stale_after: u64,
    offline_after: u64,
    forget_after: u64,
}

impl Timing {
    fn of(config: &InventoryConfig) -> Self {
        Timing {
            stale_after: config.worker_stale_after,
            offline_after: config.worker_offline_after,
            forget_after: config.worker_forget_after,
        }
    }
}

/// One worker in memory. Kept small: a farm has thousands, most of them idle between samples.
/// Times are unix seconds, 0 for never.
#[derive(Debug, Clone)]
struct Worker {
    state: WorkerState,
    /// Changed since the store last took it.
    dirty: bool,
    /// Authorized sessions open now.
    sessions: u16,
    /// An index into [`Inner::pools`], or [`NO_POOL`].
    pool: u16,
    first_seen: u32,
    last_seen: u32,
    last_share: u32,
    /// When it last came online; staleness counts from here while it has no newer share.
    online_since: u32,
    address: Option<IpAddr>,
    /// 0 until a difficulty was set.
    difficulty: f64,
    /// Difficulty-1 shares per second, decaying over [`HASHRATE_TAUS`].
    dsps: [f64; 3],
    /// Accepted difficulty since the last sample, and since the last history point.
    work_sample: f64,
    work_point: f64,
    accepted: u64,
    rejected_by: [u32; 7],
    pool_accepted: u64,
    pool_rejected: u64,
    /// Reconnects per hour; `reconnect_hour` is the hour (since the epoch) of the newest slot.
    reconnects: [u16; RECONNECT_HOURS],
    reconnect_hour: u32,
}

impl Worker {
    fn new(now: u32) -> Self {
        Worker {
            // Until its first authorize moves it: a new worker does not come back online.
            state: WorkerState::NeverSeen,
            dirty: true,
            sessions: 0,
            pool: NO_POOL,
            first_seen: now,
            last_seen: now,
            last_share: 0,
            online_since: now,
            address: None,
            difficulty: 0.0,
            dsps: [0.0; 3],
            work_sample: 0.0,
            work_point: 0.0,
            accepted: 0,
            rejected_by: [0; 7],
            pool_accepted: 0,
            pool_rejected: 0,
            reconnects: [0; RECONNECT_HOURS],
            reconnect_hour: now / 3600,
        }
    }

    fn add(&mut self, delta: &Delta) {
        self.accepted += delta.accepted;
        for (sum, n) in self.rejected_by.iter_mut().zip(delta.rejected_by) {
            *sum = sum.saturating_add(n);
        }
        self.pool_accepted += delta.pool_accepted;
        self.pool_rejected += delta.pool_rejected;
        self.work_sample += delta.work;
        // Staleness is about accepted work: a miner whose every share is refused is not hashing
        // for anyone.
        if delta.accepted > 0 {
            if let Some(at) = delta.last_share {
                self.last_share = self.last_share.max(unix(at));
            }
        }
        self.dirty = true;
    }

    /// Moves the reconnect slots on to `now`'s hour.
    fn roll_reconnects(&mut self, now: u32) {
        let hour = now / 3600;
        let gap = hour.saturating_sub(self.reconnect_hour) as usize;
        if gap >= RECONNECT_HOURS {
            self.reconnects = [0; RECONNECT_HOURS];
        } else if gap > 0 {
            self.reconnects.rotate_right(gap);
            self.reconnects[..gap].fill(0);
        }
        self.reconnect_hour = self.reconnect_hour.max(hour);
    }

    fn reconnects_24h(&self, now: u32) -> u64 {
        let gap = (now / 3600).saturating_sub(self.reconnect_hour) as usize;
        self.reconnects.iter().take(RECONNECT_HOURS.saturating_sub(gap)).map(|&n| u64::from(n)).sum()
    }

    fn hashrate(&self, i: usize) -> f64 {
        self.dsps[i] * HASHES_PER_DIFFICULTY
    }

    /// The state the clock gives it now.
    fn judged(&self, now: u32, timing: &Timing) -> WorkerState {
        let since = |t: u32| u64::from(now.saturating_sub(t));
        let online = self.sessions > 0 || (self.state.is_live() && since(self.last_seen) < timing.offline_after);
        if !online {
            return match self.state {
                WorkerState::NeverSeen => WorkerState::NeverSeen,
                _ => WorkerState::Offline,
            };
        }
        if since(self.last_share.max(self.online_since)) >= timing.stale_after {
            WorkerState::Stale
        } else {
            WorkerState::Online
        }
    }
}

/// An exponentially weighted average of `work` per second that forgets over `tau` seconds, as
/// ckpool's `dsps`; weighted by `exp(-secs / tau)`, so that one long gap (the proxy was down)
/// decays as much as many short ones.
fn decay(average: f64, work: f64, secs: f64, tau: f64) -> f64 {
    if secs <= 0.0 {
        return average;
    }
    let keep = (-secs / tau).exp();
    average * keep + work / secs * (1.0 - keep)
}

fn unix(t: SystemTime) -> u32 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32)
}

fn unix_now() -> u32 {
    unix(SystemTime::now())
}

#[derive(Debug)]
struct Inner {
    workers: HashMap<Box<str>, Box<Worker>>,
    /// Pool labels, interned: a worker keeps an index.
    pools: Vec<Arc<str>>,
    timing: Timing,
    /// Forgotten or deleted workers whose records the store has yet to drop.
    removed: Vec<Box<str>>,
    /// When the hashrates were last decayed, on the monotonic clock.
    last_sample: tokio::time::Instant,
    /// Workers by state, in the order of [`WorkerState::ALL`].
    counts: [usize; 4],
}

impl Inner {
    fn pool_index(&mut self, label: Option<&str>) -> u16 {
        let Some(label) = label else { return NO_POOL };
        if let Some(i) = self.pools.iter().position(|p| &**p == label) {
            return i as u16;
        }
        if self.pools.len() >= usize::from(NO_POOL) {
            return NO_POOL;
        }
        self.pools.push(Arc::from(label));
        (self.pools.len() - 1) as u16
    }

    fn pool_of(&self, worker: &Worker) -> Option<&Arc<str>> {
        self.pools.get(usize::from(worker.pool))
    }
}

/// The inventory, shared by the connection tasks (two calls per connection), the sampler, the
/// store's writer and the admin API.
#[derive(Debug)]
pub struct Inventory {
    /// One lock: taken twice per connection, once per sample, and by API reads; never on a share.
    inner: Mutex<Inner>,
    events: broadcast::Sender<Transition>,
    store: Store,
    flush_interval: Duration,
    history_interval: Duration,
}

/// One worker as the API reads it: a copy, taken under the lock.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub name: String,
    pub state: WorkerState,
    pub first_seen: u32,
    pub last_seen: u32,
    pub last_share: u32,
    pub address: Option<IpAddr>,
    pub pool: Option<Arc<str>>,
    pub difficulty: f64,
    pub hashrates: [f64; 3],
    pub accepted: u64,
    pub rejected_by: [u32; 7],
    pub pool_accepted: u64,
    pub pool_rejected: u64,
    pub reconnects_24h: u64,
    pub sessions: u16,
}

/// Why a worker could not be deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteError {
    Unknown,
    Online,
}

impl Inventory {
    /// Opens the store in `config.data_dir` and loads its workers, each `never_seen`. A store
    /// that cannot be opened is an error, unless `on_store_error = "memory"`.
    pub fn open(config: &InventoryConfig) -> Result<Arc<Inventory>, store::StoreError> {
        let (store, records) = Store::open(config)?;
        let now = unix_now();
        let mut inner = Inner {
            workers: HashMap::with_capacity(records.len()),
            pools: Vec::new(),
            timing: Timing::of(config),
            removed: Vec::new(),
            last_sample: tokio::time::Instant::now(),
            counts: [0; 4],
        };
        for (name, record) in records {
            let pool = inner.pool_index(record.pool.as_deref());
            let mut worker = record.into_worker(now);
            worker.pool = pool;
            inner.workers.insert(name.into_boxed_str(), Box::new(worker));
        }
        inner.counts[WorkerState::NeverSeen as usize] = inner.workers.len();
        for state in WorkerState::ALL {
            gauge!(m::WORKERS, "state" => state.as_str()).set(inner.counts[state as usize] as f64);
        }
        counter!(m::WORKER_OFFLINE_TRANSITIONS).increment(0);
        tracing::info!(workers = inner.workers.len(), path = %store.path(), "worker inventory loaded");
        Ok(Arc::new(Inventory {
            inner: Mutex::new(inner),
            events: broadcast::channel(EVENTS_CAPACITY).0,
            store,
            flush_interval: Duration::from_secs(config.flush_interval),
            history_interval: Duration::from_secs(config.history_interval),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing here panics half-way through a change that matters more than a count.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every state change from now on. A subscriber that falls more than a few thousand behind
    /// is told it lagged (`RecvError::Lagged`) and goes on from there.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.events.subscribe()
    }

    /// The thresholds of a reloaded configuration; the store's settings need a restart.
    pub fn reconfigure(&self, config: &InventoryConfig) {
        self.lock().timing = Timing::of(config);
    }

    /// Workers by state: online, stale, offline, never_seen.
    pub fn counts(&self) -> [usize; 4] {
        self.lock().counts
    }

    /// A session authorized `name`. Called once per authorize, by the session's task.
    pub fn authorized(&self, session: &SessionHandle, name: &str) {
        let (pool, difficulty) = {
            let info = session.info();
            (info.upstream.clone(), info.difficulty)
        };
        let now = unix_now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let pool = inner.pool_index(pool.as_deref());
        let timing = inner.timing;
        let known = inner.workers.contains_key(name);
        if !known {
            inner.workers.insert(name.into(), Box::new(Worker::new(now)));
        }
        let worker = inner.workers.get_mut(name).expect("inserted above");
        let from = worker.state;
        if known && worker.sessions == 0 {
            worker.roll_reconnects(now);
            worker.reconnects[0] = worker.reconnects[0].saturating_add(1);
        }
        if !from.is_live() {
            worker.online_since = now;
        }
        worker.sessions = worker.sessions.saturating_add(1);
        worker.last_seen = now;
        worker.address = Some(session.peer.ip());
        if pool != NO_POOL {
            worker.pool = pool;
        }
        if let Some(d) = difficulty {
            worker.difficulty = d;
        }
        worker.dirty = true;
        let to = worker.judged(now, &timing);
        if !known {
            inner.counts[WorkerState::NeverSeen as usize] += 1;
        }
        self.moved(inner, name, from, to);
    }

    /// A session of `name` closed: its last counts are folded in, so none is lost between
    /// samples. Called once per authorized session, by its task.
    pub fn session_closed(&self, session: &SessionHandle, name: &str) {
        let delta = session.info().stats.take_delta(&session.pool_verdicts);
        let now = unix_now();
        let mut inner = self.lock();
        let Some(worker) = inner.workers.get_mut(name) else { return };
        if let Some(delta) = &delta {
            worker.add(delta);
        }
        worker.sessions = worker.sessions.saturating_sub(1);
        worker.last_seen = now;
        worker.dirty = true;
    }

    /// Records `name`'s move from `from` to `to`: counts, metrics and an event.
    fn moved(&self, inner: &mut Inner, name: &str, from: WorkerState, to: WorkerState) {
        if from == to {
            return;
        }
        let worker = inner.workers.get_mut(name).expect("a worker that moves is known");
        worker.state = to;
        worker.dirty = true;
        let (address, pool) = (worker.address, worker.pool);
        inner.counts[from as usize] -= 1;
        inner.counts[to as usize] += 1;
        for state in [from, to] {
            gauge!(m::WORKERS, "state" => state.as_str()).set(inner.counts[state as usize] as f64);
        }
        if to == WorkerState::Offline {
            counter!(m::WORKER_OFFLINE_TRANSITIONS).increment(1);
        }
        tracing::debug!(worker = name, from = from.as_str(), to = to.as_str(), "worker state");
        // No receiver is not an error: the notifier is optional.
        let _ = self.events.send(Transition {
            worker: name.to_owned(),
            from,
            to,
            at: SystemTime::now(),
            address,
            pool: inner.pools.get(usize::from(pool)).map(|p| p.to_string()),
        });
    }

    /// One sample: the authorized sessions' new counts, the hashrates decayed, the states decided.
    pub fn sample(&self, registry: &ConnectionManager) {
        let sessions = registry.snapshot();
        let now = unix_now();
        let mut inner = self.lock();
        for session in sessions.iter().filter(|s| s.phase() == Phase::Authorized) {
            let mut info = session.info();
            let delta = info.stats.take_delta(&session.pool_verdicts);
            let (difficulty, upstream) = (info.difficulty, info.upstream.clone());
            let Some(name) = info.worker.as_deref() else { continue };
            let pool = inner.pool_index(upstream.as_deref());
            let Some(worker) = inner.workers.get_mut(name) else { continue };
            // Written when something changed: an idle worker's `last_seen` alone waits for the
            // next history point (see `flush`), so that a farm of idle miners is not rewritten
            // every few seconds.
            if let Some(delta) = &delta {
                worker.add(delta);
                worker.dirty = true;
            }
            if worker.sessions > 0 {
                worker.last_seen = now;
                let difficulty = difficulty.unwrap_or(worker.difficulty);
                let pool = if pool == NO_POOL { worker.pool } else { pool };
                if (difficulty, pool) != (worker.difficulty, worker.pool) {
                    (worker.difficulty, worker.pool) = (difficulty, pool);
                    worker.dirty = true;
                }
            }
        }
        let at = tokio::time::Instant::now();
        let secs = at.duration_since(inner.last_sample).as_secs_f64();
        inner.last_sample = at;
        let timing = inner.timing;
        let mut moves = Vec::new();
        for (name, worker) in inner.workers.iter_mut() {
            for (average, tau) in worker.dsps.iter_mut().zip(HASHRATE_TAUS) {
                *average = decay(*average, worker.work_sample, secs, tau);
            }
            worker.work_point += worker.work_sample;
            worker.work_sample = 0.0;
            let to = worker.judged(now, &timing);
            if to != worker.state {
                moves.push((name.clone(), worker.state, to));
            }
        }
        for (name, from, to) in moves {
            self.moved(&mut inner, &name, from, to);
        }
    }

    /// Copies of the workers that `keep` selects, for the API.
    pub fn select(&self, mut keep: impl FnMut(&str, WorkerState) -> bool) -> Vec<Snapshot> {
        let now = unix_now();
        let inner = self.lock();
        inner
            .workers
            .iter()
            .filter(|(name, w)| keep(name, w.state))
            .map(|(name, w)| snapshot(&inner, name, w, now))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Snapshot> {
        let inner = self.lock();
        inner.workers.get(name).map(|w| snapshot(&inner, name, w, unix_now()))
    }

    /// Drops an offline or never-seen worker, here and (with the next flush) from the store.
    pub fn delete(&self, name: &str) -> Result<(), DeleteError> {
        let mut inner = self.lock();
        let worker = inner.workers.get(name).ok_or(DeleteError::Unknown)?;
        if worker.state.is_live() || worker.sessions > 0 {
            return Err(DeleteError::Online);
        }
        let state = worker.state;
        let (name, _) = inner.workers.remove_entry(name).expect("found above");
        self.forgotten(&mut inner, name, state);
        Ok(())
    }

    fn forgotten(&self, inner: &mut Inner, name: Box<str>, state: WorkerState) {
        inner.counts[state as usize] -= 1;
        gauge!(m::WORKERS, "state" => state.as_str()).set(inner.counts[state as usize] as f64);
        inner.removed.push(name);
    }

    /// The worker's hashrate history: (unix seconds, hashes per second), oldest first.
    pub async fn history(&self, name: &str) -> Vec<(u64, f64)> {
        let cutoff = u64::from(unix_now()).saturating_sub(86_400);
        match self.store.history(name, cutoff).await {
            Ok(points) => points,
            Err(e) => {
                tracing::warn!(error = %e, worker = name, "cannot read the hashrate history");
                Vec::new()
            }
        }
    }
}

fn snapshot(inner: &Inner, name: &str, w: &Worker, now: u32) -> Snapshot {
    Snapshot {
        name: name.to_owned(),
        state: w.state,
        first_seen: w.first_seen,
        last_seen: w.last_seen,
        last_share: w.last_share,
        address: w.address,
        pool: inner.pool_of(w).cloned(),
        difficulty: w.difficulty,
        hashrates: [w.hashrate(0), w.hashrate(1), w.hashrate(2)],
        accepted: w.accepted,
        rejected_by: w.rejected_by,
        pool_accepted: w.pool_accepted,
        pool_rejected: w.pool_rejected,
        reconnects_24h: w.reconnects_24h(now),
        sessions: w.sessions,
    }
}

impl Snapshot {
    pub fn rejected(&self) -> u64 {
        self.rejected_by.iter().map(|&n| u64::from(n)).sum()
    }
}

#[cfg(test)]
mod tests;
