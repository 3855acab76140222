//! What the node keeps in the store, and where.
//!
//! - `/halo/services/NAME`: a [`ServiceRecord`] (the service file as TOML
//!   and the restart generation) written by the API.
//! - `/halo/instances/SERVICE/ID`: an [`InstanceRecord`] written by the node
//!   before it starts a process and updated with its pid, so a restarted
//!   halo finds every process it started.

use halo_model::ServiceFile;
use serde::{Deserialize, Serialize};

pub const SERVICES: &str = "/halo/services/";
pub const INSTANCES: &str = "/halo/instances/";

pub fn service_key(name: &str) -> String {
    format!("{SERVICES}{name}")
}

pub fn instance_key(service: &str, id: &str) -> String {
    format!("{INSTANCES}{service}/{id}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The service file, as TOML.
    pub spec: String,
    /// Bumped by `halo restart`: instances of an older generation are
    /// replaced, one at a time.
    #[serde(default)]
    pub restart_generation: u64,
}

impl ServiceRecord {
    /// What makes instances interchangeable: the file without `replicas`
    /// (scaling replaces nothing) plus the restart generation.
    pub fn template(file: &ServiceFile, generation: u64) -> String {
        let mut f = file.clone();
        f.replicas = None;
        format!("{:016x}", fnv64(format!("{}\n#{generation}", f.to_toml()).as_bytes()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub service: String,
    pub port: u16,
    pub template: String,
    pub pid: Option<i32>,
    pub start_time: Option<u64>,
}

/// FNV-1a: stable across runs and builds, unlike std's hasher.
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}
