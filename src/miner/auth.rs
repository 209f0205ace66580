//! The auth manager: the credentials a miner's `mining.authorize` and `mining.submit` carry
//! upstream, rewritten through `user_template` when one is set, and the backoff after failed
//! authorizes.
//!
//! The backoff is kept per (address, worker): 3 s doubling, capped, as ckpool does. Farms sit
//! behind NAT, so one worker with a bad password must not lock out the others at its address.
//! Above that, an address-wide backstop stops an address that fails at a rate no farm reaches by
//! mistake (many workers, or names rotated to guess passwords); its wait is capped at
//! [`ADDRESS_BACKOFF_MAX`], a pause a farm lives through.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::config::PoolConfig;

/// (address, worker) pairs, and addresses, whose failures are remembered at once; past it, new
/// ones are not tracked until expired entries are pruned.
const MAX_TRACKED: usize = 65_536;

/// Failed authorizes from one address within [`ADDRESS_WINDOW`] that stop the whole address.
/// The per-worker backoff lets one worker fail about 5 times in its first minute, so this takes
/// several failing workers at once, or names rotated to dodge the per-worker wait.
pub const ADDRESS_FAILURES: u32 = 32;
/// The window over which an address's failures are counted.
pub const ADDRESS_WINDOW: Duration = Duration::from_secs(60);
/// The longest an address as a whole is refused: the backstop doubles from
/// `auth_backoff_initial` up to this (or `auth_backoff_max`, if lower).
pub const ADDRESS_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How the pool answered an authorize. Only [`Refused`](Self::Refused) is the miner's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Accepted,
    /// An explicit refusal: `false` with no error, or error 24 (unauthorized worker).
    Refused,
    /// Any other error: the pool's trouble, not the miner's credentials.
    Failed,
}

/// The manager outlives a reload: its settings are replaced, its failure records kept.
#[derive(Debug, Default)]
pub struct AuthManager {
    settings: RwLock<Settings>,
    /// Per (address, worker), the name as a keyed hash: a fixed size per entry, however long the
    /// names a client invents, and no collisions it can aim for.
    workers: DashMap<(IpAddr, u64), Failures>,
    names: RandomState,
    /// The address-wide backstop.
    addresses: DashMap<IpAddr, Address>,
}

#[derive(Debug, Clone, Default)]
struct Settings {
    rewrite: Arc<Rewrite>,
    backoff_initial: Duration,
    backoff_max: Duration,
}

/// How a session rewrites credentials. A session keeps the one it started with, so a reload
/// never changes the name its shares go upstream under.
#[derive(Debug, Default)]
pub struct Rewrite {
    /// `{pool_user}`, `{worker}` and `{user}` are replaced; empty means miners' own credentials.
    template: String,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// No authorize of this worker from this address is forwarded before this.
    until: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Address {
    /// The start of the current counting window, and the failures within it.
    window: Instant,
    in_window: u32,
    /// Times the backstop tripped in a row, for its doubling wait.
    trips: u32,
    /// No authorize from this address is forwarded before this.
    until: Instant,
}

/// The user and password to present upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// `initial` doubled for each failure after the first, up to `max`.
fn doubled(initial: Duration, max: Duration, count: u32) -> Duration {
    initial.saturating_mul(1 << count.saturating_sub(1).min(20)).min(max)
}

impl AuthManager {
    pub fn new(template: &str, backoff_initial: Duration, backoff_max: Duration) -> Self {
        let manager = Self::default();
        manager.reconfigure(template, backoff_initial, backoff_max);
        manager
    }

    /// New settings, from a reloaded configuration; failures already recorded still count.
    pub fn reconfigure(&self, template: &str, backoff_initial: Duration, backoff_max: Duration) {
        let rewrite = Arc::new(Rewrite { template: template.to_owned() });
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = Settings { rewrite, backoff_initial, backoff_max };
    }

