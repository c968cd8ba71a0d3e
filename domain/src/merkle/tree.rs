//! The Merkle tree of the ledger: RFC 9162 section 2 with BLAKE3 as `HASH`.
//!
//! Everything here is a pure function of its arguments so that the sequencer
//! (which writes the tree), the proof server (which reads it back from
//! storage) and an auditor (who verifies offline) run the very same code.
//!
//! The functions follow the RFC's definitions closely enough to be checked
//! against it line by line; comments name the section and step:
//!
//! | RFC 9162 | here |
//! | --- | --- |
//! | 2.1.1 `MTH(D[n])` | [`leaf_hash`], [`node_hash`], [`empty_root`], [`root`] |
//! | 2.1.3.1 `PATH(m, D[n])` | [`inclusion_proof`] (in memory), [`inclusion_plan`] (from storage) |
//! | 2.1.3.2 verifying an inclusion proof | [`verify_inclusion`] |
//! | 2.1.4.1 `PROOF(m, D[n])`, `SUBPROOF` | [`consistency_proof`] (in memory), [`consistency_plan`] (from storage) |
//! | 2.1.4.2 verifying a consistency proof | [`verify_consistency`] |
//!
//! # Proofs from storage
//!
//! The sequencer stores the hash of every *perfect* subtree (a [`NodeId`]: a
//! complete, aligned block of `2^level` leaves) once it is complete. Such a
//! hash never changes as the tree grows, so it can be written once and cached
//! forever. The RFC's proofs, however, also contain hashes of *incomplete*
//! ranges on the right border of the tree (`MTH(D[k:n])` where `n` is the tree
//! size). Such a range is itself an RFC subtree, so its hash is the
//! [`fold_right`] of the perfect subtrees it decomposes into
//! ([`range_nodes`]). A [`ProofPlan`] names the perfect subtrees to read and
//! how to fold them into the RFC's proof entries; [`inclusion_proof`] and
//! [`consistency_proof`] compute the same entries from the leaves in memory.

use thiserror::Error;

/// A BLAKE3 digest.
pub type Hash = [u8; HASH_LEN];
/// Bytes of a [`Hash`].
pub const HASH_LEN: usize = 32;

/// RFC 9162 2.1.1: leaves are hashed as `HASH(0x00 || d(i))` ...
const LEAF_PREFIX: u8 = 0x00;
/// ... and interior nodes as `HASH(0x01 || left || right)`. The distinct
/// prefixes keep a leaf from ever being passed off as an interior node (a
/// second-preimage attack on the tree shape).
const NODE_PREFIX: u8 = 0x01;

/// `MTH({d}) = HASH(0x00 || d)`: the hash of one leaf (RFC 9162 2.1.1).
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[LEAF_PREFIX]);
    hasher.update(leaf);
    *hasher.finalize().as_bytes()
}

/// `HASH(0x01 || left || right)`: the hash of an interior node (RFC 9162 2.1.1).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    // One contiguous 65-byte input: a single BLAKE3 chunk, hashed in one call
    // (this is the sequencer's hot path, about one node per appended leaf).
    let mut input = [0u8; 1 + 2 * HASH_LEN];
    input[0] = NODE_PREFIX;
    input[1..=HASH_LEN].copy_from_slice(left);
    input[1 + HASH_LEN..].copy_from_slice(right);
    *blake3::hash(&input).as_bytes()
}

/// `MTH({}) = HASH()`: the root of the empty tree is the hash of the empty
/// string (RFC 9162 2.1.1).
pub fn empty_root() -> Hash {
    *blake3::hash(b"").as_bytes()
}

/// RFC 9162 2.1.1: "let k be the largest power of two smaller than n (i.e.,
/// k < n <= 2k)". Only defined for `n >= 2`, the only case the RFC splits.
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2, "the RFC only splits trees of two or more leaves");
    // 2^floor(log2(n - 1)): the highest set bit of n - 1.
    1 << (63 - (n - 1).leading_zeros())
}

/// [`split_point`] for slice lengths (the in-memory recursions).
fn split_len(n: usize) -> usize {
    // A slice length fits in u64 and k < n, so k fits back into usize.
    split_point(n as u64) as usize
}

/// `MTH(D[n])` over already-hashed leaves (RFC 9162 2.1.1).
///
/// The RFC's recursion splits `D[n]` at the largest power of two `k < n`: the
/// left part `D[0:k]` is a perfect subtree, the right part is again split the
/// same way. Unrolled, `MTH(D[n])` is the [`fold_right`] of the perfect
/// subtrees of `n`'s binary decomposition ([`root_plan`]), largest first. This
/// computes those "peaks" bottom-up with a stack, as the sequencer does
/// ([`super::compact::CompactRange`]): O(n) hashes, O(log n) memory, no
/// recursion.
pub fn root(leaf_hashes: &[Hash]) -> Hash {
    let mut peaks: Vec<Hash> = Vec::with_capacity(64);
    for (count, leaf) in leaf_hashes.iter().enumerate() {
        // `count` leaves come before this one; each trailing one bit of
        // `count` is a peak of the same height as the subtree being built,
        // which the new leaf completes into a twice-as-large one.
        let mut hash = *leaf;
        let mut below = count as u64;
        while below & 1 == 1 {
            let Some(left) = peaks.pop() else { break };
            hash = node_hash(&left, &hash);
            below >>= 1;
        }
        peaks.push(hash);
    }
    fold_right(&peaks)
}

/// A perfect subtree: `level` = height (0 = a leaf), covering leaves
/// `[index << level, (index + 1) << level)`.
///
/// Its hash is fixed as soon as its last leaf is appended, which is why
/// storage keeps exactly these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    /// Height above the leaves: the subtree holds `2^level` leaves.
    pub level: u8,
    /// Position among the subtrees of this level, from the left.
    pub index: u64,
}

impl NodeId {
    /// The subtree of height `level` at position `index` of that level.
    pub const fn new(level: u8, index: u64) -> Self {
        Self { level, index }
    }

    /// The index of its first (leftmost) leaf. Every `NodeId` of a tree of
    /// `u64` leaves has `level < 64` and a first leaf below `2^64`; the result
    /// saturates for a value no such tree has.
    pub fn first_leaf(&self) -> u64 {
        match self.index.checked_shl(u32::from(self.level)) {
            Some(first) if first >> self.level == self.index => first,
            _ => u64::MAX,
        }
    }

    /// How many leaves it covers: `2^level` (saturating at `u64::MAX` for a
    /// level of 64 or more, which no tree of `u64` leaves has).
    pub fn leaf_count(&self) -> u64 {
        1u64.checked_shl(u32::from(self.level)).unwrap_or(u64::MAX)
    }
}

