//! The auth manager: the credentials a miner's `mining.authorize` and `mining.submit` carry
//! upstream, rewritten through `user_template` when one is set, and the per-address backoff
//! after failed authorizes (3 s doubling, capped, as ckpool does).

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::config::PoolConfig;

/// Addresses whose failures are remembered at once; past it, new ones are not tracked until
/// expired entries are pruned.
const MAX_TRACKED: usize = 65_536;

/// The manager outlives a reload: its settings are replaced, its failure records kept.
#[derive(Debug, Default)]
pub struct AuthManager {
    settings: RwLock<Settings>,
    failures: DashMap<IpAddr, Failures>,
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
    /// No authorize from this address is forwarded before this.
    until: Instant,
}

/// The user and password to present upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
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

    /// How long `ip` must still wait before its next authorize is forwarded, if at all.
    fn backoff(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let f = self.failures.get(&ip)?;
        (f.until > now).then(|| f.until - now)
    }

    /// The error an authorize from `ip` gets while it waits out its backoff; `None` when it may
    /// go to the pool.
    pub fn refusal(&self, ip: IpAddr, now: Instant) -> Option<String> {
        let wait = self.backoff(ip, now)?;
        Some(format!("too many failed authorizations; retry in {} s", wait.as_secs_f64().ceil()))
    }

    /// A pool refused an authorize from `ip`: the wait doubles, from `backoff_initial` up to
    /// `backoff_max`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        if self.failures.len() >= MAX_TRACKED && !self.failures.contains_key(&ip) {
            return;
        }
        let Settings { backoff_initial, backoff_max, .. } = self.settings();
        let mut f = self.failures.entry(ip).or_insert(Failures { count: 0, until: now });
        f.count = f.count.saturating_add(1);
        let wait = backoff_initial.saturating_mul(1 << (f.count - 1).min(20)).min(backoff_max);
        f.until = now + wait;
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.failures.remove(&ip);
    }

    /// Forgets addresses that have not failed for `backoff_max` past their last wait.
    pub fn prune(&self, now: Instant) {
        let max = self.settings().backoff_max;
        self.failures.retain(|_, f| now < f.until + max);
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

    #[tokio::test(start_paused = true)]
    async fn failed_authorizes_back_off_per_address() {
        let a = manager("");
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        let now = Instant::now();
        assert_eq!(a.backoff(ip, now), None);
        let mut waits = Vec::new();
        for _ in 0..10 {
            a.failed(ip, now);
            waits.push(a.backoff(ip, now).unwrap().as_secs());
        }
        assert_eq!(waits, [3, 6, 12, 24, 48, 96, 192, 384, 600, 600]);
        assert_eq!(a.backoff(other, now), None);
        assert_eq!(a.backoff(ip, now + Duration::from_secs(600)), None);
        a.prune(now + Duration::from_secs(1199));
        assert!(a.failures.contains_key(&ip));
        a.prune(now + Duration::from_secs(1200));
        assert!(!a.failures.contains_key(&ip));
        a.failed(ip, now);
        a.succeeded(ip);
        assert_eq!(a.backoff(ip, now), None);
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
