//! Tessera's node daemon as a library. `main.rs` only calls [`cli::main`].
//!
//! Modules, from the bottom layer up (a module imports only from its own
//! layer or below; docs/architecture.md has the whole map):
//!
//! | layer | modules |
//! |---|---|
//! | foundations | [`clock`], [`sync`], [`fsutil`], [`metrics`], [`audit`], [`rate_limit`], [`entries`], [`revocation`] |
//! | identity | [`identity`]: signer seam, local authority, keys, trust store, SVID cache |
//! | transport | [`transport`]: the one accept loop, peer credentials, gRPC and HTTP serving |
//! | callers | [`caller`]: attestation per connection, budgets, identities |
//! | services | [`workload_api`], [`exchange`] (policy, approvals, operator socket), [`fleet`], [`https`] (the trust domain's HTTPS face), [`admin`] |
//! | wiring | [`config`] (builds each component's config), [`app`] (starts an agent) |
//! | edge | [`cli`] (one file per subcommand group; the bench among them) |

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod caller;
pub mod cli;
pub mod clock;
pub mod config;
pub mod entries;
pub mod exchange;
pub mod federation;
pub mod fleet;
pub mod fsutil;
pub mod https;
pub mod identity;
pub mod metrics;
pub mod rate_limit;
pub mod revocation;
pub mod sds;
pub mod sync;
pub mod transport;
pub mod workload_api;
