//! The job book, in both modes: the jobs one miner was sent, each under the id the miner sees,
//! with the difficulty it was sent at and the shares already taken on it.
//!
//! A job ([`Job`]) is built once by the pool side and shared by every miner that gets it. In
//! passthrough a miner sees the pool's job ids; in aggregate mode the proxy's, `seq << 8 | tag`
//! in hex, where `seq` numbers the proxy's jobs and `tag` counts re-sends of one job to this
//! miner at a new difficulty. A share is judged at the difficulty its id was sent with, and is a
//! duplicate of any share taken on the same job under any of its ids.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::protocol::pool::Notify;
use crate::share::{target_from_difficulty, U256Le};

/// Job ids a miner's book holds; older ones are forgotten first, and shares on them are stale.
pub const MAX_JOBS: usize = 16;
/// Pool job ids remembered after they left the book, so that late shares on them are reported
/// stale rather than unknown. The proxy's own ids are ordered and need no such list.
const MAX_RETIRED: usize = 64;

/// A pool's job as miners get it.
#[derive(Debug)]
pub struct Job {
    /// The proxy's number for it, unique in the process and rising.
    pub seq: u64,
    /// The pool session it belongs to: jobs of an earlier one are stale.
    pub epoch: u64,
    /// The pool's job id, which submits carry upstream.
    pub upstream_id: Box<str>,
    /// As the miner works it: in aggregate mode coinb1 ‖ E1_up as coinb1 and padding ‖ coinb2 as
    /// coinb2. Its `job_id` is empty: the book holds the id the miner sees.
    pub notify: Notify,
    /// The miners' extranonce2 size for this job, and the zero bytes after it.
    pub en2_size: usize,
    pub pad: usize,
    /// The pool's difficulty for this job: shares that meet it go to the pool.
    pub upstream_difficulty: f64,
    pub upstream_target: U256Le,
}

/// The next job number: global, so that jobs of two pools never share an id.
pub fn next_seq() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Job {
    /// The job a pool sent, as a miner with `en2_size` bytes of extranonce2 gets it: the pool's
    /// extranonce1 bytes that the miner does not see (`hidden_extranonce1`: none in passthrough,
    /// all in aggregate mode) join coinb1, and `pad` zero bytes go before coinb2.
    pub fn new(
        seq: u64,
        epoch: u64,
        mut n: Notify,
        hidden_extranonce1: &[u8],
        en2_size: usize,
        pad: usize,
        upstream_difficulty: f64,
    ) -> Job {
        n.coinb1.extend_from_slice(hidden_extranonce1);
        if pad > 0 {
            n.coinb2.splice(0..0, std::iter::repeat_n(0, pad));
        }
        let upstream_id = std::mem::take(&mut n.job_id).into_boxed_str();
        Job {
            seq,
            epoch,
            upstream_id,
            notify: n,
            en2_size,
            pad,
            upstream_difficulty,
            upstream_target: target_from_difficulty(upstream_difficulty),
        }
    }
}

/// What identifies a share within its job's book: the low 128 bits of its hash, which covers
/// every byte of the share (extranonces, ntime, nonce, version). So case variants of one share
/// are duplicates, and a remembered share costs 16 bytes, not its decoded fields' 40.
pub type ShareId = u128;

pub fn share_id(hash: &U256Le) -> ShareId {
    u128::from_le_bytes(hash[..16].try_into().expect("16 bytes"))
}

/// Whose job ids the miner sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobIds {
    /// The pool's (passthrough).
    Pool,
    /// The proxy's (aggregate mode).
    Proxy,
}

/// One job as this miner was sent it.
#[derive(Debug)]
pub struct Sent {
    pub job: Arc<Job>,
    /// `seq << 8 | resends`: the job's number, and its re-sends to this miner before this one
    /// (always 0 with pool ids). The proxy id the miner sees, held here so that looking a share's
    /// job up reads no job.
    key: u64,
    /// The difficulty the miner was given with it.
    pub difficulty: f64,
    /// Shares taken under this id; allocated with the first, freed with the entry. Boxed, so that
    /// an entry with none costs a pointer, not an empty set's 48 bytes: a book holds 16 entries
    /// for every idle miner.
    /// Hashed with foldhash: an id is remembered only once its share met its target, so a
    /// miner cannot choose ids that collide.
    #[allow(clippy::box_collection)]
    seen: Option<Box<HashSet<ShareId, foldhash::fast::RandomState>>>,
}

