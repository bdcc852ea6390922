//! How callers reach the agent: Unix sockets whose peers are identified by
//! their kernel credentials, never by anything they send.
//!
//! * [`accept`]: the one accept loop every socket uses (the Workload API,
//!   the exchange, the operator socket): a connection cap, peer credentials
//!   read at accept time, accept errors paused on instead of fatal.
//! * [`conn`]: the accepted stream, watched for readability only (a Unix
//!   socket otherwise wakes the server each time the client reads an answer).
//! * [`peer`]: what the loop learns about a connection ([`PeerConnection`]).
//! * [`grpc`]: the stream type tonic serves, carrying that connection's facts.
//! * [`grpc_frames`]: gRPC messages framed by hand for long-lived streams
//!   (no per-stream encode or decode buffer).
//! * [`grpc_stream`]: a response stream run as an async body inside it, with
//!   its outcome metric.
//! * [`http`]: HTTP/1.1 for axum routers, with header and request deadlines.
//! * [`authority_header`]: accepts the socket path that some gRPC clients
//!   send as HTTP/2 `:authority`.
//! * [`idle`]: closes connections with nothing open for a while.
//! * [`tls`]: axum over TLS on TCP (the fleet authority, the HTTPS face,
//!   the bundle endpoint).
//! * [`https_client`]: one HTTPS request (agent → fleet authority,
//!   authority → Kubernetes API, federation → foreign bundle endpoints).

pub mod accept;
pub mod authority_header;
pub mod conn;
pub mod grpc;
pub mod grpc_frames;
pub mod grpc_stream;
pub mod http;
pub mod https_client;
pub mod idle;
pub mod peer;
pub mod tls;

pub use accept::{Accepted, Acceptor, ConnectionCaps};
pub use peer::PeerConnection;
