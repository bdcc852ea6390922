//! The `[exchange]` table as the exchange uses it (parsed and checked in
//! `crate::config`).

use std::path::PathBuf;
use std::time::Duration;

/// The `[exchange]` table, validated.
#[derive(Debug, Clone)]
pub struct ExchangeConfig {
    /// HTTP on a Unix socket; defaults to `exchange.sock` beside the Workload API socket.
    pub socket_path: PathBuf,
    /// `*.cedar` policies; `None` means no policy, so every exchange is denied.
    pub policy_dir: Option<PathBuf>,
    pub policy_reload_interval: Duration,
    /// `iss` of issued tokens and the audience subject tokens must carry.
    pub issuer: String,
    /// `exchange.issuer` was not set and the HTTPS face is on: the issuer
    /// is the face's URL, known once its listener is bound.
    pub issuer_follows_https: bool,
    /// No token outlives this, whatever the request or policy says.
    pub max_ttl: Duration,
    /// TTL when the request names none.
    pub default_ttl: Duration,
    /// Hash-chained decision log; defaults to `data_dir/audit.jsonl`.
    pub audit_log: PathBuf,
    /// The log's high-water mark (`crate::audit::anchor`); defaults to
    /// `<audit_log>.anchor`. Keep it apart from the log.
    pub audit_anchor: PathBuf,
    /// How long the audit writer may wait for records of exchanges in
    /// progress before it syncs a batch (`crate::audit`); zero: never.
    pub audit_commit_delay: Duration,
    pub max_delegation_depth: u32,
    /// How long a pending approval waits for an operator.
    pub approval_timeout: Duration,
    /// How long an approved request may be redeemed.
    pub approval_grant_ttl: Duration,
    /// `interval` told to clients polling a pending approval.
    pub approval_poll_interval: Duration,
    /// Audit records per principal per minute for requests that change
    /// nothing (denials, pending polls, ends of tasks without tokens); the
    /// rest are counted and summarised.
    pub denial_records_per_minute: u32,
}
