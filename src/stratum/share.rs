//! The share hash, byte for byte as cpuminer and ckpool build it, and the targets it is judged
//! against. Nothing here allocates.
//!
//! - coinbase = coinb1 ‖ extranonce1 ‖ extranonce2 ‖ coinb2
//! - merkle root = sha256d(coinbase), folded as sha256d(root ‖ branch entry)
//! - header = version (LE) ‖ prevhash (each 4-byte word of the notify's hex byte-reversed) ‖
//!   merkle root ‖ ntime (LE) ‖ nbits (LE) ‖ nonce (LE)
//! - the hash is sha256d(header), read as a little-endian 256-bit number.

use sha2::digest::generic_array::GenericArray;
use sha2::{Digest, Sha256};

/// A 256-bit number as 32 little-endian bytes: hashes and targets alike.
pub type U256Le = [u8; 32];

/// sha256d of any bytes: the reference the share path's fixed-size forms below are checked
/// against (by the tests here and the fuzz target).
pub fn sha256d(data: &[u8]) -> [u8; 32] {
    Sha256::digest(Sha256::digest(data)).into()
}

/// sha256d of the coinbase assembled from its four parts, without assembling it.
pub fn coinbase_hash(coinb1: &[u8], extranonce1: &[u8], extranonce2: &[u8], coinb2: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(coinb1);
    h.update(extranonce1);
    h.update(extranonce2);
    h.update(coinb2);
    sha256_of_hash(&h.finalize().into())
}

/// Folds the merkle branch into the coinbase hash.
pub fn merkle_root(coinbase_hash: [u8; 32], branch: &[[u8; 32]]) -> [u8; 32] {
    let mut root = coinbase_hash;
    let mut pair = [0u8; 64];
    for entry in branch {
        pair[..32].copy_from_slice(&root);
        pair[32..].copy_from_slice(entry);
        root = sha256_of_hash(&compress(IV, &[&pair, &PADDING_64]));
    }
    root
}

/// sha256d of an 80-byte header.
pub fn header_hash(header: &[u8; 80]) -> [u8; 32] {
    let mut tail = [0u8; 64];
    tail[..16].copy_from_slice(&header[64..]);
    tail[16] = 0x80;
    tail[62..].copy_from_slice(&(80u16 * 8).to_be_bytes());
    sha256_of_hash(&compress(IV, &[header[..64].try_into().expect("64 bytes"), &tail]))
}

// The share path hashes fixed-size inputs (32, 64 and 80 bytes), so their padding is known: the
// compression function runs on whole blocks, without the streaming API's buffering.

/// SHA-256's initial state.
const IV: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// The padding block after a 64-byte message.
const PADDING_64: [u8; 64] = {
    let mut block = [0u8; 64];
    block[0] = 0x80;
    block[62] = 0x02; // 512 bits
    block
};

