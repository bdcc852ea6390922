//! Tessera's node daemon as a library: configuration, registration entries,
//! the local authority, the SVID cache and its rotation worker, the Workload
//! API service, the admin HTTP server and the CLI. `main.rs` only calls
//! [`cli::main`].

#![forbid(unsafe_code)]

pub mod authority;
pub mod clock;
pub mod config;
pub mod entries;
pub mod fsutil;
pub mod jws;
pub mod metrics;
pub mod svid_cache;
