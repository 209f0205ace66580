//! Aggregate mode: many miners share one pool session.
//!
//! Each pool session is a [`group`]: one task that holds the connection to the best healthy
//! pool, translates its jobs for miners and forwards their shares. A miner joins a group with an
//! extranonce1 *prefix* P of its own; the group's jobs carry `coinb1 ‖ E1_up` as their coinb1,
//! so the miner's coinbase is the pool's with extranonce2 = P ‖ en2 (‖ zero padding, which is
//! put in front of coinb2 when the miner's extranonce2 is shorter than the pool leaves room for).
//! Because P never depends on the pool, a group moves to another pool with one new difficulty and
//! one clean job per miner: no miner reconnects.
//!
//! - [`Aggregator`]: admits miners into groups and allocates their prefixes.
//! - [`group`]: one pool session: failover, failback, job translation, share forwarding, with
//!   its connection (`connection`).
//! - [`miner`]: one aggregated miner's seat and its [`MinerSession`](crate::session::MinerSession),
//!   driven by the miner's task in `server::connection`.
//! - `workers`: the workers a group authorizes upstream, kept while miners use them.

mod connection;
pub mod group;
pub mod miner;
mod workers;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::AuthManager;
use crate::config::Config;
use crate::prefix::{Prefix, PrefixAllocator};
use crate::upstream::PoolSet;

pub use group::{Group, Upward, Work};

/// What aggregate mode is configured with; fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub prefix_bytes: usize,
    pub miners_per_upstream: usize,
    pub max_upstreams: usize,
    pub worker_passthrough: bool,
    pub failback_after: Duration,
    pub job_timeout: Duration,
    pub submit_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_reject_rate: f64,
    pub allow_pool_redirect: bool,
    /// How long a group may take on shutdown to send what miners queued and hear the answers.
    pub shutdown_grace: Duration,
}

impl Settings {
    pub fn new(config: &Config) -> Self {
        let (a, u) = (&config.aggregate, &config.upstream);
        Self {
            prefix_bytes: a.prefix_bytes,
            miners_per_upstream: a.miners_per_upstream,
            max_upstreams: a.max_upstreams,
            worker_passthrough: a.worker_passthrough,
            failback_after: u.failback_after(),
            job_timeout: u.job_timeout(),
            submit_timeout: u.submit_timeout(),
            connect_timeout: u.connect_timeout(),
            max_reject_rate: u.max_reject_rate,
            allow_pool_redirect: u.allow_pool_redirect,
            shutdown_grace: config.server.shutdown_grace(),
        }
    }
}

/// Why a miner could not be given a seat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no upstream pool available, retry later")]
    NoUpstream,
    #[error("proxy full: every upstream session is at aggregate.miners_per_upstream")]
    Full,
}

/// What the groups share: the pools, the credential rewrite and the shutdown signal.
#[derive(Debug)]
pub struct Context {
    settings: ArcSwap<Settings>,
    pub pools: Arc<PoolSet>,
    pub auth: Arc<AuthManager>,
    pub shutdown: CancellationToken,
}

impl Context {
    /// The settings in force now; a reload may change all but `prefix_bytes`.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }
}

/// The groups and the prefixes of the miners in them.
#[derive(Debug)]
pub struct Aggregator {
    context: Arc<Context>,
    groups: Mutex<Vec<Arc<Group>>>,
    prefixes: Mutex<PrefixAllocator>,
    prefix_bytes: usize,
    tracker: TaskTracker,
}

/// A miner's place: its group and its prefix, given back when the miner leaves.
#[derive(Debug)]
pub struct Seat {
    pub group: Arc<Group>,
    pub prefix: Prefix,
    aggregator: Arc<Aggregator>,
    /// The miner's difficulty, counted in its group's work.
    difficulty: f64,
}

impl Seat {
    /// The miner was given a new difficulty.
    pub fn set_difficulty(&mut self, difficulty: f64) {
        self.group.add_difficulty(difficulty - self.difficulty);
        self.difficulty = difficulty;
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.group.add_difficulty(-self.difficulty);
        // The prefix waits out every job its miner could have worked on before anyone reuses it.
        let newest = self.group.newest_job();
        self.aggregator.prefixes.lock().unwrap_or_else(|e| e.into_inner()).release(
            self.prefix,
            self.group.index,
            newest,
        );
        self.group.leave();
    }
}

/// A place `reserve` took in a group, given back when dropped unless it became a [`Seat`] (which
/// gives it back in turn).
struct Reservation(Option<Arc<Group>>);

impl Reservation {
    fn group(&self) -> &Arc<Group> {
        self.0.as_ref().expect("set until into_seat")
    }

    fn into_seat(mut self) -> Arc<Group> {
        self.0.take().expect("set until into_seat")
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(group) = self.0.take() {
            group.leave();
        }
    }
}

impl Aggregator {
    /// Builds the aggregator and opens the first pool session at once, so that the first miner
    /// finds work waiting and `/ready` reflects the pools.
    pub fn start(
        config: &Config,
        pools: Arc<PoolSet>,
        auth: Arc<AuthManager>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        let settings = Settings::new(config);
        let prefixes = PrefixAllocator::new(settings.prefix_bytes);
        let prefix_bytes = settings.prefix_bytes;
        let settings = ArcSwap::from_pointee(settings);
        let context = Arc::new(Context { settings, pools, auth, shutdown });
        let aggregator = Arc::new(Self {
            context,
            groups: Mutex::new(Vec::new()),
            prefixes: Mutex::new(prefixes),
            prefix_bytes,
            tracker,
        });
        aggregator.open_group(&mut aggregator.groups.lock().unwrap_or_else(|e| e.into_inner()));
        aggregator
    }