/// What the book knows of a job id.
#[derive(Debug)]
pub enum Lookup {
    /// Live: the index of its entry, for [`JobBook::sent`] and [`JobBook::remember`].
    Live(usize),
    /// Retired by a clean job, a new pool session, or pushed out by newer jobs.
    Stale,
    Unknown,
}

/// The jobs one miner was sent, oldest first.
#[derive(Debug)]
pub struct JobBook {
    ids: JobIds,
    sent: VecDeque<Sent>,
    /// Pool ids that left the book (passthrough only).
    retired: VecDeque<Box<str>>,
    /// The newest proxy job number ever sent, to tell a stale proxy id from one never issued.
    newest_seq: u64,
}

impl JobBook {
    pub fn new(ids: JobIds) -> Self {
        Self { ids, sent: VecDeque::new(), retired: VecDeque::new(), newest_seq: 0 }
    }

    /// Enters `job`, sent at `difficulty`, and returns the id the miner sees it under. A `clean`
    /// job retires the earlier ones; with pool ids (passthrough) the newest of them stays, for
    /// the shares the miner sent before the clean job reached it. The pool judges those, as it
    /// would without the proxy: many keep their last jobs for a while. In aggregate mode the
    /// proxy answers them itself, and cannot know whether the pool would still take them.
    pub fn push(&mut self, job: Arc<Job>, difficulty: f64, clean: bool) -> JobId {
        if clean {
            let keep = usize::from(self.ids == JobIds::Pool);
            while self.sent.len() > keep {
                let old = self.sent.pop_front().expect("longer than keep");
                self.retire(old);
            }
        }
        let tag = match self.ids {
            JobIds::Pool => {
                // A pool that sends one id again replaces the job.
                if let Some(i) = self.sent.iter().position(|s| s.job.upstream_id == job.upstream_id) {
                    self.sent.remove(i);
                }
                self.retired.retain(|id| *id != job.upstream_id);
                0
            }
            JobIds::Proxy => match self.sent.back() {
                Some(s) if s.key >> 8 == job.seq => (s.key as u8).wrapping_add(1),
                _ => 0,
            },
        };
        let key = job.seq << 8 | u64::from(tag);
        self.sent.retain(|s| s.key != key);
        if self.sent.len() == MAX_JOBS {
            let oldest = self.sent.pop_front().expect("the book is full");
            self.retire(oldest);
        }
        self.newest_seq = self.newest_seq.max(job.seq);
        let id = match self.ids {
            JobIds::Pool => JobId::Pool(job.upstream_id.clone()),
            JobIds::Proxy => JobId::Proxy(key),
        };
        self.sent.push_back(Sent { job, key, difficulty, seen: None });
        id
    }

    fn retire(&mut self, sent: Sent) {
        if self.ids == JobIds::Pool {
            if self.retired.len() == MAX_RETIRED {
                self.retired.pop_front();
            }
            self.retired.push_back(sent.job.upstream_id.clone());
        }
    }

    /// Retires the jobs that `keep` refuses (those of an ended pool session).
    pub fn retain(&mut self, keep: impl Fn(&Job) -> bool) {
        let (kept, gone): (VecDeque<_>, VecDeque<_>) = self.sent.drain(..).partition(|s| keep(&s.job));
        self.sent = kept;
        for sent in gone {
            self.retire(sent);
        }
    }