    fn settings(&self) -> Settings {
        self.settings.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The credential rewrite in force now.
    pub fn rewrite(&self) -> Arc<Rewrite> {
        self.settings().rewrite
    }

    fn key(&self, ip: IpAddr, worker: &str) -> (IpAddr, u64) {
        (ip, self.names.hash_one(worker))
    }

    /// How long `worker` at `ip` must still wait before its next authorize is forwarded, if at
    /// all: the longer of its own wait and its address's.
    fn backoff(&self, ip: IpAddr, worker: &str, now: Instant) -> Option<Duration> {
        let address = self.addresses.get(&ip).map(|a| a.until);
        let own = self.workers.get(&self.key(ip, worker)).map(|f| f.until);
        let until = address.max(own)?;
        (until > now).then(|| until - now)
    }

    /// The error an authorize of `worker` from `ip` gets while it waits out a backoff; `None`
    /// when it may go to the pool.
    pub fn refusal(&self, ip: IpAddr, worker: &str, now: Instant) -> Option<String> {
        let wait = self.backoff(ip, worker, now)?;
        Some(format!("too many failed authorizations; retry in {} s", wait.as_secs_f64().ceil()))
    }

    /// What the pool answered to an authorize of `worker` from `ip`: a refusal backs the worker
    /// off and counts towards its address's backstop, an acceptance clears the worker's record,
    /// and a pool's failure changes nothing.
    pub fn answered(&self, ip: IpAddr, worker: &str, answer: Answer, now: Instant) {
        match answer {
            Answer::Accepted => self.succeeded(ip, worker),
            Answer::Refused => self.failed(ip, worker, now),
            Answer::Failed => {}
        }
    }

    /// A pool refused `worker` from `ip`: its wait doubles, from `backoff_initial` up to
    /// `backoff_max`, and its address counts one more failure.
    pub fn failed(&self, ip: IpAddr, worker: &str, now: Instant) {
        let Settings { backoff_initial, backoff_max, .. } = self.settings();
        let key = self.key(ip, worker);
        if self.workers.len() < MAX_TRACKED || self.workers.contains_key(&key) {
            let mut f = self.workers.entry(key).or_insert(Failures { count: 0, until: now });
            f.count = f.count.saturating_add(1);
            f.until = now + doubled(backoff_initial, backoff_max, f.count);
        }
        if self.addresses.len() >= MAX_TRACKED && !self.addresses.contains_key(&ip) {
            return;
        }
        let mut a = self.addresses.entry(ip).or_insert(Address { window: now, in_window: 0, trips: 0, until: now });
        if now >= a.window + ADDRESS_WINDOW {
            // A quiet window ends the doubling: the address starts over.
            if a.in_window < ADDRESS_FAILURES {
                a.trips = 0;
            }
            a.window = now;
            a.in_window = 0;
        }
        a.in_window = a.in_window.saturating_add(1);
        if a.in_window >= ADDRESS_FAILURES {
            a.trips = a.trips.saturating_add(1);
            a.until = now + doubled(backoff_initial, backoff_max.min(ADDRESS_BACKOFF_MAX), a.trips);
            a.window = now;
            a.in_window = 0;
        }
    }

    /// The pool accepted `worker` from `ip`: its own record goes. The address's count stays, so
    /// that a working neighbour does not hide a flood of failures.
    pub fn succeeded(&self, ip: IpAddr, worker: &str) {
        self.workers.remove(&self.key(ip, worker));
    }

    /// Forgets workers that have not failed for `backoff_max` past their last wait, and
    /// addresses whose window and wait are over.
    pub fn prune(&self, now: Instant) {
        let max = self.settings().backoff_max;
        self.workers.retain(|_, f| now < f.until + max);
        self.addresses.retain(|_, a| now < a.until.max(a.window + ADDRESS_WINDOW) + ADDRESS_WINDOW);
    }
}

impl Rewrite {
    pub fn rewrites(&self) -> bool {
        !self.template.is_empty()
    }

    /// The upstream user for what a miner sent. The worker is the part after the first `.`, or
    /// the whole name when it has none.
    pub fn upstream_user(&self, miner_user: &str, pool: &PoolConfig) -> String {
        if self.template.is_empty() {
            return miner_user.to_owned();
        }
        let worker = miner_user.split_once('.').map_or(miner_user, |(_, w)| w);
        self.template.replace("{pool_user}", &pool.user).replace("{worker}", worker).replace("{user}", miner_user)
    }