/// Runs whole blocks through the compression function from `state`; the digest's bytes.
fn compress(mut state: [u32; 8], blocks: &[&[u8; 64]]) -> [u8; 32] {
    for block in blocks {
        sha2::compress256(&mut state, std::slice::from_ref(GenericArray::from_slice(&block[..])));
    }
    let mut digest = [0u8; 32];
    for (bytes, word) in digest.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

/// sha256 of a 32-byte hash: one block.
fn sha256_of_hash(hash: &[u8; 32]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(hash);
    block[32] = 0x80;
    block[62] = 0x01; // 256 bits
    compress(IV, &[&block])
}

/// The 80-byte block header. `prevhash` is as the notify carries it.
pub fn header(
    version: u32,
    prevhash: &[u8; 32],
    merkle_root: &[u8; 32],
    ntime: u32,
    nbits: u32,
    nonce: u32,
) -> [u8; 80] {
    let mut h = [0u8; 80];
    h[0..4].copy_from_slice(&version.to_le_bytes());
    for (dst, src) in h[4..36].chunks_exact_mut(4).zip(prevhash.chunks_exact(4)) {
        dst.copy_from_slice(&[src[3], src[2], src[1], src[0]]);
    }
    h[36..68].copy_from_slice(merkle_root);
    h[68..72].copy_from_slice(&ntime.to_le_bytes());
    h[72..76].copy_from_slice(&nbits.to_le_bytes());
    h[76..80].copy_from_slice(&nonce.to_le_bytes());
    h
}

/// `hash <= target`, both little-endian.
pub fn meets(hash: &U256Le, target: &U256Le) -> bool {
    hash.iter().rev().cmp(target.iter().rev()) != std::cmp::Ordering::Greater
}

/// The share target for a pool difficulty, computed as cpuminer's `diff_to_target` does, so that a
/// share is judged here exactly as the pool will judge it: 0xFFFF0000·2¹⁹² / difficulty.
pub fn target_from_difficulty(difficulty: f64) -> U256Le {
    let mut diff = difficulty;
    let mut k = 6;
    while k > 0 && diff > 1.0 {
        diff /= 4_294_967_296.0;
        k -= 1;
    }
    let m = 4_294_901_760.0 / diff;
    if !m.is_finite() || m >= u64::MAX as f64 {
        return [0xff; 32];
    }
    let m = m as u64;
    let mut t = [0u8; 32];
    t[k * 4..k * 4 + 4].copy_from_slice(&(m as u32).to_le_bytes());
    t[k * 4 + 4..k * 4 + 8].copy_from_slice(&((m >> 32) as u32).to_le_bytes());
    t
}

/// The network target a block hash must meet, from the header's compact `nbits`.
pub fn target_from_nbits(nbits: u32) -> U256Le {
    let exponent = (nbits >> 24) as i32;
    let mantissa = nbits & 0x007f_ffff;
    let mut t = [0u8; 32];
    for (i, byte) in mantissa.to_le_bytes()[..3].iter().enumerate() {
        let pos = exponent - 3 + i as i32;
        if (0..32).contains(&pos) {
            t[pos as usize] = *byte;
        }
    }
    t
}

/// The difficulty a hash reaches: the difficulty-1 target (0xFFFF·2²⁰⁸) over the hash.
pub fn difficulty_of(hash: &U256Le) -> f64 {
    let value = hash.iter().rev().fold(0.0f64, |acc, b| acc * 256.0 + f64::from(*b));
    if value == 0.0 {
        return f64::INFINITY;
    }
    65535.0 * 2f64.powi(208) / value
}

/// A hash as block explorers print it (big-endian hex).
pub fn display_hash(hash: &[u8; 32]) -> String {
    let mut rev = *hash;
    rev.reverse();
    hex::encode(rev)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A display-order hash as the little-endian bytes the header and hashes use.
    fn le(display: &str) -> [u8; 32] {
        let mut b: [u8; 32] = hex::decode(display).unwrap().try_into().unwrap();
        b.reverse();
        b
    }

    /// The header-order prevhash as the notify carries it: each 4-byte word byte-reversed.
    fn stratum_prevhash(display: &str) -> [u8; 32] {
        let mut b = le(display);
        b.chunks_exact_mut(4).for_each(|w| w.reverse());
        b
    }

    // Block 125552, the worked example of the Bitcoin wiki's block hashing algorithm page.
    #[test]
    fn block_125552_header_hash() {
        let prev = stratum_prevhash("00000000000008a3a41b85b8b29ad444def299fee21793cd8b9e567eab02cd81");
        let root = le("2b12fcf1b09288fcaff797d71e950e71ae42b91e8bdb2304758dfcffc2b620e3");
        let h = header(1, &prev, &root, 1305998791, 0x1a44b9f2, 2504433986);
        let hash = header_hash(&h);
        assert_eq!(hash, sha256d(&h));
        assert_eq!(display_hash(&hash), "00000000000000001e8d6829a8a21adc5d38d0a473b144b6765798e61f98bd1d");
        assert!(meets(&hash, &target_from_nbits(0x1a44b9f2)));
        assert!(difficulty_of(&hash) > 244_112.0, "the block met its network difficulty");
    }

    // The genesis block at the Stratum level: its coinbase split into coinb1 / extranonce1 /
    // extranonce2 / coinb2, as a pool's notify would carry it.
    #[test]
    fn genesis_from_a_stratum_job() {
        let coinbase = hex::decode(concat!(
            "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4d04ffff001d",
            "0104455468652054696d65732030332f4a616e2f32303039204368616e63656c6c6f72206f6e206272696e6b206f",
            "66207365636f6e64206261696c6f757420666f722062616e6b73ffffffff0100f2052a01000000434104678afdb0",
            "fe5548271967f1a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef38c4f35504e51ec112de5c38",
            "4df7ba0b8d578a4c702b6bf11d5fac00000000"
        ))
        .unwrap();
        for split in [42, 60, 100] {
            let (coinb1, rest) = coinbase.split_at(split);
            let (en1, rest) = rest.split_at(4);
            let (en2, coinb2) = rest.split_at(4);
            let root = merkle_root(coinbase_hash(coinb1, en1, en2, coinb2), &[]);
            assert_eq!(root, le("4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b"));
            let h = header(1, &[0; 32], &root, 1231006505, 0x1d00ffff, 2083236893);
            let hash = header_hash(&h);
            assert_eq!(hash, sha256d(&h));
            assert_eq!(display_hash(&hash), "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f");
            assert!(meets(&hash, &target_from_nbits(0x1d00ffff)));
        }
    }

    // Block 170 (the first payment): coinbase txid folded with the one-entry branch.
    #[test]
    fn block_170_merkle_branch() {
        let root = merkle_root(
            le("b1fea52486ce0c62bb442b530a3f0132b826c74e473d1f2c220bfa78111c5082"),
            &[le("f4184fc596403b9d638783cf57adfe4c75c605f6356fbc91338530e9831e9e16")],
        );
        assert_eq!(root, le("7dac2c5666815c17a3b36427de37bb9d2e2c5ccec3f8633eb91a4205cb4c10ff"));
    }

    #[test]
    fn targets() {
        // Difficulty 1 is the nbits 0x1d00ffff target.
        assert_eq!(target_from_difficulty(1.0), target_from_nbits(0x1d00ffff));
        let t2 = target_from_difficulty(2.0);
        assert_eq!(&t2[24..28], &0x7fff_8000u32.to_le_bytes());
        assert!(meets(&t2, &target_from_difficulty(1.0)));
        assert!(!meets(&target_from_difficulty(1.0), &t2));
        // Difficulties far below 1 give wide targets; absurdly small ones saturate.
        let small = target_from_difficulty(0.0001);
        assert!(meets(&target_from_difficulty(1.0), &small));
        assert_eq!(target_from_difficulty(1e-30), [0xff; 32]);
        // Difficulty of a hash exactly at a target is that target's difficulty.
        let d = difficulty_of(&target_from_difficulty(1024.0));
        assert!((d / 1024.0 - 1.0).abs() < 1e-9, "{d}");
    }
}
