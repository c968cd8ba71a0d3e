//! The right edge of the Merkle tree: all the sequencer keeps in memory.
//!
//! A tree of `size` leaves is, per RFC 9162 2.1.1, the [`fold_right`] of the
//! perfect subtrees of `size`'s binary decomposition, largest first (its
//! "peaks", one per one bit of `size`). Appending a leaf only ever merges the
//! smallest peaks, like incrementing a binary counter carries, so O(log n)
//! hashes of state are enough to append and to compute the root, and every
//! perfect subtree completed on the way is reported once for storage.

use super::tree::{empty_root, fold_right, node_hash, range_nodes, Hash, NodeId, ProofError};

/// The peaks of the tree of `size` leaves: the writer's O(log n) state.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CompactRange {
    /// Leaves appended so far.
    size: u64,
    /// Hashes of the perfect subtrees `[0, size)` decomposes into, largest
    /// (leftmost) first: `size.count_ones()` of them.
    peaks: Vec<Hash>,
}

impl CompactRange {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Resumes from stored peak hashes (read at [`peak_ids`](Self::peak_ids)),
    /// e.g. after a restart. There must be one per one bit of `size`.
    pub fn from_peaks(size: u64, peaks: Vec<Hash>) -> Result<Self, ProofError> {
        let expected = size.count_ones() as usize;
        if peaks.len() != expected {
            return Err(ProofError::WrongPeakCount {
                size,
                expected,
                got: peaks.len(),
            });
        }
        Ok(Self { size, peaks })
    }

    /// The perfect subtrees whose hashes are the peaks of a tree of `size`
    /// leaves, largest first (= `range_nodes(0, size)`): what to load from
    /// storage for [`from_peaks`](Self::from_peaks).
    pub fn peak_ids(size: u64) -> Vec<NodeId> {
        range_nodes(0, size)
    }

    /// Leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The peak hashes, largest first.
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// `MTH(D[size])`: the fold of the peaks ([`empty_root`] at size 0).
    pub fn root(&self) -> Hash {
        if self.peaks.is_empty() {
            return empty_root();
        }
        fold_right(&self.peaks)
    }