    pub fn lookup(&self, id: &str) -> Lookup {
        match self.ids {
            JobIds::Pool => {
                if let Some(i) = self.sent.iter().rposition(|s| *s.job.upstream_id == *id) {
                    Lookup::Live(i)
                } else if self.retired.iter().any(|r| **r == *id) {
                    Lookup::Stale
                } else {
                    Lookup::Unknown
                }
            }
            JobIds::Proxy => {
                let Some(key) = parse_proxy_id(id) else { return Lookup::Unknown };
                let seq = key >> 8;
                if let Some(i) = self.sent.iter().rposition(|s| s.key == key) {
                    Lookup::Live(i)
                } else if seq <= self.newest_seq && seq > 0 {
                    Lookup::Stale
                } else {
                    Lookup::Unknown
                }
            }
        }
    }

    pub fn sent(&self, index: usize) -> &Sent {
        &self.sent[index]
    }

    /// A share with `id` was taken on this job, under any of its ids.
    pub fn is_duplicate(&self, index: usize, id: ShareId) -> bool {
        let seq = self.sent[index].key >> 8;
        self.sent.iter().any(|s| s.key >> 8 == seq && s.seen.as_ref().is_some_and(|seen| seen.contains(&id)))
    }

    /// Records a share that passed; the set is freed with its entry.
    pub fn remember(&mut self, index: usize, id: ShareId) {
        self.sent[index].seen.get_or_insert_with(Default::default).insert(id);
    }

    pub fn newest(&self) -> Option<&Sent> {
        self.sent.back()
    }

    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }
}

/// The id a miner sees a job under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobId {
    Pool(Box<str>),
    Proxy(u64),
}

impl JobId {
    /// Re-sends of its job to this miner before this one (proxy ids only; it wraps at 256).
    pub fn resend(&self) -> u8 {
        match self {
            JobId::Pool(_) => 0,
            JobId::Proxy(n) => *n as u8,
        }
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobId::Pool(id) => f.write_str(id),
            JobId::Proxy(n) => write!(f, "{n:x}"),
        }
    }
}

