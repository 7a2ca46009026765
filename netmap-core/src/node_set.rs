//! A set of node slots kept as a sorted vector. Selector sets are built from lists (a
//! group's members' devices, a tag's nodes), cloned when a rule is compared with its
//! previous form, and diffed; a sorted vector does each in one pass and one allocation,
//! where a tree allocates per node. Membership of one slot is a binary search, and the
//! per-node edits an update makes (one node joining or leaving) move a block of memory.

/// A set of node slots (sorted, no repeats).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NodeSet(Vec<usize>);

impl NodeSet {
    /// Whether slot `x` is in the set.
    pub fn contains(&self, x: &usize) -> bool {
        self.0.binary_search(x).is_ok()
    }

    /// Adds slot `x`; returns whether it was not there.
    pub fn insert(&mut self, x: usize) -> bool {
        match self.0.binary_search(&x) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, x);
                true
            }
        }
    }

    /// Removes slot `x`; returns whether it was there.
    pub fn remove(&mut self, x: &usize) -> bool {
        match self.0.binary_search(x) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    /// The slots, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, usize> {
        self.0.iter()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Moves every slot of `other` into this set (`other` is left empty).
    pub fn append(&mut self, other: &mut NodeSet) {
        let other = std::mem::take(&mut other.0);
        if self.0.is_empty() {
            self.0 = other;
            return;
        }
        let mut out = Vec::with_capacity(self.0.len() + other.len());
        let (mut a, mut b) = (self.0.iter().peekable(), other.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x < y => a.next(),
                (Some(&&x), Some(&&y)) if y < x => b.next(),
                (Some(_), Some(_)) => {
                    b.next();
                    a.next()
                }
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            out.extend(next.copied());
        }
        self.0 = out;
    }

    /// The slots in exactly one of the two sets, in order.
    pub fn symmetric_difference<'a>(&'a self, other: &'a NodeSet) -> SymmetricDifference<'a> {
        SymmetricDifference {
            a: &self.0,
            b: &other.0,
        }
    }
}

/// The iterator of [`NodeSet::symmetric_difference`].
pub(crate) struct SymmetricDifference<'a> {
    a: &'a [usize],
    b: &'a [usize],
}

impl<'a> Iterator for SymmetricDifference<'a> {
    type Item = &'a usize;

    fn next(&mut self) -> Option<&'a usize> {
        loop {
            match (self.a.split_first(), self.b.split_first()) {
                (Some((x, ra)), Some((y, rb))) => {
                    if x < y {
                        self.a = ra;
                        return Some(x);
                    } else if y < x {
                        self.b = rb;
                        return Some(y);
                    }
                    self.a = ra;
                    self.b = rb;
                }
                (Some((x, ra)), None) => {
                    self.a = ra;
                    return Some(x);
                }
                (None, Some((y, rb))) => {
                    self.b = rb;
                    return Some(y);
                }
                (None, None) => return None,
            }
        }
    }
}

impl FromIterator<usize> for NodeSet {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> NodeSet {
        let mut v: Vec<usize> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        NodeSet(v)
    }
}

impl IntoIterator for NodeSet {
    type Item = usize;
    type IntoIter = std::vec::IntoIter<usize>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a NodeSet {
    type Item = &'a usize;
    type IntoIter = std::slice::Iter<'a, usize>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::NodeSet;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        /// Every operation agrees with the standard ordered set's.
        #[test]
        fn behaves_as_an_ordered_set(
            a in proptest::collection::vec(0usize..64, 0..40),
            b in proptest::collection::vec(0usize..64, 0..40),
            edits in proptest::collection::vec((any::<bool>(), 0usize..64), 0..20),
        ) {
            let (mut sa, mut ta): (NodeSet, BTreeSet<usize>) =
                (a.iter().copied().collect(), a.iter().copied().collect());
            let (mut sb, mut tb): (NodeSet, BTreeSet<usize>) =
                (b.iter().copied().collect(), b.iter().copied().collect());
            for (add, x) in edits {
                if add {
                    prop_assert_eq!(sa.insert(x), ta.insert(x));
                } else {
                    prop_assert_eq!(sa.remove(&x), ta.remove(&x));
                }
                prop_assert_eq!(sa.contains(&x), ta.contains(&x));
            }
            prop_assert_eq!(sa.iter().copied().collect::<Vec<_>>(), ta.iter().copied().collect::<Vec<_>>());
            let sd: Vec<usize> = sa.symmetric_difference(&sb).copied().collect();
            let td: Vec<usize> = ta.symmetric_difference(&tb).copied().collect();
            prop_assert_eq!(sd, td);
            prop_assert_eq!(sa.len(), ta.len());
            sa.append(&mut sb);
            ta.append(&mut tb);
            prop_assert!(sb.is_empty());
            prop_assert_eq!(sa.iter().copied().collect::<Vec<_>>(), ta.iter().copied().collect::<Vec<_>>());
        }
    }
}
