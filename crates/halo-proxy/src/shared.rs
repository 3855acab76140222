//! The state every connection of the proxy shares: the current snapshot
//! (config, routes, upstream groups) and the registry of what outlives a
//! reload (endpoints, counters, budgets). Connections read it; the
//! running proxy (`server`) swaps it.

use std::path::PathBuf;
use std::sync::Mutex;

use arc_swap::ArcSwap;

use crate::registry::{Registry, Snapshot};

pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub registry: Registry,
    /// The file reloads read, when the config came from a file.
    pub source: Option<PathBuf>,
    /// Serialises reloads and endpoint updates.
    pub(crate) update: Mutex<()>,
}