    /// Opens a group; the caller holds the groups' lock.
    fn open_group(&self, groups: &mut Vec<Arc<Group>>) -> Arc<Group> {
        let (group, task) = Group::new(groups.len(), self.context.clone());
        self.tracker.spawn(task);
        groups.push(group.clone());
        group
    }

    /// The pool sessions open now.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Seats a miner: in the first group with room that has work, else in a new group, and gives
    /// it a prefix. Waits (up to the connect timeout, twice) for a new group's first job.
    ///
    /// Cancel-safe: the caller races it against the miner's deadlines, and a place taken and not
    /// turned into a [`Seat`] is given back wherever the future is dropped.
    pub async fn admit(self: &Arc<Self>) -> Result<Seat, Refused> {
        let reservation = Reservation(Some(self.reserve()?));
        let group = reservation.group();
        let mut work = group.subscribe();
        let wait = self.context.settings().connect_timeout * 2;
        let ready = tokio::time::timeout(wait, work.wait_for(|w| w.is_ready())).await;
        if !matches!(ready, Ok(Ok(_))) {
            return Err(Refused::NoUpstream);
        }
        let groups = self.groups();
        let prefix = self
            .prefixes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate(|g| groups.get(g).and_then(|g| g.oldest_job()));
        match prefix {
            Some(prefix) => {
                Ok(Seat { group: reservation.into_seat(), prefix, aggregator: self.clone(), difficulty: 0.0 })
            }
            None => Err(Refused::Full),
        }
    }

    /// Takes a place in a group: one with work first, then one still connecting, then a new one.
    /// Under the groups' lock, so that miners arriving together open one new group, not several.
    fn reserve(&self) -> Result<Arc<Group>, Refused> {
        let settings = self.context.settings();
        let cap = settings.miners_per_upstream;
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        for ready in [true, false] {
            if let Some(group) = groups.iter().find(|g| g.is_ready() == ready && g.try_join(cap)) {
                return Ok(group.clone());
            }
        }
        if groups.len() >= settings.max_upstreams {
            return Err(Refused::Full);
        }
        let group = self.open_group(&mut groups);
        if group.try_join(cap) {
            Ok(group)
        } else {
            Err(Refused::Full)
        }
    }

    /// Puts reloaded settings in force. `aggregate.prefix_bytes` is fixed for the life of the
    /// process: the miners' extranonce1 depends on it.
    pub fn reconfigure(&self, config: &Config) -> Result<(), String> {
        if config.aggregate.prefix_bytes != self.prefix_bytes {
            return Err("aggregate.prefix_bytes changed, which needs a restart".into());
        }
        self.context.settings.store(Arc::new(Settings::new(config)));
        Ok(())
    }

    /// True when some group has work for miners.
    pub fn ready(&self) -> bool {
        self.groups().iter().any(|g| g.is_ready())
    }

    /// The pool sessions as `/api/v1/pools` shows them.
    pub fn sessions(&self) -> Vec<SessionView> {
        self.groups().iter().map(|g| g.view()).collect()
    }

    /// Live prefixes and prefixes waiting out their quarantine.
    pub fn prefixes(&self) -> (usize, usize) {
        let p = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        (p.live(), p.quarantined())
    }
}

/// One pool session as the API shows it.
#[derive(Debug, Serialize)]
pub struct SessionView {
    pub session: usize,
    /// The pool's label, while the session has one.
    pub pool: Option<String>,
    pub miners: usize,
    /// The extranonce2 size miners of this session work with.
    pub miner_extranonce2_size: usize,
    pub pool_difficulty: f64,
    pub jobs: usize,
}

pub(crate) fn set_gauges(aggregator: &Aggregator) {
    use crate::metrics as m;
    let groups = aggregator.groups();
    for g in &groups {
        metrics::gauge!(m::AGGREGATE_SESSION_MINERS, "session" => g.index.to_string()).set(g.members() as f64);
    }
    let (live, quarantined) = aggregator.prefixes();
    metrics::gauge!(m::AGGREGATE_PREFIXES, "state" => "live").set(live as f64);
    metrics::gauge!(m::AGGREGATE_PREFIXES, "state" => "quarantined").set(quarantined as f64);
    // Each group's pool and miners, read once.
    let on: Vec<_> = groups.iter().filter_map(|g| Some((g.pool()?, g.members()))).collect();
    metrics::gauge!(m::AGGREGATE_SESSIONS).set(on.len() as f64);
    for pool in aggregator.context.pools.pools() {
        let here = on.iter().filter(|(p, _)| Arc::ptr_eq(p, &pool));
        let (sessions, miners) = here.fold((0, 0), |(s, m), (_, n)| (s + 1, m + n));
        metrics::gauge!(m::POOL_ACTIVE, "pool" => pool.label.clone()).set(if sessions > 0 { 1.0 } else { 0.0 });
        metrics::gauge!(m::POOL_MINERS, "pool" => pool.label.clone()).set(miners as f64);
    }
}
