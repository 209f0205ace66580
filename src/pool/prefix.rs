//! Aggregate mode: the extranonce1 prefix each miner gets inside a shared pool session.
//!
//! A prefix must stay unique among live miners, and a freed one is quarantined until no job its
//! last holder could have worked on is live: otherwise the next holder could find the same header
//! for a job that is still open, and a share of one miner would count as a duplicate of another's.

use std::collections::{HashMap, HashSet, VecDeque};

/// A miner's extranonce1 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix(u32);

impl Prefix {
    /// The prefix as a number.
    pub fn value(self) -> u32 {
        self.0
    }

    /// Big-endian bytes, `len` long (the prefix_bytes); a `len` above 4 is padded with leading zeros.
    pub fn to_bytes(self, len: usize) -> Vec<u8> {
        debug_assert!(len >= 4 || self.0 >> (8 * len) == 0, "prefix {:#x} does not fit {len} bytes", self.0);
        let be = self.0.to_be_bytes();
        let mut out = vec![0; len.saturating_sub(4)];
        out.extend_from_slice(&be[4 - len.min(4)..]);
        out
    }
}

/// Unique prefixes among live miners, with quarantine of freed ones.
///
/// Memory follows the miners, not the space: values are handed out fresh only when none can be
/// reclaimed, so the free list and the quarantine never hold more than the peak of live miners.
#[derive(Debug)]
pub struct PrefixAllocator {
    capacity: u64,
    /// The lowest value never handed out; a u64 so that a 4-byte space ends without overflow.
    next_fresh: u64,
    /// Reclaimed values, the one freed longest ago first.
    free: VecDeque<u32>,
    /// Per group, released values with the newest job seq at release. Seqs within one group arrive
    /// non-decreasing, so reclaiming pops from the front until the first entry still in use.
    quarantine: HashMap<usize, VecDeque<(u32, u64)>>,
    quarantined: usize,
    held: Held,
    live: usize,
}

/// The values live miners hold, so that an invalid release is caught instead of duplicating a value.
#[derive(Debug)]
enum Held {
    /// One bit per value; 8 KiB for 2 bytes.
    Bits(Vec<u64>),
    /// For 3 and 4 bytes, where a bitset would cost 2 MiB or 512 MiB whatever the miner count.
    Set(HashSet<u32>),
}

impl Held {
    fn insert(&mut self, v: u32) -> bool {
        match self {
            Held::Bits(words) => {
                let (word, bit) = (&mut words[(v / 64) as usize], 1u64 << (v % 64));
                let fresh = *word & bit == 0;
                *word |= bit;
                fresh
            }
            Held::Set(set) => set.insert(v),
        }
    }

    fn remove(&mut self, v: u32) -> bool {
        match self {
            Held::Bits(words) => match words.get_mut((v / 64) as usize) {
                Some(word) => {
                    let bit = 1u64 << (v % 64);
                    let held = *word & bit != 0;
                    *word &= !bit;
                    held
                }
                None => false,
            },
            Held::Set(set) => set.remove(&v),
        }
    }
}

impl PrefixAllocator {
    /// `prefix_bytes` in 1..=4: the space is 2^(8·prefix_bytes) values.
    ///
    /// # Panics
    /// If `prefix_bytes` is outside 1..=4; the config rejects such values first.
    pub fn new(prefix_bytes: usize) -> Self {
        assert!((1..=4).contains(&prefix_bytes), "prefix_bytes must be 1 to 4, got {prefix_bytes}");
        let capacity = 1u64 << (8 * prefix_bytes);
        let held = if prefix_bytes <= 2 {
            Held::Bits(vec![0; capacity.div_ceil(64) as usize])
        } else {
            Held::Set(HashSet::new())
        };
        Self {
            capacity,
            next_fresh: 0,
            free: VecDeque::new(),
            quarantine: HashMap::new(),
            quarantined: 0,
            held,
            live: 0,
        }
    }

    /// A prefix no live miner holds and no live job can have seen, or None when the space is exhausted.
    ///
    /// `oldest_live(group)` returns the seq of the oldest job still live in that group, or None if the
    /// group has no live job (then everything released in it is reclaimable). It is called once per
    /// group that has quarantined prefixes.
    pub fn allocate(&mut self, oldest_live: impl Fn(usize) -> Option<u64>) -> Option<Prefix> {
        self.reclaim(oldest_live);
        let v = match self.free.pop_front() {
            Some(v) => v,
            None if self.next_fresh < self.capacity => {
                self.next_fresh += 1;
                (self.next_fresh - 1) as u32
            }
            None => return None,
        };
        let fresh = self.held.insert(v);
        debug_assert!(fresh, "prefix {v:#x} handed out twice");
        self.live += 1;
        Some(Prefix(v))
    }

