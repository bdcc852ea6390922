//! The SPIFFE Workload API on the agent's socket.
//!
//! * [`service`]: the five RPCs: header check, caller, entries, SVID cache,
//!   response; the spec's status codes are chosen there only.
//! * [`state`]: what the calls serve from; the node-wide change signal.
//! * [`svid_stream`]: FetchX509SVID's and FetchWITSVID's stream, polled by
//!   hand so an idle one costs little.
//! * [`bundle_stream`]: the bundle streams, polled the same way.
//! * [`messages`]: the response messages.
//! * [`x509_route`]: FetchX509SVID's response framing (why it is separate
//!   is written there).

pub mod bundle_stream;
pub mod messages;
pub mod service;
pub mod state;
pub mod svid_stream;
pub mod x509_route;

pub use service::WorkloadApi;
pub use state::ApiState;
pub use x509_route::WorkloadApiRoutes;
