//! Keys and signing for the trust domain, and the SVIDs they produce.
//!
//! * [`Signer`] is the seam every consumer signs through; the
//!   [`LocalAuthority`] (keys in this process) and the fleet client
//!   (`fleet::client::Upstream`, keys at the fleet authority) implement it.
//! * [`TrustStore`] holds what the trust domain publishes: the bundle pushed
//!   to every stream, and the access-token keys.
//! * [`SvidCache`] caches issued SVIDs per SPIFFE ID and runs the one
//!   rotation worker.
//! * Below them: [`keyring`] (the rollover schedule), [`keys`] (CA and JWT
//!   key material and certificate profiles), [`key_files`] (operator CA and
//!   the fleet key directory), [`state_file`] (`authority.json`), [`jws`]
//!   (ES256 JWS), [`pem`], [`certs`] (reading a certificate),
//!   [`spiffe_bundle`] (the SPIFFE bundle document, ours and foreign ones)
//!   [`serving_cert`] (a TLS server certificate kept current) and [`wit`]
//!   (WIT-SVID claims and the workload keys they bind).

pub mod cache;
pub mod certs;
pub mod jws;
pub mod key_files;
pub mod keyring;
pub mod keys;
pub mod local;
pub mod pem;
pub mod serving_cert;
pub mod signer;
pub mod spiffe_bundle;
pub mod state_file;
pub mod svid;
pub mod trust_store;
pub mod wit;

pub use cache::{Subscription, SvidCache};
pub use local::{AuthoritySettings, LocalAuthority};
pub use signer::{SignError, SignFuture, Signer};
pub use spiffe_bundle::ForeignBundle;
pub use svid::{FederatedBundles, JwtSvid, SignedCert, SignedWit, TrustBundle, WitSvid, X509Svid};
pub use trust_store::TrustStore;
