//! The workers a group authorizes upstream with `worker_passthrough`, each with the miners that
//! use it: a new pool session authorizes the workers of live miners and no other, and a worker
//! no miner has used for a while is forgotten. Also the pools that answer one authorize per
//! connection (ckpool), whose sessions authorize no worker.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::Rewrite;
use crate::pool_session::PoolSession;
use crate::registry::SessionHandle;
use crate::upstream::Pool;

/// Distinct workers a group authorizes upstream; past it, a new worker's shares go under the
/// pool's user.
const MAX_GROUP_WORKERS: usize = 65_536;
/// How long a worker with no live miner is kept (and how often workers are pruned): a miner that
/// reconnects within it is answered at once, from what the pool session already accepted.
const WORKER_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct Workers {
    known: HashMap<Arc<str>, Known>,
    /// When the workers are next pruned.
    prune_at: Option<Instant>,
    /// Pools seen leaving a second authorize on one connection unanswered.
    one_authorize: Vec<Weak<Pool>>,
}

#[derive(Debug)]
struct Known {
    password: String,
    /// The miners that authorized it. A handle lives while its miner is connected (and while a
    /// share of it waits for the pool's verdict).
    miners: Vec<Weak<SessionHandle>>,
    /// When it was first found with no live miner.
    idle_since: Option<Instant>,
}

impl Workers {
    /// A new pool session: the workers of live miners are authorized on it, written before any
    /// of their shares, and the rest are forgotten (a miner that comes back authorizes again).
    /// On a pool known to answer one authorize per connection, none is.
    pub fn adopt(&mut self, session: &mut PoolSession, rewrite: &Rewrite, buf: &mut Vec<u8>, now: Instant) {
        self.one_authorize.retain(|pool| pool.strong_count() > 0);
        let pool = Arc::as_ptr(&session.pool);
        session.one_authorize = self.one_authorize.iter().any(|known| std::ptr::eq(known.as_ptr(), pool));
        self.prune(now, Duration::ZERO);
        for (worker, known) in &self.known {
            session.authorize(buf, rewrite, worker.clone(), &known.password, None, None, now);
        }
    }

    /// Notes that `miner` uses `worker`. False when the group is full of workers in use: the
    /// worker is then not authorized upstream, and its shares go under the pool's user.
    pub fn add(
        &mut self,
        session: &mut PoolSession,
        worker: &Arc<str>,
        password: &str,
        miner: &Arc<SessionHandle>,
    ) -> bool {
        if let Some(known) = self.known.get_mut(worker) {
            let miner = Arc::downgrade(miner);
            known.miners.retain(|m| m.strong_count() > 0);
            if !known.miners.iter().any(|m| m.ptr_eq(&miner)) {
                known.miners.push(miner);
            }
            known.idle_since = None;
            return true;
        }
        if self.known.len() >= MAX_GROUP_WORKERS {
            self.forget(session, Instant::now(), Duration::ZERO);
            if self.known.len() >= MAX_GROUP_WORKERS {
                tracing::warn!(%worker, "too many workers in one pool session; this one is credited to the proxy's user");
                return false;
            }
        }
        let known = Known { password: password.to_owned(), miners: vec![Arc::downgrade(miner)], idle_since: None };
        self.known.insert(worker.clone(), known);
        true
    }

    /// Forgets, now and then, the workers no miner has used for a while, on the session too.
    pub fn tick(&mut self, session: &mut PoolSession, now: Instant) {
        if self.prune_at.is_none_or(|at| now >= at) {
            self.forget(session, now, WORKER_GRACE);
            self.prune_at = Some(now + WORKER_GRACE);
        }
    }

    /// The pool left every authorize unanswered past its deadline, as ckpool does with a second
    /// one on a connection: each miner waiting is answered, and the pool is remembered.
    pub fn silent(&mut self, session: &mut PoolSession, group: usize) {
        let waiting = session.authorize_once();
        self.one_authorize.push(Arc::downgrade(&session.pool));
        tracing::warn!(
            session = group,
            pool = %session.pool.label,
            user = %session.pool.config.user,
            waiting,
            "the pool leaves a second mining.authorize on one connection unanswered (ckpool does); \
             workers' shares go to this pool under the proxy's user"
        );
    }