/// The perfect subtrees `[lo, hi)` decomposes into when `lo..hi` is the right
/// part of an RFC 9162 split (binary decomposition, largest first): the nodes
/// whose hashes fold into `MTH(D[lo:hi])`.
///
/// Every subtree of an RFC tree covers such a range: `lo` is a multiple of a
/// power of two at least `hi - lo`. Splitting it per RFC 9162 2.1.1 peels off
/// a perfect, aligned left part of the largest power of two below its length,
/// and again on the right part, so the pieces are the one bits of `hi - lo`
/// from the highest down and `MTH(D[lo:hi]) = fold_right(their hashes)`.
///
/// For any other range the result is still the minimal cover of `[lo, hi)` by
/// perfect subtrees (sizes growing from `lo`'s alignment, then shrinking), but
/// folding those is not an RFC subtree hash. An empty range (`lo >= hi`) gives
/// no nodes.
pub fn range_nodes(lo: u64, hi: u64) -> Vec<NodeId> {
    let mut nodes = Vec::new();
    let mut pos = lo;
    while pos < hi {
        // The largest perfect subtree starting at `pos`: aligned (its size
        // divides `pos`) and ending by `hi`.
        let aligned = if pos == 0 { 63 } else { pos.trailing_zeros() };
        let fits = 63 - (hi - pos).leading_zeros();
        let level = aligned.min(fits);
        nodes.push(NodeId::new(level as u8, pos >> level));
        pos += 1 << level;
    }
    nodes
}

/// `node(h0, node(h1, ... node(h_{k-2}, h_{k-1})))`: `MTH` of a range from
/// the hashes of its [`range_nodes`] (the RFC's right-leaning split, unrolled).
/// An empty slice gives [`empty_root`]; a single hash is returned as is.
pub fn fold_right(hashes: &[Hash]) -> Hash {
    let Some((last, rest)) = hashes.split_last() else {
        return empty_root();
    };
    rest.iter()
        .rev()
        .fold(*last, |right, left| node_hash(left, &right))
}

/// The root hash of the tree of `size` leaves from perfect-subtree hashes: the
/// nodes to read (= `range_nodes(0, size)`, largest first); the root is the
/// [`fold_right`] of their hashes.
pub fn root_plan(size: u64) -> Vec<NodeId> {
    range_nodes(0, size)
}

/// Why a proof could not be produced or did not verify.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ProofError {
    /// An inclusion proof needs a leaf that is in the tree.
    #[error("leaf index {index} is not in a tree of {size} leaves")]
    IndexOutOfRange {
        /// The leaf index asked for.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// A consistency proof goes from a smaller (or equal) tree to a larger one.
    #[error("the first tree size {size1} is larger than the second tree size {size2}")]
    SizeOrder {
        /// The first (older) tree size.
        size1: u64,
        /// The second (newer) tree size.
        size2: u64,
    },
    /// The proof does not have the number of hashes the index and tree
    /// size(s) call for (RFC 9162 2.1.3.2 steps 4.a / 5, 2.1.4.2 steps 1, 6.a, 7).
    #[error("the proof has {got} hashes where the tree sizes call for {expected}")]
    WrongProofLength {
        /// Hashes the proof must have.
        expected: usize,
        /// Hashes it has.
        got: usize,
    },
    /// The proof does not lead to the (second) root hash: the leaf, its index,
    /// the tree size, a proof hash or the root is not what it claims to be.
    #[error("the proof does not lead to the given root hash")]
    RootMismatch,
    /// A consistency proof does not lead to the first tree's root hash.
    #[error("the consistency proof does not lead to the first tree's root hash")]
    FirstRootMismatch,
    /// [`ProofPlan::assemble`] needs one hash per planned node.
    #[error("the plan reads {expected} subtree hashes but {got} were given")]
    WrongHashCount {
        /// `plan.nodes().len()`.
        expected: usize,
        /// Hashes given.
        got: usize,
    },
    /// An in-memory proof needs the leaf hashes of the whole tree.
    #[error("a tree of {size} leaves was asked for but only {have} leaf hashes were given")]
    NotEnoughLeaves {
        /// The tree size asked for.
        size: u64,
        /// Leaf hashes given.
        have: usize,
    },
    /// A compact range of `size` leaves has one peak per one bit of `size`.
    #[error("a compact range of {size} leaves has {expected} peaks but {got} were given")]
    WrongPeakCount {
        /// The size of the range.
        size: u64,
        /// `size.count_ones()`.
        expected: usize,
        /// Peaks given.
        got: usize,
    },
}

/// Which stored perfect-subtree hashes a storage-backed proof needs, and how
/// to assemble the proof from them.
///
/// Each RFC proof entry is the [`fold_right`] of a consecutive group of
/// [`nodes`](Self::nodes): a group of one for a perfect subtree, several for
/// an incomplete range on the right border of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProofPlan {
    /// All groups' nodes, in proof order.
    nodes: Vec<NodeId>,
    /// The number of nodes of each proof entry, in proof order (never 0).
    groups: Vec<usize>,
}

impl ProofPlan {
    /// Builds a plan from proof entries listed from the root down. The RFC's
    /// recursions (`PATH(m, D[n]) = PATH(...) : MTH(...)`, likewise
    /// `SUBPROOF`) emit the entry found at the top *after* everything found
    /// below it, so the proof order is the reverse of the walk's.
    fn from_top_down(top_down: Vec<Vec<NodeId>>) -> Self {
        let mut nodes = Vec::new();
        let mut groups = Vec::with_capacity(top_down.len());
        for group in top_down.into_iter().rev() {
            groups.push(group.len());
            nodes.extend(group);
        }
        Self { nodes, groups }
    }

    /// The distinct perfect subtrees to read, in a fixed order (the proof's).
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// The RFC proof entries, in RFC order, from `hashes[i]` = the hash of
    /// `nodes()[i]`.
    pub fn assemble(&self, hashes: &[Hash]) -> Result<Vec<Hash>, ProofError> {
        let wrong_count = ProofError::WrongHashCount {
            expected: self.nodes.len(),
            got: hashes.len(),
        };
        if hashes.len() != self.nodes.len() {
            return Err(wrong_count);
        }
        let mut proof = Vec::with_capacity(self.groups.len());
        let mut rest = hashes;
        for &len in &self.groups {
            let Some((group, tail)) = rest.split_at_checked(len) else {
                return Err(wrong_count);
            };
            proof.push(fold_right(group));
            rest = tail;
        }
        Ok(proof)
    }
}

/// The plan of `PATH(index, D[size])` (RFC 9162 2.1.3.1) from stored
/// perfect-subtree hashes. Errors if `index >= size`.
pub fn inclusion_plan(index: u64, size: u64) -> Result<ProofPlan, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    // The RFC's recursion, walked from the root down over absolute leaf
    // positions: the current subtree is D[lo:hi] (the RFC's D[n], n = hi - lo)
    // and the RFC's m is index - lo.
    let (mut lo, mut hi) = (0, size);
    let mut top_down = Vec::new();
    // PATH(0, {d(0)}) = {}: a single leaf needs nothing more.
    while hi - lo > 1 {
        let k = split_point(hi - lo);
        if index - lo < k {
            // m < k: PATH(m, D[n]) = PATH(m, D[0:k]) : MTH(D[k:n]).
            // D[k:n] may end at the tree size, i.e. be incomplete: fold it
            // from its perfect parts.
            top_down.push(range_nodes(lo + k, hi));
            hi = lo + k;
        } else {
            // m >= k: PATH(m, D[n]) = PATH(m - k, D[k:n]) : MTH(D[0:k]).
            // D[0:k] is perfect (k is a power of two and lo a multiple of it),
            // so this is a single node.
            top_down.push(range_nodes(lo, lo + k));
            lo += k;
        }
    }
    Ok(ProofPlan::from_top_down(top_down))
}

