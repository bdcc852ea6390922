//! The SPIFFE Workload API on the agent's socket.
//!
//! * [`service`]: the five RPCs: header check, caller, entries, SVID cache,
//!   response; the spec's status codes are chosen there only.
//! * [`x509_route`]: FetchX509SVID's response framing (why it is separate
//!   is written there).

pub mod service;
pub mod x509_route;

pub use service::{ApiState, WorkloadApi};
pub use x509_route::WorkloadApiRoutes;
