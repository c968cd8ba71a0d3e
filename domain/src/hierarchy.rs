//! The agent tree: every agent may have a parent, whose budgets also apply.
//!
//! The tree must stay acyclic (otherwise "check every ancestor" never ends)
//! and shallow (see [`MAX_HIERARCHY_DEPTH`]). These checks run whenever an
//! agent is created under a parent or moved to a new one.

use thiserror::Error;

/// Longest allowed chain: an agent plus at most 15 ancestors.
///
/// Why a bound: the hot path checks and reserves against every ancestor's
/// policies in one atomic step (a single Redis script), whose cost grows with
/// the chain. A fixed bound keeps that step's latency and key count bounded
/// no matter how an organisation nests its agents.
pub const MAX_HIERARCHY_DEPTH: usize = 16;

/// Why a parent assignment was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HierarchyError {
    /// The agent would become its own ancestor.
    #[error("agent {agent_id:?} cannot be placed under its own descendant or itself")]
    Cycle {
        /// The agent that would appear twice in its own chain.
        agent_id: String,
    },
    /// The resulting chain would be longer than [`MAX_HIERARCHY_DEPTH`].
    #[error("hierarchy would be {depth} levels deep; at most {max} are allowed")]
    TooDeep {
        /// Depth the deepest affected agent would have.
        depth: usize,
        /// [`MAX_HIERARCHY_DEPTH`].
        max: usize,
    },
}

/// Checks placing a childless agent `agent_id` under a parent whose chain is
/// `new_parent_chain` = `[parent, grandparent, …, root]`.
///
/// Same as [`check_reparent`] with a subtree height of 1; use that one when
/// moving an agent that has descendants of its own.
pub fn check_new_parent(agent_id: &str, new_parent_chain: &[String]) -> Result<(), HierarchyError> {
    check_reparent(agent_id, new_parent_chain, 1)
}

/// Checks moving `agent_id`, together with its subtree, under a new parent.
///
/// * `new_parent_chain`: `[parent, grandparent, …, root]` of the new parent.
/// * `subtree_height`: levels in the agent's subtree including itself (1 for
///   an agent without children). Why it matters: moving an agent deepens all
///   of its descendants, and the deepest of them must stay within the bound.
///
/// Errors: [`HierarchyError::Cycle`] if `agent_id` is in the chain (it would
/// become its own ancestor) or the chain itself repeats an agent (it is
/// already corrupt); [`HierarchyError::TooDeep`] if
/// `chain length + subtree_height` exceeds [`MAX_HIERARCHY_DEPTH`].
pub fn check_reparent(
    agent_id: &str,
    new_parent_chain: &[String],
    subtree_height: usize,
) -> Result<(), HierarchyError> {
    if new_parent_chain.iter().any(|ancestor| ancestor == agent_id) {
        return Err(HierarchyError::Cycle {
            agent_id: agent_id.to_owned(),
        });
    }
    // Quadratic, but the chain is bounded by the depth limit when it is
    // healthy; an oversized chain is refused before this loop runs long.
    if new_parent_chain.len() < MAX_HIERARCHY_DEPTH {
        for (i, ancestor) in new_parent_chain.iter().enumerate() {
            if new_parent_chain[..i].contains(ancestor) {
                return Err(HierarchyError::Cycle {
                    agent_id: ancestor.clone(),
                });
            }
        }
    }
    let depth = new_parent_chain.len().saturating_add(subtree_height.max(1));
    if depth > MAX_HIERARCHY_DEPTH {
        return Err(HierarchyError::TooDeep {
            depth,
            max: MAX_HIERARCHY_DEPTH,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("a{i}")).collect()
    }

    #[test]
    fn table() {
        /// (agent, new parent chain, subtree height, expected)
        type Case = (&'static str, Vec<String>, usize, Result<(), HierarchyError>);
        let cases: Vec<Case> = vec![
            ("x", vec![], 1, Ok(())),
            ("x", chain(15), 1, Ok(())),
            (
                "x",
                chain(16),
                1,
                Err(HierarchyError::TooDeep { depth: 17, max: 16 }),
            ),
            ("x", chain(10), 6, Ok(())),
            (
                "x",
                chain(10),
                7,
                Err(HierarchyError::TooDeep { depth: 17, max: 16 }),
            ),
            ("x", chain(3), 0, Ok(())),
            (
                "a0",
                chain(3),
                1,
                Err(HierarchyError::Cycle {
                    agent_id: "a0".into(),
                }),
            ),
            (
                "a2",
                chain(3),
                1,
                Err(HierarchyError::Cycle {
                    agent_id: "a2".into(),
                }),
            ),
            (
                "x",
                vec!["p".into(), "q".into(), "p".into()],
                1,
                Err(HierarchyError::Cycle {
                    agent_id: "p".into(),
                }),
            ),
            (
                "x",
                chain(100),
                1,
                Err(HierarchyError::TooDeep {
                    depth: 101,
                    max: 16,
                }),
            ),
            (
                "x",
                vec![],
                usize::MAX,
                Err(HierarchyError::TooDeep {
                    depth: usize::MAX,
                    max: 16,
                }),
            ),
        ];
        for (agent, parents, height, expected) in cases {
            assert_eq!(
                check_reparent(agent, &parents, height),
                expected,
                "{agent} under {parents:?} with height {height}"
            );
        }
    }

    #[test]
    fn check_new_parent_is_a_leaf_move() {
        assert_eq!(check_new_parent("x", &chain(15)), Ok(()));
        assert!(matches!(
            check_new_parent("x", &chain(16)),
            Err(HierarchyError::TooDeep { .. })
        ));
        assert!(matches!(
            check_new_parent("a0", &chain(1)),
            Err(HierarchyError::Cycle { .. })
        ));
        assert_eq!(
            check_new_parent("x", &chain(16)).unwrap_err().to_string(),
            "hierarchy would be 17 levels deep; at most 16 are allowed"
        );
    }
}
