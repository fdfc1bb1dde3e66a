//! Maps keyed by the integers this crate and its users hand out
//! themselves (outbox ids, source-record keys): one multiplication per
//! key instead of SipHash's rounds.
//!
//! SipHash, `HashMap`'s default, resists keys chosen to collide; here the
//! keys are ids steadfast numbers itself (or a broker's packet id under a
//! number of ours), so there is nothing to resist, and its 140-odd
//! instructions a hash showed as 1,450 instructions per bridged message
//! (docs/performance.md, session 18). Multiplying by an odd constant maps
//! distinct keys to distinct low bits at every table size (the bucket
//! index; a bijection modulo any power of two), so consecutive ids, the
//! usual case, never share a bucket, and mixes them into the high bits
//! that hashbrown's control bytes use. Keys that come from outside, such
//! as producer ids or topics, keep SipHash.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// The hasher of [`IdMap`] and [`IdSet`]: integer keys only.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

/// 2^64 divided by the golden ratio, odd (Knuth's multiplicative hashing).
const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not for byte strings (see the module): correct, not fast.
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(K);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(n.into());
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(n.into());
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(n.into());
    }

    fn write_i64(&mut self, n: i64) {
        self.write_u64(n as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A `HashMap` keyed by ids of our own ([`IdHasher`]).
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// A `HashSet` of ids of our own ([`IdHasher`]).
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    fn hash(n: u64) -> u64 {
        BuildHasherDefault::<IdHasher>::default().hash_one(n)
    }

    #[test]
    fn consecutive_ids_take_distinct_buckets_at_every_table_size() {
        for bits in 1..=16u32 {
            let mask = (1u64 << bits) - 1;
            let start = 1_000_003u64;
            let mut seen: Vec<u64> = (start..start + (1 << bits)).map(|n| hash(n) & mask).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), 1 << bits, "{bits} bits");
        }
    }

    #[test]
    fn the_high_bits_vary_too() {
        // hashbrown's control byte is the top seven bits: a run of ids
        // must not share one.
        let tops: IdSet<u64> = (0..1024u64).map(|n| hash(n) >> 57).collect();
        assert!(tops.len() > 100, "{} distinct of 128", tops.len());
    }

    #[test]
    fn a_map_and_a_set_behave_as_the_standard_ones() {
        let mut m: IdMap<u64, u64> = IdMap::default();
        let mut s: IdSet<i64> = IdSet::default();
        for n in 0..10_000u64 {
            m.insert(n * 7, n);
            s.insert(-(n as i64));
        }
        assert!((0..10_000u64).all(|n| m.get(&(n * 7)) == Some(&n) && s.contains(&-(n as i64))));
        assert_eq!(m.remove(&7), Some(1));
        assert_eq!(m.len(), 9_999);
    }
}