fn parse_proxy_id(id: &str) -> Option<u64> {
    if id.is_empty() || id.len() > 16 {
        return None;
    }
    u64::from_str_radix(id, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(seq: u64, id: &str) -> Arc<Job> {
        let notify = Notify {
            job_id: id.into(),
            prevhash: [0; 32],
            coinb1: vec![],
            coinb2: vec![],
            merkle_branch: vec![],
            version: 0x2000_0000,
            nbits: 0x1d00_ffff,
            ntime: 0,
            clean_jobs: false,
        };
        Arc::new(Job::new(seq, 1, notify, &[], 4, 0, 1.0))
    }

    fn difficulty(b: &JobBook, id: &str) -> Option<f64> {
        match b.lookup(id) {
            Lookup::Live(i) => Some(b.sent(i).difficulty),
            _ => None,
        }
    }

    #[test]
    fn difficulty_is_bound_to_the_id() {
        let mut b = JobBook::new(JobIds::Pool);
        b.push(job(1, "a"), 1.0, true);
        b.push(job(2, "b"), 2.0, false);
        assert_eq!(difficulty(&b, "a"), Some(1.0));
        assert_eq!(difficulty(&b, "b"), Some(2.0));
        b.push(job(3, "c"), 2.0, true);
        assert!(matches!(b.lookup("a"), Lookup::Stale));
        assert_eq!(difficulty(&b, "b"), Some(2.0), "the newest before a clean job stays, for shares in flight");
        assert!(matches!(b.lookup("c"), Lookup::Live(_)));
        assert!(matches!(b.lookup("zzz"), Lookup::Unknown));
        b.push(job(4, "d"), 2.0, true);
        assert!(matches!(b.lookup("b"), Lookup::Stale), "two clean jobs later");
        assert!(matches!(b.lookup("c"), Lookup::Live(_)));
    }

    #[test]
    fn a_clean_job_retires_every_proxy_id() {
        let mut b = JobBook::new(JobIds::Proxy);
        let first = b.push(job(1, "a"), 1.0, true).to_string();
        let second = b.push(job(2, "b"), 1.0, true).to_string();
        assert!(matches!(b.lookup(&first), Lookup::Stale));
        assert!(matches!(b.lookup(&second), Lookup::Live(_)));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn bounded() {
        for ids in [JobIds::Pool, JobIds::Proxy] {
            let mut b = JobBook::new(ids);
            let mut issued = Vec::new();
            for i in 1..=100 {
                issued.push(b.push(job(i, &i.to_string()), 1.0, false).to_string());
            }
            assert_eq!(b.len(), MAX_JOBS);
            assert!(matches!(b.lookup(&issued[99]), Lookup::Live(_)));
            assert!(matches!(b.lookup(&issued[100 - MAX_JOBS]), Lookup::Live(_)));
            assert!(matches!(b.lookup(&issued[99 - MAX_JOBS]), Lookup::Stale));
        }
        let mut b = JobBook::new(JobIds::Pool);
        for i in 1..=100 {
            b.push(job(i, &i.to_string()), 1.0, false);
        }
        assert_eq!(b.retired.len(), MAX_RETIRED);
        assert!(matches!(b.lookup("1"), Lookup::Unknown), "forgotten past the retired list");
    }

    #[test]
    fn proxy_ids_count_re_sends_and_share_duplicates() {
        let mut b = JobBook::new(JobIds::Proxy);
        let j = job(7, "up");
        assert_eq!(b.push(j.clone(), 1.0, true), JobId::Proxy(0x700));
        assert_eq!(b.push(j.clone(), 2.0, false), JobId::Proxy(0x701));
        assert_eq!(difficulty(&b, "700"), Some(1.0));
        assert_eq!(difficulty(&b, "701"), Some(2.0));
        let id = share_id(&[7; 32]);
        let Lookup::Live(first) = b.lookup("700") else { panic!() };
        b.remember(first, id);
        let Lookup::Live(second) = b.lookup("701") else { panic!() };
        assert!(b.is_duplicate(second, id), "one job under two ids is one job");
        assert!(!b.is_duplicate(second, share_id(&[8; 32])));
        assert!(matches!(b.lookup("600"), Lookup::Stale), "an older number");
        assert!(matches!(b.lookup("800"), Lookup::Unknown), "never issued");
        assert!(matches!(b.lookup("not hex"), Lookup::Unknown));
        b.retain(|j| j.epoch != 1);
        assert!(matches!(b.lookup("701"), Lookup::Stale));
    }

    #[test]
    fn proxy_ids_round_trip() {
        for (seq, tag) in [(1, 0), (0x00ab_cdef, 7), (u64::MAX >> 8, 255)] {
            let key = seq << 8 | tag as u64;
            assert_eq!(parse_proxy_id(&JobId::Proxy(key).to_string()), Some(key));
        }
        assert_eq!(parse_proxy_id(""), None);
        assert_eq!(parse_proxy_id("xyz"), None);
        assert_eq!(parse_proxy_id("11112222333344445"), None);
    }

    #[test]
    fn a_pool_id_sent_again_replaces_its_job() {
        let mut b = JobBook::new(JobIds::Pool);
        b.push(job(1, "a"), 1.0, true);
        let id = share_id(&[7; 32]);
        let Lookup::Live(i) = b.lookup("a") else { panic!() };
        b.remember(i, id);
        b.push(job(2, "a"), 1.0, false);
        assert_eq!(b.len(), 1);
        let Lookup::Live(i) = b.lookup("a") else { panic!() };
        assert!(!b.is_duplicate(i, id));
    }

    #[test]
    fn jobs_carry_the_hidden_extranonce1_and_padding() {
        let n = Notify {
            job_id: "up".into(),
            prevhash: [0; 32],
            coinb1: vec![1],
            coinb2: vec![2],
            merkle_branch: vec![],
            version: 1,
            nbits: 1,
            ntime: 1,
            clean_jobs: true,
        };
        let j = Job::new(1, 1, n, &[0xe1, 0xe2], 2, 3, 4.0);
        assert_eq!(j.notify.coinb1, [1, 0xe1, 0xe2]);
        assert_eq!(j.notify.coinb2, [0, 0, 0, 2]);
        assert_eq!(&*j.upstream_id, "up");
        assert!(j.notify.job_id.is_empty());
    }
}
