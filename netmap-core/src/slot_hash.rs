//! A fast hasher for maps keyed by slot numbers, class ids and pointers.
//!
//! These keys come from the engine itself (never from input), so the DoS resistance of the
//! standard SipHash buys nothing there, while its cost showed: about a seventh of a node
//! change went to hashing slot numbers. This is the multiply-rotate hash rustc uses
//! (FxHash), with MurmurHash3's final mix so that the bits hashbrown picks buckets from
//! (the lowest and the highest) are mixed even for keys whose low bits are all zero
//! (aligned pointers).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A hash map keyed by engine-internal numbers.
pub(crate) type SlotMap<K, V> = HashMap<K, V, BuildHasherDefault<SlotHasher>>;

/// The hasher of [`SlotMap`].
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SlotHasher {
    hash: u64,
}

const MULTIPLIER: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl SlotHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(MULTIPLIER);
    }
}

impl Hasher for SlotHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        // MurmurHash3's final mix: every output bit depends on every input bit.
        let mut h = self.hash;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash_of<T: Hash>(t: &T) -> u64 {
        BuildHasherDefault::<SlotHasher>::default().hash_one(t)
    }

    #[test]
    fn consecutive_slots_and_aligned_pointers_spread_over_buckets() {
        // The low 10 bits choose among 1024 buckets: consecutive slots and 16-byte aligned
        // addresses must spread like random keys (about 647 of 1024 buckets used), not pile
        // into a few of them.
        for (keys, what) in [
            ((0..1024usize).collect::<Vec<_>>(), "slots"),
            (
                (0..1024usize).map(|i| 0x7f00_0000 + 16 * i).collect(),
                "pointers",
            ),
        ] {
            let buckets: std::collections::HashSet<u64> =
                keys.iter().map(|k| hash_of(k) & 1023).collect();
            assert!(
                buckets.len() > 600,
                "{what}: {} buckets used",
                buckets.len()
            );
        }
        let pairs: std::collections::HashSet<u64> = (0..32usize)
            .flat_map(|a| (0..32usize).map(move |b| (0x1000 + 16 * a, 0x9000 + 16 * b)))
            .map(|k| hash_of(&k) & 1023)
            .collect();
        assert!(pairs.len() > 600, "pairs: {} buckets used", pairs.len());
    }

    #[test]
    fn equal_keys_hash_equal_and_maps_work() {
        assert_eq!(hash_of(&(3usize, 4usize)), hash_of(&(3usize, 4usize)));
        assert_ne!(hash_of(&(3usize, 4usize)), hash_of(&(4usize, 3usize)));
        let mut m: SlotMap<usize, usize> = SlotMap::default();
        for i in 0..10_000 {
            m.insert(i * 64, i);
        }
        assert!((0..10_000).all(|i| m.get(&(i * 64)) == Some(&i)));
    }
}
