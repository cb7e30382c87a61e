//! The daemon's parts, one module per concern; `main.rs` is the CLI.

pub mod datapath;
pub mod preflight;
pub mod probe;
pub mod rtnetlink;
pub mod stats;
pub mod test_run;