/// The plan of `PROOF(size1, D[size2])` (RFC 9162 2.1.4.1) from stored
/// perfect-subtree hashes. Errors if `size1 > size2`; the plan is empty when
/// `size1 == 0` or `size1 == size2` (nothing to prove).
pub fn consistency_plan(size1: u64, size2: u64) -> Result<ProofPlan, ProofError> {
    if size1 > size2 {
        return Err(ProofError::SizeOrder { size1, size2 });
    }
    let mut top_down = Vec::new();
    // The RFC defines PROOF for 0 < m < n; m == n would be
    // SUBPROOF(m, D[m], true) = {}, and every tree extends the empty one.
    if size1 == 0 || size1 == size2 {
        return Ok(ProofPlan::from_top_down(top_down));
    }
    // PROOF(m, D[n]) = SUBPROOF(m, D[n], true), walked from the root down over
    // absolute positions: the current subtree is D[lo:hi] (the RFC's D[n]),
    // the RFC's m is size1 - lo, and `b` is its flag "this subtree's hash is
    // the old root, which the verifier already has".
    let (mut lo, mut hi, mut b) = (0, size2, true);
    loop {
        let (n, m) = (hi - lo, size1 - lo);
        if m == n {
            // SUBPROOF(m, D[m], true) = {}; SUBPROOF(m, D[m], false) = {MTH(D[m])}.
            // Reached below a left turn (a right turn keeps hi = size2 > size1),
            // so D[lo:hi] is perfect: a single node.
            if !b {
                top_down.push(range_nodes(lo, hi));
            }
            break;
        }
        // m < n from here (0 < m holds all along: see the two branches).
        let k = split_point(n);
        if m <= k {
            // m <= k: SUBPROOF(m, D[n], b) = SUBPROOF(m, D[0:k], b) : MTH(D[k:n]).
            // D[k:n] may be incomplete (it ends at size2): fold its parts.
            top_down.push(range_nodes(lo + k, hi));
            hi = lo + k;
        } else {
            // m > k: SUBPROOF(m, D[n], b) = SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k]).
            // D[0:k] is perfect: a single node. m - k > 0.
            top_down.push(range_nodes(lo, lo + k));
            lo += k;
            b = false;
        }
    }
    Ok(ProofPlan::from_top_down(top_down))
}

/// The first `size` leaf hashes, or why there are not that many.
fn tree_leaves(leaf_hashes: &[Hash], size: u64) -> Result<&[Hash], ProofError> {
    match usize::try_from(size) {
        Ok(n) if n <= leaf_hashes.len() => Ok(&leaf_hashes[..n]),
        _ => Err(ProofError::NotEnoughLeaves {
            size,
            have: leaf_hashes.len(),
        }),
    }
}

/// `PATH(index, D[size])` (RFC 9162 2.1.3.1) computed from the leaf hashes in
/// memory (`leaf_hashes.len() >= size`; leaves past `size` are ignored).
/// O(size) hashes. Gives exactly the entries of [`inclusion_plan`] assembled
/// from the subtree hashes.
pub fn inclusion_proof(
    index: u64,
    size: u64,
    leaf_hashes: &[Hash],
) -> Result<Vec<Hash>, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let leaves = tree_leaves(leaf_hashes, size)?;
    let mut proof = Vec::new();
    // index < size <= leaves.len(), so it fits in usize.
    path(index as usize, leaves, &mut proof);
    Ok(proof)
}

/// RFC 9162 2.1.3.1, transcribed: appends `PATH(m, D[n])` for `D[n] = d`.
/// Recursion depth is the tree height (at most 64).
fn path(m: usize, d: &[Hash], proof: &mut Vec<Hash>) {
    let n = d.len();
    // PATH(0, {d(0)}) = {}.
    if n <= 1 {
        return;
    }
    // For n > 1, let k be the largest power of two smaller than n.
    let k = split_len(n);
    if m < k {
        // PATH(m, D[n]) = PATH(m, D[0:k]) : MTH(D[k:n]) for m < k.
        path(m, &d[..k], proof);
        proof.push(root(&d[k..]));
    } else {
        // PATH(m, D[n]) = PATH(m - k, D[k:n]) : MTH(D[0:k]) for m >= k.
        path(m - k, &d[k..], proof);
        proof.push(root(&d[..k]));
    }
}

/// `PROOF(size1, D[size2])` (RFC 9162 2.1.4.1) computed from the leaf hashes
/// in memory (`leaf_hashes.len() >= size2`). Empty when `size1 == 0` or
/// `size1 == size2`. O(size2) hashes. Gives exactly the entries of
/// [`consistency_plan`] assembled from the subtree hashes.
pub fn consistency_proof(
    size1: u64,
    size2: u64,
    leaf_hashes: &[Hash],
) -> Result<Vec<Hash>, ProofError> {
    if size1 > size2 {
        return Err(ProofError::SizeOrder { size1, size2 });
    }
    let leaves = tree_leaves(leaf_hashes, size2)?;
    let mut proof = Vec::new();
    // PROOF is defined for 0 < m < n (see consistency_plan for the edges).
    if size1 > 0 && size1 < size2 {
        // PROOF(m, D[n]) = SUBPROOF(m, D[n], true); size1 < size2 fits usize.
        subproof(size1 as usize, leaves, true, &mut proof);
    }
    Ok(proof)
}

/// RFC 9162 2.1.4.1, transcribed: appends `SUBPROOF(m, D[n], b)` for
/// `D[n] = d`, `0 < m <= n`. Recursion depth is the tree height.
fn subproof(m: usize, d: &[Hash], b: bool, proof: &mut Vec<Hash>) {
    let n = d.len();
    if m == n {
        // SUBPROOF(m, D[m], true) = {}: the subtree is the old tree itself,
        // whose root the verifier has.
        // SUBPROOF(m, D[m], false) = {MTH(D[m])}: a subtree of the old tree
        // the verifier cannot compute on its own.
        if !b {
            proof.push(root(d));
        }
        return;
    }
    // For m < n, let k be the largest power of two smaller than n.
    let k = split_len(n);
    if m <= k {
        // SUBPROOF(m, D[n], b) = SUBPROOF(m, D[0:k], b) : MTH(D[k:n]) for m <= k.
        subproof(m, &d[..k], b, proof);
        proof.push(root(&d[k..]));
    } else {
        // SUBPROOF(m, D[n], b) = SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k]) for m > k.
        subproof(m - k, &d[k..], false, proof);
        proof.push(root(&d[..k]));
    }
}

/// The number of hashes in `PATH(index, D[size])`, `index < size`.
///
/// Below the level where the paths to `index` and to the last leaf
/// (`size - 1`) meet, the leaf sits in a perfect subtree and every level has a
/// sibling (`inner` of them). Above, the path runs along the right border,
/// where a node has a (left) sibling exactly when its position bit is 1.
fn inclusion_proof_len(index: u64, size: u64) -> usize {
    let inner = 64 - (index ^ (size - 1)).leading_zeros();
    let border = (index.checked_shr(inner).unwrap_or(0)).count_ones();
    (inner + border) as usize
}

