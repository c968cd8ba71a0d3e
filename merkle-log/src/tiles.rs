//! Where the tree's hashes are stored, and reading them back.
//!
//! Only perfect (complete, aligned) subtrees are stored: their hashes never change
//! as the tree grows. Tree level `8L` is stored in tiles of level `L`: tile
//! `(L, i)` holds the hashes at positions `256i .. 256i+255` of tree level `8L`,
//! 32 bytes each, fewer in the rightmost tile (it grows until full). Any perfect
//! subtree `(h, k)` is then one tile read: with `L = h / 8`, `r = h % 8`, its hash
//! is the root of the `2^r` (at most 128) stored hashes at positions
//! `k·2^r .. (k+1)·2^r` of tree level `8L`, which lie in one tile. A proof or a
//! root needs O(log n) perfect subtrees, hence O(log n) tile reads.

use std::collections::HashMap;

use caracal_domain::merkle::tree::{self, Hash, NodeId, HASH_LEN};
use diesel::sql_types::{Array, BigInt, Bytea, SmallInt};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::LogError;

/// Tree levels per tile level.
pub const TILE_HEIGHT: u8 = 8;
/// Hashes per full tile.
pub const TILE_WIDTH: u64 = 1 << TILE_HEIGHT;
/// Bytes of a full tile.
pub const TILE_BYTES: usize = TILE_WIDTH as usize * HASH_LEN;

/// A tile's key in `merkle_tiles`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TileKey {
    pub level: i16,
    pub idx: i64,
}

/// The tile and slot range holding what node `node` is computed from.
pub fn source(node: NodeId) -> (TileKey, std::ops::Range<usize>) {
    let tile_level = node.level / TILE_HEIGHT;
    let rest = u32::from(node.level % TILE_HEIGHT);
    let first = node.index << rest;
    let key = TileKey {
        level: i16::from(tile_level),
        idx: i64::try_from(first / TILE_WIDTH).unwrap_or(i64::MAX),
    };
    let slot = usize::try_from(first % TILE_WIDTH).unwrap_or(0);
    (key, slot..slot + (1usize << rest))
}

/// Where a stored hash (tree level a multiple of 8) goes: its tile and slot.
pub fn slot_of(node: NodeId) -> Option<(TileKey, usize)> {
    if node.level % TILE_HEIGHT != 0 {
        return None;
    }
    let (key, range) = source(node);
    Some((key, range.start))
}

/// Tiles read from `merkle_tiles`, cached: computes any stored perfect subtree's hash.
#[derive(Debug, Default)]
pub struct TileCache {
    tiles: HashMap<TileKey, Vec<u8>>,
    nodes: HashMap<NodeId, Hash>,
}

#[derive(diesel::QueryableByName)]
struct TileRow {
    #[diesel(sql_type = SmallInt)]
    level: i16,
    #[diesel(sql_type = BigInt)]
    idx: i64,
    #[diesel(sql_type = Bytea)]
    hashes: Vec<u8>,
}

