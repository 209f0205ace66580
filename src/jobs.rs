//! The job manager: the jobs an upstream session announced, decoded, each with the difficulty it
//! was sent at and the shares already seen on it.
//!
//! A `mining.set_difficulty` applies to jobs notified after it; shares on earlier jobs keep the
//! difficulty in force when their job was sent. `clean_jobs` retires every earlier job: shares on
//! them are stale, not unknown.

use std::collections::{HashSet, VecDeque};

use crate::protocol::pool::{Notify, MAX_EXTRANONCE1_SIZE, MAX_EXTRANONCE2_SIZE};
use crate::share::{target_from_difficulty, U256Le};

/// Jobs kept per upstream session; older ones are forgotten first.
pub const MAX_JOBS: usize = 16;
/// Retired job ids remembered, so that late shares on them are reported stale.
const MAX_RETIRED: usize = 64;
/// The difficulty until a pool sends `mining.set_difficulty` (Stratum's default).
const DEFAULT_DIFFICULTY: f64 = 1.0;

/// One job as the pool announced it.
#[derive(Debug)]
pub struct Job {
    pub notify: Notify,
    /// The difficulty in force when the job was sent, and its target.
    pub difficulty: f64,
    pub target: U256Le,
    seen: HashSet<ShareKey>,
}

impl Job {
    /// The job and the difficulty it was sent at, as share checks take them.
    pub fn as_target(&self) -> crate::submissions::JobTarget<'_> {
        crate::submissions::JobTarget { notify: &self.notify, difficulty: self.difficulty, target: &self.target }
    }

    pub fn is_duplicate(&self, key: &ShareKey) -> bool {
        self.seen.contains(key)
    }

    /// Records a share that passed; the set is freed with the job.
    pub fn remember(&mut self, key: ShareKey) {
        self.seen.insert(key);
    }
}

/// What identifies a share within its job: the decoded bytes, never their hex spelling, so that
/// case variants of one share are duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShareKey {
    /// extranonce1 ‖ extranonce2.
    extranonce: [u8; MAX_EXTRANONCE1_SIZE + MAX_EXTRANONCE2_SIZE],
    extranonce1_len: u8,
    extranonce2_len: u8,
    ntime: u32,
    nonce: u32,
    version: u32,
}

impl ShareKey {
    pub fn new(extranonce1: &[u8], extranonce2: &[u8], ntime: u32, nonce: u32, version: u32) -> Self {
        let mut extranonce = [0u8; MAX_EXTRANONCE1_SIZE + MAX_EXTRANONCE2_SIZE];
        extranonce[..extranonce1.len()].copy_from_slice(extranonce1);
        extranonce[extranonce1.len()..extranonce1.len() + extranonce2.len()].copy_from_slice(extranonce2);
        ShareKey {
            extranonce,
            extranonce1_len: extranonce1.len() as u8,
            extranonce2_len: extranonce2.len() as u8,
            ntime,
            nonce,
            version,
        }
    }

    /// The share's extranonce2 bytes.
    pub fn extranonce2(&self) -> &[u8] {
        let start = usize::from(self.extranonce1_len);
        &self.extranonce[start..start + usize::from(self.extranonce2_len)]
    }
}

/// What the book knows of a job id.
#[derive(Debug)]
pub enum Lookup<'a> {
    Live(&'a mut Job),
    /// Retired by a `clean_jobs` notify or pushed out by newer jobs.
    Stale,
    Unknown,
}

#[derive(Debug)]
pub struct JobBook {
    /// The difficulty for jobs notified from now on.
    difficulty: f64,
    /// Oldest first.
    jobs: VecDeque<Job>,
    retired: VecDeque<Box<str>>,
}

impl Default for JobBook {
    fn default() -> Self {
        Self { difficulty: DEFAULT_DIFFICULTY, jobs: VecDeque::new(), retired: VecDeque::new() }
    }
}

impl JobBook {
    pub fn set_difficulty(&mut self, difficulty: f64) {
        self.difficulty = difficulty;
    }

    pub fn difficulty(&self) -> f64 {
        self.difficulty
    }

