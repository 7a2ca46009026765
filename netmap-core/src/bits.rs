//! Bitmaps over slots or rule ids, kept as `u64` words.

/// Whether bit `i` is set (bits past the end are not).
pub(crate) fn bit(b: &[u64], i: usize) -> bool {
    b.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// Sets bit `i` (a bit past the end is ignored); returns whether it was clear.
pub(crate) fn set_bit(b: &mut [u64], i: usize) -> bool {
    match b.get_mut(i / 64) {
        Some(w) if *w & (1 << (i % 64)) == 0 => {
            *w |= 1 << (i % 64);
            true
        }
        _ => false,
    }
}

/// Sets bit `i`, growing `b` to hold it.
pub(crate) fn set_bit_growing(b: &mut Vec<u64>, i: usize) {
    if b.len() <= i / 64 {
        b.resize(i / 64 + 1, 0);
    }
    set_bit(b, i);
}

/// Whether `a` and `b` share a bit that `mask` has.
pub(crate) fn intersects(a: &[u64], b: &[u64], mask: &[u64]) -> bool {
    a.iter().zip(b).zip(mask).any(|((x, y), m)| x & y & m != 0)
}

/// `acc |= bits`, word by word.
pub(crate) fn or_into(acc: &mut [u64], bits: &[u64]) {
    for (a, b) in acc.iter_mut().zip(bits) {
        *a |= b;
    }
}

/// The positions of the set bits, in order.
pub(crate) fn ones(bits: &[u64]) -> impl Iterator<Item = usize> + '_ {
    bits.iter().enumerate().flat_map(|(i, &w)| {
        let mut w = w;
        std::iter::from_fn(move || {
            (w != 0).then(|| {
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                i * 64 + b
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_read_and_list_bits() {
        let mut b = vec![0u64; 3];
        assert!(set_bit(&mut b, 0));
        assert!(set_bit(&mut b, 64));
        assert!(set_bit(&mut b, 191));
        assert!(!set_bit(&mut b, 64), "already set");
        assert!(!set_bit(&mut b, 192), "past the end");
        assert!(bit(&b, 191) && !bit(&b, 190) && !bit(&b, 500));
        assert_eq!(ones(&b).collect::<Vec<_>>(), vec![0, 64, 191]);
        let mut acc = vec![0u64; 3];
        or_into(&mut acc, &[2, 0, 0]);
        or_into(&mut acc, &b);
        assert_eq!(ones(&acc).collect::<Vec<_>>(), vec![0, 1, 64, 191]);
        assert!(intersects(&acc, &b, &[u64::MAX; 3]));
        assert!(!intersects(&acc, &b, &[0, 0, 0]));
    }
}