impl TileCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the tiles `nodes` need that are not cached yet, in one query.
    pub async fn fetch(
        &mut self,
        conn: &mut AsyncPgConnection,
        nodes: &[NodeId],
    ) -> Result<(), LogError> {
        let mut want: Vec<TileKey> = nodes
            .iter()
            .map(|n| source(*n).0)
            .filter(|k| !self.tiles.contains_key(k))
            .collect();
        want.sort_unstable();
        want.dedup();
        if want.is_empty() {
            return Ok(());
        }
        let rows: Vec<TileRow> = diesel::sql_query(
            "SELECT t.level, t.idx, t.hashes FROM merkle_tiles t \
             JOIN unnest($1::int2[], $2::int8[]) AS w(level, idx) \
               ON t.level = w.level AND t.idx = w.idx",
        )
        .bind::<Array<SmallInt>, _>(want.iter().map(|k| k.level).collect::<Vec<_>>())
        .bind::<Array<BigInt>, _>(want.iter().map(|k| k.idx).collect::<Vec<_>>())
        .load(conn)
        .await?;
        for row in rows {
            self.tiles.insert(
                TileKey {
                    level: row.level,
                    idx: row.idx,
                },
                row.hashes,
            );
        }
        Ok(())
    }

    /// The stored hash of leaf `index` (its tile must be loaded); not cached
    /// apart from its tile (verify-range reads millions).
    pub fn leaf(&self, index: u64) -> Result<Hash, LogError> {
        let (key, range) = source(NodeId::new(0, index));
        let bytes = self
            .tiles
            .get(&key)
            .and_then(|t| t.get(range.start * HASH_LEN..range.end * HASH_LEN))
            .ok_or_else(|| {
                LogError::Corrupt(format!(
                    "the stored hash of leaf {index} is missing (tile (0, {}))",
                    key.idx
                ))
            })?;
        let mut h = [0u8; HASH_LEN];
        h.copy_from_slice(bytes);
        Ok(h)
    }

    /// The stored hash of perfect subtree `node` (its tile must be loaded).
    pub fn node(&mut self, node: NodeId) -> Result<Hash, LogError> {
        if let Some(h) = self.nodes.get(&node) {
            return Ok(*h);
        }
        let (key, range) = source(node);
        let tile = self.tiles.get(&key).ok_or_else(|| {
            LogError::Corrupt(format!(
                "tile ({}, {}) holding node (level {}, index {}) is missing",
                key.level, key.idx, node.level, node.index
            ))
        })?;
        let bytes = tile
            .get(range.start * HASH_LEN..range.end * HASH_LEN)
            .ok_or_else(|| {
                LogError::Corrupt(format!(
                    "tile ({}, {}) is {} hashes long; node (level {}, index {}) needs slots {}..{}",
                    key.level,
                    key.idx,
                    tile.len() / HASH_LEN,
                    node.level,
                    node.index,
                    range.start,
                    range.end
                ))
            })?;
        let hashes: Vec<Hash> = bytes
            .chunks_exact(HASH_LEN)
            .map(|c| {
                let mut h = [0u8; HASH_LEN];
                h.copy_from_slice(c);
                h
            })
            .collect();
        // 2^r stored hashes of a perfect subtree: their MTH is the subtree's hash.
        let h = if hashes.len() == 1 {
            hashes[0]
        } else {
            tree::root(&hashes)
        };
        self.nodes.insert(node, h);
        Ok(h)
    }

    /// The stored hashes of `nodes`, loading what is missing.
    pub async fn nodes(
        &mut self,
        conn: &mut AsyncPgConnection,
        nodes: &[NodeId],
    ) -> Result<Vec<Hash>, LogError> {
        self.fetch(conn, nodes).await?;
        nodes.iter().map(|n| self.node(*n)).collect()
    }

    /// The root of the stored tree of `size` leaves.
    pub async fn root(
        &mut self,
        conn: &mut AsyncPgConnection,
        size: u64,
    ) -> Result<Hash, LogError> {
        let plan = tree::root_plan(size);
        let hashes = self.nodes(conn, &plan).await?;
        Ok(tree::fold_right(&hashes))
    }

    /// A tile's raw bytes, when loaded.
    pub fn tile(&self, key: &TileKey) -> Option<&[u8]> {
        self.tiles.get(key).map(Vec::as_slice)
    }
}

/// Writes tiles (new or grown) in one statement.
pub async fn write(
    conn: &mut AsyncPgConnection,
    tiles: &[(TileKey, &[u8])],
) -> Result<(), LogError> {
    if tiles.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "INSERT INTO merkle_tiles (level, idx, hashes) \
         SELECT * FROM unnest($1::int2[], $2::int8[], $3::bytea[]) \
         ON CONFLICT (level, idx) DO UPDATE SET hashes = EXCLUDED.hashes",
    )
    .bind::<Array<SmallInt>, _>(tiles.iter().map(|t| t.0.level).collect::<Vec<_>>())
    .bind::<Array<BigInt>, _>(tiles.iter().map(|t| t.0.idx).collect::<Vec<_>>())
    .bind::<Array<Bytea>, _>(tiles.iter().map(|t| t.1).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_one_tile() {
        // Leaf 300: tile (0, 1), slot 44.
        assert_eq!(
            source(NodeId::new(0, 300)),
            (TileKey { level: 0, idx: 1 }, 44..45)
        );
        // Level 3, index 40: leaves 320..328 = tile (0, 1) slots 64..72.
        assert_eq!(
            source(NodeId::new(3, 40)),
            (TileKey { level: 0, idx: 1 }, 64..72)
        );
        // Level 8, index 5: stored in tile (1, 0) slot 5.
        assert_eq!(
            slot_of(NodeId::new(8, 5)),
            Some((TileKey { level: 1, idx: 0 }, 5))
        );
        // Level 15, index 1: 128 level-8 hashes 128..256 of tile (1, 0).
        assert_eq!(
            source(NodeId::new(15, 1)),
            (TileKey { level: 1, idx: 0 }, 128..256)
        );
        assert_eq!(slot_of(NodeId::new(3, 1)), None);
    }
}