/// The number of hashes in `PROOF(size1, D[size2])`, `0 < size1 < size2`.
///
/// It is the inclusion path of the old tree's last leaf (`size1 - 1`) in the
/// new tree, minus the levels inside the old tree's smallest peak (of
/// `2^trailing_zeros(size1)` leaves, whose hash is the proof's first entry
/// instead), and that first entry is left out when it is the whole old tree
/// (`size1` a power of two: the verifier has it as the old root).
fn consistency_proof_len(size1: u64, size2: u64) -> usize {
    let last = size1 - 1;
    let inner = 64 - (last ^ (size2 - 1)).leading_zeros();
    let border = (last.checked_shr(inner).unwrap_or(0)).count_ones();
    // size1 < size2 puts the paths' meeting point above the smallest peak.
    let inner = inner.saturating_sub(size1.trailing_zeros());
    let seed = u32::from(!size1.is_power_of_two());
    (seed + inner + border) as usize
}

/// Verifies that `leaf_hash` is the leaf at `index` of the tree of `size`
/// leaves whose root is `root`, given `proof` = `PATH(index, D[size])`
/// (RFC 9162 2.1.3.2).
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    // 1. If leaf_index is greater than or equal to tree_size, then fail the
    //    proof verification.
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    // Not an RFC step: a proof of the wrong length fails steps 4.a or 5 below
    // anyway, but only after hashing it; checking first names the fault.
    let expected = inclusion_proof_len(index, size);
    let wrong_length = ProofError::WrongProofLength {
        expected,
        got: proof.len(),
    };
    if proof.len() != expected {
        return Err(wrong_length);
    }
    // 2. Set fn to leaf_index and sn to tree_size - 1. (fn is a Rust keyword.)
    // fn is the position of the running hash r at its level and sn the
    // position of the last node of that level.
    let (mut fn_, mut sn) = (index, size - 1);
    // 3. Set r to hash.
    let mut r = *leaf_hash;
    // 4. For each value p in the inclusion_path array:
    for p in proof {
        // a. If sn is 0, then stop the iteration and fail the proof
        //    verification. (r is already the root: the proof is too long.)
        if sn == 0 {
            return Err(wrong_length);
        }
        // b. If LSB(fn) is set, or if fn is equal to sn, then:
        //    (r is a right child, or the last node of its level)
        if fn_ & 1 == 1 || fn_ == sn {
            // i. Set r to HASH(0x01 || p || r).
            r = node_hash(p, &r);
            // ii. If LSB(fn) is not set, then right-shift both fn and sn
            //     equally until either LSB(fn) is set or fn is 0.
            //     (A last node without a right sibling is carried up
            //     unchanged until it becomes a right child.)
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            // Otherwise: i. Set r to HASH(0x01 || r || p). (r is a left child.)
            r = node_hash(&r, p);
        }
        // c. Finally, right-shift both fn and sn one time.
        fn_ >>= 1;
        sn >>= 1;
    }
    // 5. Compare sn to 0. Compare r against the root_hash. If sn is equal to 0
    //    and r and the root_hash are equal, then the log has proven the
    //    inclusion of hash. Otherwise, fail the proof verification.
    if sn != 0 {
        return Err(wrong_length);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Verifies that the tree of `size2` leaves with root `root2` extends the tree
/// of `size1` leaves with root `root1`, given `proof` =
/// `PROOF(size1, D[size2])` (RFC 9162 2.1.4.2).
///
/// The RFC covers `0 < size1 < size2`. Beyond it: `size1 == size2` needs an
/// empty proof and equal roots; `size1 == 0` needs an empty proof and is
/// always consistent (every tree extends the empty one, whatever `root1` says).
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    proof: &[Hash],
    root1: &Hash,
    root2: &Hash,
) -> Result<(), ProofError> {
    let wrong_length = |expected: usize| ProofError::WrongProofLength {
        expected,
        got: proof.len(),
    };
    if size1 > size2 {
        return Err(ProofError::SizeOrder { size1, size2 });
    }
    if size1 == size2 {
        if !proof.is_empty() {
            return Err(wrong_length(0));
        }
        if root1 != root2 {
            return Err(ProofError::RootMismatch);
        }
        return Ok(());
    }
    if size1 == 0 {
        if !proof.is_empty() {
            return Err(wrong_length(0));
        }
        return Ok(());
    }
    let expected = consistency_proof_len(size1, size2);
    // 1. If consistency_path is an empty array, stop and fail the proof
    //    verification.
    // (Not an RFC step: any other wrong length fails steps 6.a or 7 below,
    // after hashing; checking first names the fault.)
    if proof.is_empty() || proof.len() != expected {
        return Err(wrong_length(expected));
    }
    // 2. If first is an exact power of 2, then prepend first_hash to the
    //    consistency_path array. (The old tree is then a perfect subtree of
    //    the new one and its root the starting point; chained, not copied.)
    let prepended = size1.is_power_of_two().then_some(root1);
    let mut path = prepended.into_iter().chain(proof);
    // 3. Set fn to first - 1 and sn to second - 1.
    // (fn: position of the old tree's last leaf; sn: of the new tree's.)
    let (mut fn_, mut sn) = (size1 - 1, size2 - 1);
    // 4. If LSB(fn) is set, then right-shift both fn and sn equally until
    //    LSB(fn) is not set. (Skip the levels inside the old tree's smallest
    //    peak, whose hash is the first path entry.)
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    // 5. Set both fr and sr to the first value in the consistency_path array.
    let Some(first) = path.next() else {
        return Err(wrong_length(expected));
    };
    let (mut fr, mut sr) = (*first, *first);
    // 6. For each subsequent value c in the consistency_path array:
    for c in path {
        // a. If sn is 0, then stop the iteration and fail the proof
        //    verification.
        if sn == 0 {
            return Err(wrong_length(expected));
        }
        // b. If LSB(fn) is set, or if fn is equal to sn, then:
        //    (c is a left sibling, inside the old tree too)
        if fn_ & 1 == 1 || fn_ == sn {
            // i. Set fr to HASH(0x01 || c || fr).
            fr = node_hash(c, &fr);
            // ii. Set sr to HASH(0x01 || c || sr).
            sr = node_hash(c, &sr);
            // iii. If LSB(fn) is not set, then right-shift both fn and sn
            //      equally until either LSB(fn) is set or fn is 0.
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            // Otherwise: i. Set sr to HASH(0x01 || sr || c).
            // (c is a right sibling, added after the old tree: only the new
            // root includes it.)
            sr = node_hash(&sr, c);
        }
        // c. Finally, right-shift both fn and sn one time.
        fn_ >>= 1;
        sn >>= 1;
    }
    // 7. Verify that the fr calculated is equal to the first_hash supplied,
    //    that the sr calculated is equal to the second_hash supplied, and
    //    that sn is 0.
    if sn != 0 {
        return Err(wrong_length(expected));
    }
    if fr != *root1 {
        return Err(ProofError::FirstRootMismatch);
    }
    if sr != *root2 {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Distinct leaf hashes `leaf_hash("leaf {i} of {seed}")`.
    fn leaves_with_seed(n: u64, seed: u64) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("leaf {i} of {seed}").as_bytes()))
            .collect()
    }

    fn leaves(n: u64) -> Vec<Hash> {
        leaves_with_seed(n, 0)
    }

    /// The stored hash of a perfect subtree, from the leaves.
    fn stored(node: NodeId, leaves: &[Hash]) -> Hash {
        let first = node.first_leaf() as usize;
        root(&leaves[first..first + node.leaf_count() as usize])
    }

    fn stored_all(nodes: &[NodeId], leaves: &[Hash]) -> Vec<Hash> {
        nodes.iter().map(|&node| stored(node, leaves)).collect()
    }

    /// RFC 9162 2.1.1 MTH, recursive, as a reference for `root`.
    fn mth(d: &[Hash]) -> Hash {
        match d.len() {
            0 => empty_root(),
            1 => d[0],
            n => {
                let k = split_len(n);
                node_hash(&mth(&d[..k]), &mth(&d[k..]))
            }
        }
    }

    fn flip(hash: &Hash, bit: usize) -> Hash {
        let mut out = *hash;
        out[(bit / 8) % HASH_LEN] ^= 1 << (bit % 8);
        out
    }

    /// The leaves a..h of the hand-checked trees (`l`), and their parents by
    /// name: `ab = node(a, b)`, `efg = node(ef, g)`, ...
    struct Hand {
        l: Vec<Hash>,
        a: Hash,
        b: Hash,
        c: Hash,
        d: Hash,
        e: Hash,
        f: Hash,
        g: Hash,
        h: Hash,
        ab: Hash,
        cd: Hash,
        ef: Hash,
        gh: Hash,
        abcd: Hash,
        efg: Hash,
        efgh: Hash,
    }

    fn n(left: Hash, right: Hash) -> Hash {
        node_hash(&left, &right)
    }

    impl Hand {
        fn new() -> Self {
            let l: Vec<Hash> = (b'a'..=b'h').map(|c| leaf_hash(&[c])).collect();
            let [a, b, c, d, e, f, g, h] = l[..] else {
                unreachable!()
            };
            let (ab, cd, ef, gh) = (n(a, b), n(c, d), n(e, f), n(g, h));
            Self {
                l,
                a,
                b,
                c,
                d,
                e,
                f,
                g,
                h,
                ab,
                cd,
                ef,
                gh,
                abcd: n(ab, cd),
                efg: n(ef, g),
                efgh: n(ef, gh),
            }
        }
    }

    #[test]
    fn hashes_are_blake3_with_rfc_prefixes() {
        // BLAKE3("") from the BLAKE3 test vectors.
        let empty: Hash = [
            0xaf, 0x13, 0x49, 0xb9, 0xf5, 0xf9, 0xa1, 0xa6, 0xa0, 0x40, 0x4d, 0xea, 0x36, 0xdc,
            0xc9, 0x49, 0x9b, 0xcb, 0x25, 0xc9, 0xad, 0xc1, 0x12, 0xb7, 0xcc, 0x9a, 0x93, 0xca,
            0xe4, 0x1f, 0x32, 0x62,
        ];
        assert_eq!(empty_root(), empty);
        assert_eq!(root(&[]), empty);
        assert_eq!(leaf_hash(b"x"), *blake3::hash(b"\x00x").as_bytes());
        let (l, r) = ([1u8; 32], [2u8; 32]);
        let mut input = vec![1u8];
        input.extend_from_slice(&l);
        input.extend_from_slice(&r);
        assert_eq!(node_hash(&l, &r), *blake3::hash(&input).as_bytes());
        // The prefixes separate a leaf from a node over the same bytes.
        assert_ne!(leaf_hash(&input[1..]), node_hash(&l, &r));
    }

    #[test]
    fn roots_of_sizes_0_to_8_by_hand() {
        let t = Hand::new();
        let expected = [
            empty_root(),
            t.a,
            t.ab,
            n(t.ab, t.c),
            t.abcd,
            n(t.abcd, t.e),
            n(t.abcd, t.ef),
            n(n(t.ab, t.cd), n(t.ef, t.g)),
            n(t.abcd, t.efgh),
        ];
        for (size, want) in expected.iter().enumerate() {
            let leaves = &t.l[..size];
            assert_eq!(root(leaves), *want, "size {size}");
            assert_eq!(mth(leaves), *want, "reference MTH, size {size}");
            let peaks = stored_all(&root_plan(size as u64), &t.l);
            assert_eq!(fold_right(&peaks), *want, "root_plan, size {size}");
        }
    }

    #[test]
    fn root_equals_recursive_mth_and_root_plan_up_to_300() {
        let all = leaves(300);
        for size in 0..=300usize {
            let want = mth(&all[..size]);
            assert_eq!(root(&all[..size]), want, "size {size}");
            let plan = root_plan(size as u64);
            assert_eq!(plan.len(), (size as u64).count_ones() as usize);
            assert_eq!(fold_right(&stored_all(&plan, &all)), want, "size {size}");
        }
    }

    #[test]
    fn node_ids() {
        let node = NodeId::new(3, 5);
        assert_eq!(node.first_leaf(), 40);
        assert_eq!(node.leaf_count(), 8);
        assert_eq!(NodeId::new(0, 7).first_leaf(), 7);
        assert_eq!(NodeId::new(0, 7).leaf_count(), 1);
        assert_eq!(NodeId::new(63, 1).first_leaf(), 1 << 63);
        assert_eq!(NodeId::new(64, 0).leaf_count(), u64::MAX);
        assert_eq!(NodeId::new(63, 2).first_leaf(), u64::MAX);
        // Ordered by level, then position.
        assert!(NodeId::new(0, 9) < NodeId::new(1, 0));
    }

    #[test]
    fn range_nodes_of_rfc_ranges_are_the_binary_decomposition() {
        assert_eq!(range_nodes(0, 0), vec![]);
        assert_eq!(range_nodes(5, 5), vec![]);
        assert_eq!(range_nodes(0, 1), vec![NodeId::new(0, 0)]);
        assert_eq!(
            range_nodes(0, 7),
            vec![NodeId::new(2, 0), NodeId::new(1, 2), NodeId::new(0, 6)]
        );
        assert_eq!(
            range_nodes(4, 7),
            vec![NodeId::new(1, 2), NodeId::new(0, 6)]
        );
        assert_eq!(
            range_nodes(16, 29),
            vec![NodeId::new(3, 2), NodeId::new(2, 6), NodeId::new(0, 28)]
        );
        // Every RFC range [lo, hi), lo a multiple of a power of two >= hi - lo:
        // the one bits of hi - lo, largest first, contiguous, and their fold
        // is MTH(D[lo:hi]).
        let all = leaves(128);
        for len in 1..=64u64 {
            let align = len.next_power_of_two();
            for lo in (0..=128 - len).step_by(align as usize) {
                let nodes = range_nodes(lo, lo + len);
                let levels: Vec<u32> = nodes.iter().map(|n| u32::from(n.level)).collect();
                let mut bits: Vec<u32> = (0..64).filter(|b| len >> b & 1 == 1).collect();
                bits.reverse();
                assert_eq!(levels, bits, "[{lo}, {})", lo + len);
                let mut pos = lo;
                for node in &nodes {
                    assert_eq!(node.first_leaf(), pos);
                    pos += node.leaf_count();
                }
                let range = &all[lo as usize..(lo + len) as usize];
                assert_eq!(fold_right(&stored_all(&nodes, &all)), mth(range));
            }
        }
    }

    #[test]
    fn range_nodes_of_other_ranges_still_cover_them_with_perfect_subtrees() {
        assert_eq!(
            range_nodes(3, 13),
            vec![
                NodeId::new(0, 3),
                NodeId::new(2, 1),
                NodeId::new(2, 2),
                NodeId::new(0, 12)
            ]
        );
        for lo in 0..70u64 {
            for hi in lo..70u64 {
                let mut pos = lo;
                for node in range_nodes(lo, hi) {
                    assert_eq!(node.first_leaf(), pos);
                    pos += node.leaf_count();
                }
                assert_eq!(pos, hi);
            }
        }
    }

    #[test]
    fn fold_right_nests_to_the_right() {
        let h = |b: u8| [b; 32];
        assert_eq!(fold_right(&[]), empty_root());
        assert_eq!(fold_right(&[h(1)]), h(1));
        assert_eq!(fold_right(&[h(1), h(2)]), node_hash(&h(1), &h(2)));
        assert_eq!(
            fold_right(&[h(1), h(2), h(3)]),
            node_hash(&h(1), &node_hash(&h(2), &h(3)))
        );
    }

    /// PATH(m, D[n]) for every leaf of the trees of 1..=8 leaves, by hand.
    #[test]
    fn inclusion_proofs_of_sizes_1_to_8_by_hand() {
        let t = Hand::new();
        let (a, b, c, d, e, f, g, h) = (t.a, t.b, t.c, t.d, t.e, t.f, t.g, t.h);
        let (ab, cd, ef, gh, abcd, efg, efgh) = (t.ab, t.cd, t.ef, t.gh, t.abcd, t.efg, t.efgh);
        let expected: [Vec<Vec<Hash>>; 8] = [
            vec![vec![]],
            vec![vec![b], vec![a]],
            vec![vec![b, c], vec![a, c], vec![ab]],
            vec![vec![b, cd], vec![a, cd], vec![d, ab], vec![c, ab]],
            vec![
                vec![b, cd, e],
                vec![a, cd, e],
                vec![d, ab, e],
                vec![c, ab, e],
                vec![abcd],
            ],
            vec![
                vec![b, cd, ef],
                vec![a, cd, ef],
                vec![d, ab, ef],
                vec![c, ab, ef],
                vec![f, abcd],
                vec![e, abcd],
            ],
            vec![
                vec![b, cd, efg],
                vec![a, cd, efg],
                vec![d, ab, efg],
                vec![c, ab, efg],
                vec![f, g, abcd],
                vec![e, g, abcd],
                vec![ef, abcd],
            ],
            vec![
                vec![b, cd, efgh],
                vec![a, cd, efgh],
                vec![d, ab, efgh],
                vec![c, ab, efgh],
                vec![f, gh, abcd],
                vec![e, gh, abcd],
                vec![h, ef, abcd],
                vec![g, ef, abcd],
            ],
        ];
        for (i, per_leaf) in expected.iter().enumerate() {
            let size = i as u64 + 1;
            let tree_root = root(&t.l[..size as usize]);
            for (index, want) in per_leaf.iter().enumerate() {
                let index = index as u64;
                let got = inclusion_proof(index, size, &t.l).unwrap();
                assert_eq!(&got, want, "PATH({index}, D[{size}])");
                let plan = inclusion_plan(index, size).unwrap();
                assert_eq!(
                    &plan.assemble(&stored_all(plan.nodes(), &t.l)).unwrap(),
                    want
                );
                verify_inclusion(&t.l[index as usize], index, size, want, &tree_root).unwrap();
            }
        }
    }

    /// The example tree of RFC 9162 2.1.5 (7 leaves d0..d6), in its letters:
    /// a..f and d6 are the leaves' hashes, g = (a, b), h = (c, d),
    /// i = (e, f), j = d6, k = (g, h), l = (i, j), root = (k, l).
    #[test]
    fn rfc_9162_example_tree_of_7() {
        let t = Hand::new();
        let (a, b, c, d, e, f, j) = (t.a, t.b, t.c, t.d, t.e, t.f, t.g);
        let (g, h, i) = (node_hash(&a, &b), node_hash(&c, &d), node_hash(&e, &f));
        let (k, l) = (node_hash(&g, &h), node_hash(&i, &j));
        let hash = node_hash(&k, &l);
        assert_eq!(root(&t.l[..7]), hash);
        // 2.1.5: the inclusion proofs for d0, d3, d4 and d6.
        assert_eq!(inclusion_proof(0, 7, &t.l).unwrap(), vec![b, h, l]);
        assert_eq!(inclusion_proof(3, 7, &t.l).unwrap(), vec![c, g, l]);
        assert_eq!(inclusion_proof(4, 7, &t.l).unwrap(), vec![f, j, k]);
        assert_eq!(inclusion_proof(6, 7, &t.l).unwrap(), vec![i, k]);
        // 2.1.5: the consistency proofs between the tree of 7 and its
        // prefixes of 3, 4 and 6 leaves.
        assert_eq!(consistency_proof(3, 7, &t.l).unwrap(), vec![c, d, g, l]);
        assert_eq!(consistency_proof(4, 7, &t.l).unwrap(), vec![l]);
        assert_eq!(consistency_proof(6, 7, &t.l).unwrap(), vec![i, j, k]);
        for (size1, proof) in [(3, vec![c, d, g, l]), (4, vec![l]), (6, vec![i, j, k])] {
            let root1 = root(&t.l[..size1 as usize]);
            verify_consistency(size1, 7, &proof, &root1, &hash).unwrap();
            let plan = consistency_plan(size1, 7).unwrap();
            assert_eq!(
                plan.assemble(&stored_all(plan.nodes(), &t.l)).unwrap(),
                proof
            );
        }
        // l = MTH(D[4:7]) is on the right border: read as its perfect parts.
        let plan = consistency_plan(4, 7).unwrap();
        assert_eq!(plan.nodes(), &[NodeId::new(1, 2), NodeId::new(0, 6)]);
    }

    #[test]
    fn consistency_proofs_by_hand() {
        let t = Hand::new();
        let (b, c, d, e, f) = (t.b, t.c, t.d, t.e, t.f);
        let (ab, cd, gh, abcd, efg) = (t.ab, t.cd, t.gh, t.abcd, t.efg);
        let cases: Vec<(u64, u64, Vec<Hash>)> = vec![
            (1, 2, vec![b]),
            (1, 3, vec![b, c]),
            (2, 3, vec![c]),
            (1, 4, vec![b, cd]),
            (2, 4, vec![cd]),
            (3, 4, vec![c, d, ab]),
            (2, 5, vec![cd, e]),
            (3, 5, vec![c, d, ab, e]),
            (4, 5, vec![e]),
            (2, 7, vec![cd, efg]),
            (4, 6, vec![t.ef]),
            (5, 6, vec![e, f, abcd]),
            (5, 8, vec![e, f, gh, abcd]),
            (6, 8, vec![t.ef, gh, abcd]),
            (7, 8, vec![t.g, t.h, t.ef, abcd]),
            (1, 8, vec![b, cd, t.efgh]),
        ];
        for (size1, size2, want) in cases {
            let got = consistency_proof(size1, size2, &t.l).unwrap();
            assert_eq!(got, want, "PROOF({size1}, D[{size2}])");
            let plan = consistency_plan(size1, size2).unwrap();
            assert_eq!(
                plan.assemble(&stored_all(plan.nodes(), &t.l)).unwrap(),
                want
            );
            let (root1, root2) = (root(&t.l[..size1 as usize]), root(&t.l[..size2 as usize]));
            verify_consistency(size1, size2, &want, &root1, &root2).unwrap();
        }
        // MTH(D[4:7]) = efg is read as its perfect parts ef and g.
        let plan = consistency_plan(2, 7).unwrap();
        assert_eq!(
            plan.nodes(),
            &[NodeId::new(1, 1), NodeId::new(1, 2), NodeId::new(0, 6)]
        );
        assert_eq!(plan.groups, vec![1, 2]);
        // Nothing to prove from the empty tree or to the same size.
        for (size1, size2) in [(0, 0), (0, 5), (5, 5)] {
            assert!(consistency_proof(size1, size2, &t.l).unwrap().is_empty());
            assert!(consistency_plan(size1, size2).unwrap().nodes().is_empty());
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let l = leaves(8);
        let out_of_range = ProofError::IndexOutOfRange { index: 5, size: 5 };
        assert_eq!(inclusion_plan(5, 5), Err(out_of_range.clone()));
        assert_eq!(inclusion_proof(5, 5, &l), Err(out_of_range.clone()));
        assert_eq!(
            verify_inclusion(&l[5], 5, 5, &[], &root(&l[..5])),
            Err(out_of_range)
        );
        assert!(matches!(
            inclusion_plan(0, 0),
            Err(ProofError::IndexOutOfRange { .. })
        ));
        let order = ProofError::SizeOrder { size1: 4, size2: 3 };
        assert_eq!(consistency_plan(4, 3), Err(order.clone()));
        assert_eq!(consistency_proof(4, 3, &l), Err(order.clone()));
        assert_eq!(
            verify_consistency(4, 3, &[], &root(&l[..4]), &root(&l[..3])),
            Err(order)
        );
        assert_eq!(
            inclusion_proof(0, 9, &l),
            Err(ProofError::NotEnoughLeaves { size: 9, have: 8 })
        );
        assert_eq!(
            consistency_proof(1, 9, &l),
            Err(ProofError::NotEnoughLeaves { size: 9, have: 8 })
        );
        let plan = inclusion_plan(0, 7).unwrap();
        assert_eq!(
            plan.assemble(&[[0; 32]]),
            Err(ProofError::WrongHashCount {
                expected: 4,
                got: 1
            })
        );
        // The messages say what is wrong.
        assert_eq!(
            ProofError::WrongProofLength {
                expected: 3,
                got: 2
            }
            .to_string(),
            "the proof has 2 hashes where the tree sizes call for 3"
        );
    }

    #[test]
    fn edge_cases_of_verify_consistency() {
        let l = leaves(8);
        let (r3, r5) = (root(&l[..3]), root(&l[..5]));
        verify_consistency(5, 5, &[], &r5, &r5).unwrap();
        assert_eq!(
            verify_consistency(5, 5, &[], &r3, &r5),
            Err(ProofError::RootMismatch)
        );
        assert_eq!(
            verify_consistency(5, 5, &[r5], &r5, &r5),
            Err(ProofError::WrongProofLength {
                expected: 0,
                got: 1
            })
        );
        // Every tree extends the empty one, whatever the first root given.
        verify_consistency(0, 5, &[], &empty_root(), &r5).unwrap();
        verify_consistency(0, 5, &[], &r3, &r5).unwrap();
        verify_consistency(0, 0, &[], &empty_root(), &empty_root()).unwrap();
        assert!(matches!(
            verify_consistency(0, 5, &[r3], &empty_root(), &r5),
            Err(ProofError::WrongProofLength { .. })
        ));
        // RFC 2.1.4.2 step 1: an empty proof fails when 0 < size1 < size2.
        assert_eq!(
            verify_consistency(3, 5, &[], &r3, &r5),
            Err(ProofError::WrongProofLength {
                expected: 4,
                got: 0
            })
        );
    }

    /// Proof lengths, plans' shapes and in-memory proofs against plans.
    #[test]
    fn plans_read_distinct_perfect_subtrees_and_match_in_memory_proofs() {
        let all = leaves(130);
        for size in 1..=130u64 {
            for index in 0..size {
                let plan = inclusion_plan(index, size).unwrap();
                assert_plan_reads_perfect_subtrees(&plan, size);
                let proof = plan.assemble(&stored_all(plan.nodes(), &all)).unwrap();
                assert_eq!(proof.len(), inclusion_proof_len(index, size));
                assert_eq!(proof, inclusion_proof(index, size, &all).unwrap());
                // Never the leaf's own subtree: a proof reads its siblings.
                assert!(!plan.nodes().contains(&NodeId::new(0, index)));
            }
        }
        for size2 in 0..=130u64 {
            for size1 in 0..=size2 {
                let plan = consistency_plan(size1, size2).unwrap();
                assert_plan_reads_perfect_subtrees(&plan, size2);
                let proof = plan.assemble(&stored_all(plan.nodes(), &all)).unwrap();
                assert_eq!(proof, consistency_proof(size1, size2, &all).unwrap());
                if 0 < size1 && size1 < size2 {
                    assert_eq!(proof.len(), consistency_proof_len(size1, size2));
                } else {
                    assert!(proof.is_empty());
                }
            }
        }
    }

    fn assert_plan_reads_perfect_subtrees(plan: &ProofPlan, size: u64) {
        let distinct: BTreeSet<NodeId> = plan.nodes().iter().copied().collect();
        assert_eq!(distinct.len(), plan.nodes().len(), "{plan:?}");
        for node in plan.nodes() {
            assert!(node.first_leaf() + node.leaf_count() <= size, "{node:?}");
        }
        assert_eq!(plan.groups.iter().sum::<usize>(), plan.nodes().len());
        assert!(plan.groups.iter().all(|&len| len > 0));
    }

    /// Consistency between all pairs of sizes up to 64: valid proofs verify,
    /// and any tampering fails.
    #[test]
    fn consistency_all_pairs_up_to_64() {
        let all = leaves(64);
        let roots: Vec<Hash> = (0..=64).map(|n| root(&all[..n])).collect();
        for size2 in 0..=64u64 {
            for size1 in 0..=size2 {
                let (r1, r2) = (roots[size1 as usize], roots[size2 as usize]);
                let proof = consistency_proof(size1, size2, &all).unwrap();
                verify_consistency(size1, size2, &proof, &r1, &r2).unwrap();
                let at = format!("PROOF({size1}, D[{size2}])");
                // An added entry, at the end or the front.
                let mut longer = proof.clone();
                longer.push([7; 32]);
                assert!(
                    verify_consistency(size1, size2, &longer, &r1, &r2).is_err(),
                    "{at}"
                );
                let mut longer = vec![r1];
                longer.extend_from_slice(&proof);
                assert!(
                    verify_consistency(size1, size2, &longer, &r1, &r2).is_err(),
                    "{at}"
                );
                if size1 == 0 {
                    continue; // always consistent with an empty proof
                }
                // A wrong second root; a wrong first root.
                let bad2 = verify_consistency(size1, size2, &proof, &r1, &flip(&r2, 3));
                assert_eq!(bad2, Err(ProofError::RootMismatch), "{at}");
                let bad1 = verify_consistency(size1, size2, &proof, &flip(&r1, 200), &r2);
                assert!(bad1.is_err(), "{at}");
                // The root of another size in place of either root.
                if size1 > 1 {
                    let other = roots[size1 as usize - 1];
                    assert!(verify_consistency(size1, size2, &proof, &other, &r2).is_err());
                }
                if size1 < size2 {
                    let other = roots[size2 as usize - 1];
                    assert!(verify_consistency(size1, size2, &proof, &r1, &other).is_err());
                }
                // Each entry tampered with, or removed.
                for i in 0..proof.len() {
                    let mut tampered = proof.clone();
                    tampered[i] = flip(&tampered[i], i * 37 + 5);
                    assert!(
                        verify_consistency(size1, size2, &tampered, &r1, &r2).is_err(),
                        "{at}, entry {i} flipped"
                    );
                    let mut shorter = proof.clone();
                    shorter.remove(i);
                    assert!(
                        verify_consistency(size1, size2, &shorter, &r1, &r2).is_err(),
                        "{at}, entry {i} removed"
                    );
                }
            }
        }
    }

    /// Runs RFC 9162 2.1.3.2 step 4 without hashes: the side of each proof
    /// entry (true = p on the left), or None if the steps fail on the length.
    fn hash_shape(index: u64, size: u64, len: usize) -> Option<Vec<bool>> {
        if index >= size {
            return None;
        }
        let (mut fn_, mut sn) = (index, size - 1);
        let mut sides = Vec::new();
        for _ in 0..len {
            if sn == 0 {
                return None;
            }
            let left = fn_ & 1 == 1 || fn_ == sn;
            if left {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
            sides.push(left);
            fn_ >>= 1;
            sn >>= 1;
        }
        (sn == 0).then_some(sides)
    }

    /// The root binds the tree size only through the signed checkpoint: a
    /// proof also verifies against another size whose path hashes the same
    /// entries on the same sides (PATH(0, D[3]) = [b, c] reaches root(D[3])
    /// under size 4 too). Nothing else with a wrong size verifies.
    #[test]
    fn a_wrong_size_verifies_only_when_it_hashes_the_same_way() {
        let t = Hand::new();
        let root3 = root(&t.l[..3]);
        let proof = inclusion_proof(0, 3, &t.l).unwrap();
        verify_inclusion(&t.a, 0, 4, &proof, &root3).unwrap();
        let all = leaves(40);
        for size in 1..=40u64 {
            let tree_root = root(&all[..size as usize]);
            for index in 0..size {
                let proof = inclusion_proof(index, size, &all).unwrap();
                let shape = hash_shape(index, size, proof.len());
                assert!(shape.is_some());
                for other in 1..=48u64 {
                    if other == size {
                        continue;
                    }
                    let got =
                        verify_inclusion(&all[index as usize], index, other, &proof, &tree_root);
                    let same = hash_shape(index, other, proof.len()) == shape;
                    assert_eq!(
                        got.is_ok(),
                        same,
                        "PATH({index}, D[{size}]) as size {other}"
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random trees of up to 200 leaves: every inclusion proof verifies;
        /// a flipped bit in any entry, a wrong index, size, root or leaf, or a
        /// removed or added entry each fails.
        #[test]
        fn inclusion_proofs_verify_and_tampering_fails(
            size in 1u64..=200,
            seed in any::<u64>(),
            bit in 0usize..256,
        ) {
            let all = leaves_with_seed(size, seed);
            let tree_root = root(&all);
            for index in 0..size {
                let leaf = all[index as usize];
                let proof = inclusion_proof(index, size, &all).unwrap();
                prop_assert_eq!(verify_inclusion(&leaf, index, size, &proof, &tree_root), Ok(()));
                for i in 0..proof.len() {
                    let mut tampered = proof.clone();
                    tampered[i] = flip(&tampered[i], bit + i);
                    prop_assert_eq!(
                        verify_inclusion(&leaf, index, size, &tampered, &tree_root),
                        Err(ProofError::RootMismatch)
                    );
                    let mut shorter = proof.clone();
                    shorter.remove(i);
                    let short = verify_inclusion(&leaf, index, size, &shorter, &tree_root);
                    let wrong_length = matches!(short, Err(ProofError::WrongProofLength { .. }));
                    prop_assert!(wrong_length);
                }
                let mut longer = proof.clone();
                longer.push(tree_root);
                prop_assert!(verify_inclusion(&leaf, index, size, &longer, &tree_root).is_err());
                // Wrong indices: the neighbours, the ends, one past the tree.
                for other in [index ^ 1, index + 1, index.wrapping_sub(1), 0, size - 1, size] {
                    if other != index && other <= size {
                        prop_assert!(verify_inclusion(&leaf, other, size, &proof, &tree_root).is_err());
                    }
                }
                // Wrong sizes fail unless they hash the same way (see
                // a_wrong_size_verifies_only_when_it_hashes_the_same_way).
                let shape = hash_shape(index, size, proof.len());
                for other in [index + 1, size - 1, size + 1, size * 2, size + 63] {
                    if other != size && hash_shape(index, other, proof.len()) != shape {
                        prop_assert!(verify_inclusion(&leaf, index, other, &proof, &tree_root).is_err());
                    }
                }
                prop_assert_eq!(
                    verify_inclusion(&leaf, index, size, &proof, &flip(&tree_root, bit)),
                    Err(ProofError::RootMismatch)
                );
                prop_assert_eq!(
                    verify_inclusion(&flip(&leaf, bit), index, size, &proof, &tree_root),
                    Err(ProofError::RootMismatch)
                );
                let other_leaf = leaf_hash(b"another leaf");
                prop_assert_eq!(
                    verify_inclusion(&other_leaf, index, size, &proof, &tree_root),
                    Err(ProofError::RootMismatch)
                );
            }
        }

        /// Random pairs of larger sizes: the plan read from stored subtrees
        /// gives the in-memory proof, which verifies.
        #[test]
        fn consistency_of_random_larger_trees(size2 in 1u64..=1500, cut in any::<u64>()) {
            let size1 = cut % (size2 + 1);
            let all = leaves(size2);
            let plan = consistency_plan(size1, size2).unwrap();
            let proof = plan.assemble(&stored_all(plan.nodes(), &all)).unwrap();
            prop_assert_eq!(&proof, &consistency_proof(size1, size2, &all).unwrap());
            let (r1, r2) = (root(&all[..size1 as usize]), root(&all));
            prop_assert_eq!(verify_consistency(size1, size2, &proof, &r1, &r2), Ok(()));
            let index = cut % size2;
            let plan = inclusion_plan(index, size2).unwrap();
            let proof = plan.assemble(&stored_all(plan.nodes(), &all)).unwrap();
            prop_assert_eq!(&proof, &inclusion_proof(index, size2, &all).unwrap());
            prop_assert_eq!(verify_inclusion(&all[index as usize], index, size2, &proof, &r2), Ok(()));
        }
    }

    #[test]
    fn large_sizes_plan_without_overflow() {
        let size = u64::MAX;
        let plan = inclusion_plan(size - 1, size).unwrap();
        assert_eq!(plan.nodes().len(), 63);
        assert_eq!(inclusion_proof_len(size - 1, size), 63);
        let plan = consistency_plan(size - 1, size).unwrap();
        assert_eq!(plan.groups.len(), consistency_proof_len(size - 1, size));
        assert_eq!(root_plan(size).len(), 64);
        let plan = inclusion_plan(0, size).unwrap();
        // The sibling of the left half is the whole incomplete right half.
        assert_eq!(plan.groups.last(), Some(&63));
    }
}