    pub fn on_notify(&mut self, notify: Notify) {
        if notify.clean_jobs {
            while let Some(job) = self.jobs.pop_front() {
                self.retire(job);
            }
        }
        if let Some(i) = self.jobs.iter().position(|j| j.notify.job_id == notify.job_id) {
            self.jobs.remove(i);
        }
        if self.jobs.len() == MAX_JOBS {
            let oldest = self.jobs.pop_front().expect("the book is full");
            self.retire(oldest);
        }
        self.retired.retain(|id| **id != *notify.job_id);
        let difficulty = self.difficulty;
        self.jobs.push_back(Job {
            notify,
            difficulty,
            target: target_from_difficulty(difficulty),
            seen: HashSet::new(),
        });
    }

    fn retire(&mut self, job: Job) {
        if self.retired.len() == MAX_RETIRED {
            self.retired.pop_front();
        }
        self.retired.push_back(job.notify.job_id.into_boxed_str());
    }

    pub fn lookup(&mut self, job_id: &str) -> Lookup<'_> {
        if let Some(job) = self.jobs.iter_mut().rev().find(|j| j.notify.job_id == job_id) {
            return Lookup::Live(job);
        }
        if self.retired.iter().any(|id| **id == *job_id) {
            Lookup::Stale
        } else {
            Lookup::Unknown
        }
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notify(id: &str, clean: bool) -> Notify {
        Notify {
            job_id: id.into(),
            prevhash: [0; 32],
            coinb1: vec![],
            coinb2: vec![],
            merkle_branch: vec![],
            version: 0x2000_0000,
            nbits: 0x1d00_ffff,
            ntime: 0,
            clean_jobs: clean,
        }
    }

    fn difficulty(b: &mut JobBook, id: &str) -> Option<f64> {
        match b.lookup(id) {
            Lookup::Live(j) => Some(j.difficulty),
            _ => None,
        }
    }

    #[test]
    fn difficulty_is_bound_to_the_job() {
        let mut b = JobBook::default();
        b.on_notify(notify("a", true));
        assert_eq!(difficulty(&mut b, "a"), Some(1.0));
        b.set_difficulty(2.0);
        assert_eq!(difficulty(&mut b, "a"), Some(1.0));
        b.on_notify(notify("b", false));
        assert_eq!(difficulty(&mut b, "a"), Some(1.0));
        assert_eq!(difficulty(&mut b, "b"), Some(2.0));
        b.on_notify(notify("c", true));
        assert!(matches!(b.lookup("a"), Lookup::Stale));
        assert!(matches!(b.lookup("b"), Lookup::Stale));
        assert!(matches!(b.lookup("c"), Lookup::Live(_)));
        assert!(matches!(b.lookup("zzz"), Lookup::Unknown));
    }

    #[test]
    fn bounded() {
        let mut b = JobBook::default();
        for i in 0..100 {
            b.on_notify(notify(&i.to_string(), false));
        }
        assert_eq!(b.len(), MAX_JOBS);
        assert_eq!(b.retired.len(), 84.min(MAX_RETIRED));
        assert!(matches!(b.lookup("99"), Lookup::Live(_)));
        assert!(matches!(b.lookup("83"), Lookup::Stale));
        assert!(matches!(b.lookup("84"), Lookup::Live(_)));
    }

    #[test]
    fn duplicates_are_per_job_and_freed_with_it() {
        let mut b = JobBook::default();
        b.on_notify(notify("a", true));
        let key = ShareKey::new(&[1, 2], &[0, 0, 0, 1], 5, 6, 7);
        let Lookup::Live(job) = b.lookup("a") else { panic!() };
        assert!(!job.is_duplicate(&key));
        job.remember(key);
        assert!(job.is_duplicate(&key));
        assert!(!job.is_duplicate(&ShareKey::new(&[1, 2], &[0, 0, 0, 2], 5, 6, 7)));
        // Same bytes split differently between the extranonces is another share.
        assert!(!job.is_duplicate(&ShareKey::new(&[1], &[2, 0, 0, 0, 1], 5, 6, 7)));
        b.on_notify(notify("a", true));
        let Lookup::Live(job) = b.lookup("a") else { panic!() };
        assert!(!job.is_duplicate(&key));
    }
}