    /// The credentials to authorize upstream with: the pool's password when rewriting, since the
    /// pool account is then the pool's, else the miner's own.
    pub fn credentials(&self, miner_user: &str, miner_password: &str, pool: &PoolConfig) -> Credentials {
        Credentials {
            user: self.upstream_user(miner_user, pool),
            password: if self.rewrites() { pool.password.clone() } else { miner_password.to_owned() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> PoolConfig {
        PoolConfig {
            url: "stratum+tcp://p:1".into(),
            user: "acct".into(),
            password: "pw".into(),
            ..PoolConfig::default()
        }
    }

    fn manager(template: &str) -> AuthManager {
        AuthManager::new(template, Duration::from_secs(3), Duration::from_secs(600))
    }

    const IP: &str = "10.0.0.7";

    fn wait(a: &AuthManager, ip: &str, worker: &str, now: Instant) -> Option<u64> {
        a.backoff(ip.parse().unwrap(), worker, now).map(|d| d.as_secs())
    }

    #[tokio::test(start_paused = true)]
    async fn failed_authorizes_back_off_per_worker() {
        let a = manager("");
        let ip: IpAddr = IP.parse().unwrap();
        let now = Instant::now();
        assert_eq!(wait(&a, IP, "farm.bad", now), None);
        let mut waits = Vec::new();
        for _ in 0..10 {
            a.failed(ip, "farm.bad", now);
            waits.push(wait(&a, IP, "farm.bad", now).unwrap());
        }
        assert_eq!(waits, [3, 6, 12, 24, 48, 96, 192, 384, 600, 600]);
        assert_eq!(wait(&a, IP, "farm.good", now), None, "a neighbour behind the same NAT");
        assert_eq!(wait(&a, "10.0.0.8", "farm.bad", now), None, "the same name elsewhere");
        assert_eq!(wait(&a, IP, "farm.bad", now + Duration::from_secs(600)), None);
        a.prune(now + Duration::from_secs(1199));
        assert!(a.workers.contains_key(&a.key(ip, "farm.bad")));
        a.prune(now + Duration::from_secs(1200));
        assert!(a.workers.is_empty() && a.addresses.is_empty());
        a.failed(ip, "farm.bad", now);
        a.failed(ip, "farm.other", now);
        a.succeeded(ip, "farm.bad");
        assert_eq!(wait(&a, IP, "farm.bad", now), None);
        assert_eq!(wait(&a, IP, "farm.other", now), Some(3), "one worker's success clears only its own");
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_refusal_is_a_failure() {
        let a = manager("");
        let ip: IpAddr = IP.parse().unwrap();
        let now = Instant::now();
        a.answered(ip, "farm.rig1", Answer::Failed, now);
        assert_eq!(wait(&a, IP, "farm.rig1", now), None, "the pool's error is not the miner's");
        a.answered(ip, "farm.rig1", Answer::Refused, now);
        assert_eq!(wait(&a, IP, "farm.rig1", now), Some(3));
        a.answered(ip, "farm.rig1", Answer::Accepted, now);
        assert_eq!(wait(&a, IP, "farm.rig1", now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_backstop_for_high_failure_rates_capped_at_a_minute() {
        let a = manager("");
        let ip: IpAddr = IP.parse().unwrap();
        let mut now = Instant::now();
        // Distinct names, as a password guesser would rotate them: each is a first failure.
        let mut name = 0;
        let mut fail = |a: &AuthManager, n: u32, now: Instant| {
            for _ in 0..n {
                name += 1;
                a.failed(ip, &format!("guess.{name}"), now);
            }
        };
        fail(&a, ADDRESS_FAILURES - 1, now);
        assert_eq!(wait(&a, IP, "farm.good", now), None, "below the rate, neighbours go on");
        fail(&a, 1, now);
        assert_eq!(wait(&a, IP, "farm.good", now), Some(3), "the backstop stops the address");
        assert_eq!(wait(&a, "10.0.0.8", "farm.good", now), None);
        // Tripped again and again within the window: the wait doubles up to a minute, never
        // to `auth_backoff_max`.
        let mut waits = Vec::new();
        for _ in 0..6 {
            fail(&a, ADDRESS_FAILURES, now);
            waits.push(wait(&a, IP, "farm.good", now).unwrap());
        }
        assert_eq!(waits, [6, 12, 24, 48, 60, 60]);
        // A quiet window ends the doubling; failures spread over windows never trip it.
        now += ADDRESS_WINDOW * 2;
        assert_eq!(wait(&a, IP, "farm.good", now), None);
        for _ in 0..4 {
            fail(&a, ADDRESS_FAILURES - 1, now);
            assert_eq!(wait(&a, IP, "farm.good", now), None);
            now += ADDRESS_WINDOW;
        }
        fail(&a, ADDRESS_FAILURES, now);
        assert_eq!(wait(&a, IP, "farm.good", now), Some(3), "the doubling started over");
        // Addresses expire.
        a.prune(now + ADDRESS_WINDOW * 3);
        assert!(a.addresses.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_records_are_bounded() {
        let a = manager("");
        let now = Instant::now();
        for i in 0..MAX_TRACKED as u32 + 10 {
            a.failed(IpAddr::from(i.to_be_bytes()), "w", now);
        }
        assert_eq!(a.workers.len(), MAX_TRACKED);
        assert_eq!(a.addresses.len(), MAX_TRACKED);
        let ip: IpAddr = IP.parse().unwrap();
        for i in 0..10 {
            a.failed(ip, &format!("w{i}"), now);
        }
        assert_eq!(a.workers.len(), MAX_TRACKED);
        a.prune(now + Duration::from_secs(3600));
        assert!(a.workers.is_empty() && a.addresses.is_empty());
    }

    #[test]
    fn off_by_default() {
        let a = manager("");
        assert_eq!(
            a.rewrite().credentials("farm.rig1", "x", &pool()),
            Credentials { user: "farm.rig1".into(), password: "x".into() }
        );
    }

    #[test]
    fn template_rewrites_worker() {
        let a = manager("{pool_user}.{worker}");
        assert_eq!(
            a.rewrite().credentials("farm.rig1", "x", &pool()),
            Credentials { user: "acct.rig1".into(), password: "pw".into() }
        );
        assert_eq!(a.rewrite().upstream_user("rig2", &pool()), "acct.rig2");
        assert_eq!(a.rewrite().upstream_user("farm.rack.7", &pool()), "acct.rack.7");
        assert_eq!(manager("{pool_user}_{user}").rewrite().upstream_user("a.b", &pool()), "acct_a.b");
    }
}
