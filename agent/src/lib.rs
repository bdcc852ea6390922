//! Tessera's node daemon as a library: configuration, registration entries,
//! the local authority, the SVID cache and its rotation worker, the Workload
//! API service, the admin HTTP server and the CLI. `main.rs` only calls
//! [`cli::main`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod authority;
pub mod bench;
pub mod certs;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod entries;
pub mod exchange;
pub mod fleet;
pub mod fsutil;
pub mod h2_authority;
pub mod jws;
pub mod metrics;
pub mod operator;
pub mod peer_conn;
pub mod policy;
pub mod rate_limit;
pub mod revocation;
pub mod service;
pub mod svid_cache;
pub mod unix_http;
pub mod x509_stream_route;