    fn forget(&mut self, session: &mut PoolSession, now: Instant, grace: Duration) {
        for worker in self.prune(now, grace) {
            session.forget(&worker);
        }
    }

    /// Forgets the workers that have had no live miner for `grace`, and returns them.
    fn prune(&mut self, now: Instant, grace: Duration) -> Vec<Arc<str>> {
        let mut forgotten = Vec::new();
        self.known.retain(|worker, known| {
            known.miners.retain(|m| m.strong_count() > 0);
            if !known.miners.is_empty() {
                known.idle_since = None;
                return true;
            }
            let idle_since = *known.idle_since.get_or_insert(now);
            let keep = now.saturating_duration_since(idle_since) < grace;
            if !keep {
                forgotten.push(worker.clone());
            }
            keep
        });
        forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ConnectionManager;

    /// The users a new session on `pool` authorizes, sorted.
    fn adopt(workers: &mut Workers, pool: &Arc<Pool>) -> Vec<String> {
        let (mut session, mut buf) = (PoolSession::new(pool.clone(), false), Vec::new());
        workers.adopt(&mut session, &Rewrite::default(), &mut buf, Instant::now());
        let lines = buf.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        let requests = lines.map(|l| serde_json::from_slice::<serde_json::Value>(l).unwrap());
        let mut users: Vec<String> = requests.map(|r| r["params"][0].as_str().unwrap().to_owned()).collect();
        users.sort();
        users
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_session_authorizes_the_workers_in_use_and_no_other() {
        let pool =
            Pool::new(&crate::config::PoolConfig { url: "stratum+tcp://127.0.0.1:1".into(), ..Default::default() });
        let mut session = PoolSession::new(pool.clone(), false);
        let registry = Arc::new(ConnectionManager::new(10, 0));
        let peer = "127.0.0.1:1".parse().unwrap();
        let [a, b, c] = [(); 3].map(|_| registry.register(peer).unwrap());
        let mut workers = Workers::default();
        let (shared, alone): (Arc<str>, Arc<str>) = ("farm.shared".into(), "farm.alone".into());
        assert!(workers.add(&mut session, &shared, "x", &a.handle));
        assert!(workers.add(&mut session, &shared, "x", &b.handle));
        assert!(workers.add(&mut session, &shared, "x", &b.handle), "a retry");
        assert_eq!(workers.known[&shared].miners.len(), 2);
        assert!(workers.add(&mut session, &alone, "y", &c.handle));
        let known = |w: &Workers| {
            let mut names: Vec<String> = w.known.keys().map(|n| n.to_string()).collect();
            names.sort();
            names
        };
        drop(a);
        drop(c);
        workers.tick(&mut session, Instant::now());
        assert_eq!(known(&workers), ["farm.alone", "farm.shared"], "within the grace");
        tokio::time::advance(WORKER_GRACE).await;
        workers.tick(&mut session, Instant::now());
        assert_eq!(known(&workers), ["farm.shared"], "one of its miners is still connected");
        // A worker whose miner left is not authorized on the next session, nor kept.
        let d = registry.register(peer).unwrap();
        assert!(workers.add(&mut session, &alone, "y", &d.handle));
        drop(d);
        assert_eq!(adopt(&mut workers, &pool), ["farm.shared"]);
        assert_eq!(known(&workers), ["farm.shared"]);
        // On a pool that answers one authorize per connection, none is.
        workers.silent(&mut session, 0);
        assert_eq!(adopt(&mut workers, &pool), Vec::<String>::new());
        drop(b);
        assert_eq!(adopt(&mut workers, &Pool::new(&pool.config)), Vec::<String>::new());
        assert!(known(&workers).is_empty());
    }
}
