//! Budget state in Redis: counters per policy window, reservations, the expiry index
//! and the event outbox, changed only by the Lua scripts under `lua/`, each of which
//! is one atomic step and one round trip; `state` knows whether Redis still holds
//! it.

pub mod keys;
pub mod state;
pub mod store;

pub use keys::KeySpace;
pub use store::{BudgetStore, PolicySlot, ReplicaAck};