    /// The miner holding `prefix` in `group` left when the newest job in that group had seq `newest_seq`
    /// (None if the group had no job yet, then it is reusable at once).
    ///
    /// A prefix that is not live (released twice, or never handed out) is ignored.
    pub fn release(&mut self, prefix: Prefix, group: usize, newest_seq: Option<u64>) {
        if u64::from(prefix.0) >= self.capacity || !self.held.remove(prefix.0) {
            tracing::warn!(prefix = prefix.0, group, "release of a prefix no miner holds; ignored");
            return;
        }
        self.live -= 1;
        match newest_seq {
            None => self.free.push_back(prefix.0),
            Some(seq) => {
                self.quarantine.entry(group).or_default().push_back((prefix.0, seq));
                self.quarantined += 1;
            }
        }
    }

    /// Prefixes held by live miners.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Released prefixes still waiting for their jobs to end.
    pub fn quarantined(&self) -> usize {
        self.quarantined
    }

    /// The size of the space: 2^(8·prefix_bytes).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Moves every prefix whose jobs have all ended to the free list, in release order per group.
    fn reclaim(&mut self, oldest_live: impl Fn(usize) -> Option<u64>) {
        let free = &mut self.free;
        let quarantined = &mut self.quarantined;
        self.quarantine.retain(|&group, queue| {
            let oldest = oldest_live(group);
            while let Some(&(v, seq)) = queue.front() {
                if oldest.is_some_and(|o| o <= seq) {
                    break;
                }
                queue.pop_front();
                free.push_back(v);
                *quarantined -= 1;
            }
            // Dropping empty queues keeps the map bounded when group indices are not reused.
            !queue.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64: deterministic and dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const GROUPS: usize = 3;
    /// Jobs live per group: the newest and the three before it.
    const LIVE_JOBS: usize = 4;
    const MAX_LIVE: usize = 2_000;

    #[test]
    fn prefixes_stay_unique_through_100k_cycles() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut alloc = PrefixAllocator::new(2);
        // Live job seqs per group, oldest first; seqs are global across groups.
        let mut jobs: Vec<VecDeque<u64>> = vec![VecDeque::new(); GROUPS];
        let mut seq = 0u64;
        let mut miners: Vec<(Prefix, usize)> = Vec::new();
        let mut held: HashSet<Prefix> = HashSet::new();
        let mut released: HashMap<Prefix, (usize, u64)> = HashMap::new();
        let mut peak_quarantined = 0;

        for i in 0..100_000u32 {
            if rng.below(4) == 0 {
                let g = rng.below(GROUPS as u64) as usize;
                seq += 1;
                jobs[g].push_back(seq);
                if jobs[g].len() > LIVE_JOBS {
                    jobs[g].pop_front();
                }
            }
            // The target swings between few and many miners so both reuse and fresh values are exercised.
            let target = if (i / 10_000) % 2 == 0 { MAX_LIVE } else { 200 };
            let connect_pct = if miners.len() < target { 70 } else { 30 };
            let connect = miners.is_empty() || (miners.len() < MAX_LIVE && rng.below(100) < connect_pct);

            if connect {
                let oldest = |g: usize| jobs[g].front().copied();
                let p = alloc.allocate(oldest).expect("2,000 miners fit 65,536 prefixes");
                assert!(held.insert(p), "prefix {p:?} handed to two live miners");
                if let Some((g, s)) = released.remove(&p) {
                    assert!(oldest(g).is_none_or(|o| o > s), "{p:?} reissued while a job seen at {s} is live");
                }
                miners.push((p, rng.below(GROUPS as u64) as usize));
            } else {
                let (p, g) = miners.swap_remove(rng.below(miners.len() as u64) as usize);
                let newest = jobs[g].back().copied();
                alloc.release(p, g, newest);
                held.remove(&p);
                if let Some(s) = newest {
                    released.insert(p, (g, s));
                }
            }
            assert_eq!(alloc.live(), held.len());
            peak_quarantined = peak_quarantined.max(alloc.quarantined());
        }
        // Reuse keeps the values in use near the peak of live plus quarantined miners.
        assert!(alloc.next_fresh as usize <= MAX_LIVE + peak_quarantined, "{}", alloc.next_fresh);
    }

    #[test]
    fn one_byte_space_exhausts_and_quarantine_holds_until_jobs_end() {
        let mut alloc = PrefixAllocator::new(1);
        assert_eq!(alloc.capacity(), 256);
        let all: HashSet<Prefix> = (0..256).map(|_| alloc.allocate(|_| None).unwrap()).collect();
        assert_eq!(all.len(), 256);
        assert_eq!(alloc.allocate(|_| None), None);

        let p = Prefix(42);
        alloc.release(p, 0, Some(10));
        assert_eq!((alloc.live(), alloc.quarantined()), (255, 1));
        assert_eq!(alloc.allocate(|_| Some(10)), None);
        assert_eq!(alloc.allocate(|_| Some(11)), Some(p));
        assert_eq!((alloc.live(), alloc.quarantined()), (256, 0));
    }

    #[test]
    fn quarantine_is_per_group() {
        let mut alloc = PrefixAllocator::new(1);
        let a = alloc.allocate(|_| None).unwrap();
        let b = alloc.allocate(|_| None).unwrap();
        for _ in 2..256 {
            alloc.allocate(|_| None).unwrap();
        }
        // Group 0's job 5 is still live; group 1 moved past the job b saw, though b was released later
        // with a higher seq.
        alloc.release(a, 0, Some(5));
        alloc.release(b, 1, Some(7));
        let oldest = |g: usize| if g == 0 { Some(5) } else { Some(8) };
        assert_eq!(alloc.allocate(oldest), Some(b));
        assert_eq!(alloc.allocate(oldest), None);
        assert_eq!(alloc.allocate(|_| None), Some(a));
    }

    #[test]
    fn four_bytes_use_the_whole_u32_space() {
        let mut alloc = PrefixAllocator::new(4);
        assert_eq!(alloc.capacity(), 1 << 32);
        alloc.next_fresh = alloc.capacity() - 1;
        let last = alloc.allocate(|_| None).unwrap();
        assert_eq!(last.value(), u32::MAX);
        assert_eq!(hex::encode(last.to_bytes(4)), "ffffffff");
        assert_eq!(alloc.allocate(|_| None), None);
        alloc.release(last, 0, None);
        assert_eq!(alloc.allocate(|_| None), Some(last));
    }

    #[test]
    fn bytes_are_big_endian_with_the_given_length() {
        let cases: &[(u32, usize, &str)] = &[
            (0x0102, 2, "0102"),
            (0x0102, 3, "000102"),
            (0x0102, 4, "00000102"),
            (0x07, 1, "07"),
            (0xab, 2, "00ab"),
            (0x00ab_cdef, 3, "abcdef"),
            (0xdead_beef, 4, "deadbeef"),
        ];
        for &(v, len, hex) in cases {
            let p = Prefix(v);
            assert_eq!(hex::encode(p.to_bytes(len)), hex, "{v:#x} in {len} bytes");
            assert_eq!(p.to_bytes(len), ::hex::decode(hex).unwrap());
            assert_eq!(p.value(), v);
        }
    }

    #[test]
    fn release_without_a_job_is_reusable_at_once() {
        let mut alloc = PrefixAllocator::new(1);
        for _ in 0..256 {
            alloc.allocate(|_| None).unwrap();
        }
        alloc.release(Prefix(9), 2, None);
        assert_eq!(alloc.quarantined(), 0);
        // Live jobs elsewhere do not hold back a prefix released before its group had any.
        assert_eq!(alloc.allocate(|_| Some(0)), Some(Prefix(9)));
    }

    #[test]
    fn invalid_releases_do_not_break_uniqueness() {
        let mut alloc = PrefixAllocator::new(1);
        let p = alloc.allocate(|_| None).unwrap();
        let q = alloc.allocate(|_| None).unwrap();
        alloc.release(p, 0, None);
        alloc.release(p, 0, None);
        alloc.release(p, 1, Some(3));
        // Never handed out, and outside the one-byte space.
        alloc.release(Prefix(200), 0, None);
        alloc.release(Prefix(256), 0, None);
        assert_eq!((alloc.live(), alloc.quarantined()), (1, 0));

        let mut held = HashSet::from([q]);
        while let Some(r) = alloc.allocate(|_| None) {
            assert!(held.insert(r), "{r:?} handed out twice");
        }
        assert_eq!(held.len(), 256);
        assert_eq!(alloc.live(), 256);
    }
}