    /// Appends one leaf hash; calls `visit(node, hash)` for every perfect node
    /// it completes: the leaf itself (level 0) first, then each parent in
    /// increasing level.
    ///
    /// The new leaf sits at position `size`. Each trailing one bit of `size`
    /// is a peak exactly as large as the subtree built so far, immediately to
    /// its left: merge them into their parent and carry on, as a binary
    /// increment carries. Costs one node hash per carried bit (one on average).
    pub fn append(&mut self, leaf_hash: Hash, mut visit: impl FnMut(NodeId, &Hash)) {
        let mut node = NodeId::new(0, self.size);
        let mut hash = leaf_hash;
        visit(node, &hash);
        while node.index & 1 == 1 {
            // The peaks hold one entry per one bit of size, and the low
            // `node.level + 1` bits of size are all ones here, so there is a
            // left sibling to pop.
            let Some(left) = self.peaks.pop() else { break };
            hash = node_hash(&left, &hash);
            node = NodeId::new(node.level + 1, node.index >> 1);
            visit(node, &hash);
        }
        self.peaks.push(hash);
        self.size += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::super::tree::{leaf_hash, root, root_plan};
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("compact leaf {i}").as_bytes()))
            .collect()
    }

    fn subtree(node: NodeId, leaves: &[Hash]) -> Hash {
        let first = node.first_leaf() as usize;
        root(&leaves[first..first + node.leaf_count() as usize])
    }

    #[test]
    fn empty() {
        let range = CompactRange::new();
        assert_eq!(range.size(), 0);
        assert!(range.peaks().is_empty());
        assert_eq!(range.root(), empty_root());
        assert_eq!(range, CompactRange::from_peaks(0, vec![]).unwrap());
        assert!(CompactRange::peak_ids(0).is_empty());
    }

    #[test]
    fn root_after_each_append_equals_root_of_the_leaves() {
        let all = leaves(300);
        let mut range = CompactRange::new();
        for (i, leaf) in all.iter().enumerate() {
            range.append(*leaf, |_, _| {});
            assert_eq!(range.size(), i as u64 + 1);
            assert_eq!(range.root(), root(&all[..=i]), "size {}", i + 1);
        }
    }

    #[test]
    fn visit_reports_exactly_the_completed_perfect_nodes() {
        let all = leaves(300);
        let mut range = CompactRange::new();
        let mut seen = BTreeSet::new();
        for (i, leaf) in all.iter().enumerate() {
            let position = i as u64;
            let mut visited = Vec::new();
            range.append(*leaf, |node, hash| visited.push((node, *hash)));
            // Completed now: the leaf and every ancestor whose last leaf it
            // is, i.e. one per trailing one bit of size + 1 ... below the
            // lowest zero bit of `position`.
            let size = position + 1;
            let expected: Vec<NodeId> = (0..64u8)
                .take_while(|&level| size % (1u64 << level) == 0)
                .map(|level| NodeId::new(level, position >> level))
                .collect();
            let nodes: Vec<NodeId> = visited.iter().map(|(node, _)| *node).collect();
            assert_eq!(nodes, expected, "append #{position}");
            for (node, hash) in visited {
                assert_eq!(hash, subtree(node, &all), "{node:?}");
                assert!(seen.insert(node), "{node:?} reported twice");
            }
        }
        // Over all appends: every perfect subtree of [0, 300), once each.
        let mut all_perfect = BTreeSet::new();
        for level in 0..=8u8 {
            for index in 0..(300u64 >> level) {
                all_perfect.insert(NodeId::new(level, index));
            }
        }
        assert_eq!(seen, all_perfect);
    }

    #[test]
    fn peaks_are_the_stored_subtrees_of_the_root_plan() {
        let all = leaves(130);
        let mut range = CompactRange::new();
        for size in 0..=130u64 {
            let ids = CompactRange::peak_ids(size);
            assert_eq!(ids, root_plan(size));
            let stored: Vec<Hash> = ids.iter().map(|&id| subtree(id, &all)).collect();
            assert_eq!(range.peaks(), stored.as_slice(), "size {size}");
            // from_peaks round-trips, and the resumed range carries on.
            let mut resumed = CompactRange::from_peaks(size, stored).unwrap();
            assert_eq!(resumed, range);
            if let Some(next) = all.get(size as usize) {
                resumed.append(*next, |_, _| {});
                range.append(*next, |_, _| {});
                assert_eq!(resumed, range);
            }
        }
    }

    #[test]
    fn from_peaks_checks_the_count() {
        assert_eq!(
            CompactRange::from_peaks(6, vec![[0; 32]]),
            Err(ProofError::WrongPeakCount {
                size: 6,
                expected: 2,
                got: 1
            })
        );
        assert!(CompactRange::from_peaks(0, vec![[0; 32]]).is_err());
        assert!(CompactRange::from_peaks(7, vec![[0; 32]; 3]).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Resuming at any size from the peaks gives the same tree as never
        /// stopping.
        #[test]
        fn resume_anywhere(total in 1u64..=400, cut in any::<u64>()) {
            let all = leaves(total);
            let stop = cut % (total + 1);
            let mut first = CompactRange::new();
            for leaf in &all[..stop as usize] {
                first.append(*leaf, |_, _| {});
            }
            let mut resumed = CompactRange::from_peaks(stop, first.peaks().to_vec()).unwrap();
            for leaf in &all[stop as usize..] {
                resumed.append(*leaf, |_, _| {});
            }
            prop_assert_eq!(resumed.root(), root(&all));
            prop_assert_eq!(resumed.size(), total);
        }
    }
}
