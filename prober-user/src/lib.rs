//! The daemon's parts, one module per concern; `main.rs` is the CLI.

pub mod agent;
pub mod agents;
pub mod checks;
pub mod config;
pub mod control;
pub mod controller;
pub mod datapath;
pub mod director_fault;
pub mod events;
pub mod health;
pub mod ipvs_changes;
pub mod map_batch;
pub mod metrics;
pub mod passive;
pub mod preflight;
pub mod probe;
pub mod rtnetlink;
pub mod state;
pub mod stats;
pub mod status;
pub mod targets;
pub mod test_run;
pub mod weights;
