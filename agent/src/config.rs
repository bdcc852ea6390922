//! The daemon's configuration: TOML on disk, validated into typed values.
//!
//! Unknown keys are rejected (serde `deny_unknown_fields`); toml's error names
//! the key and the line. Semantic errors (an invalid SPIFFE ID, a bad
//! duration) also name the key and line, using spans kept while parsing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::entries::{Entry, EntrySet, IdTemplate};
use crate::exchange::ExchangeConfig;
use tessera_attestor::Selector;

/// Shortest TTL accepted at all; TTLs under [`SHORT_TTL_WARNING`] get a warning.
const MIN_TTL: Duration = Duration::from_secs(2);
const SHORT_TTL_WARNING: Duration = Duration::from_secs(60);
/// Longest duration accepted for any key: 100 years. `now + d` must stay a
/// date a certificate can carry (X.509 ends at year 9999) and must not
/// overflow the clocks; a longer value is a typo, and used to panic the agent
/// at start-up (found by the `config` fuzz target).
const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// humantime syntax (`"90s"`, `"1h"`), at most [`MAX_DURATION`].
fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d > MAX_DURATION {
        return Err(format!(
            "longer than the maximum of {}",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(d)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Parse {
        file: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{file}:{line}: `{key}`: {message}")]
    Invalid {
        file: String,
        line: usize,
        key: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: Spanned<String>,
    socket_path: Option<Spanned<PathBuf>>,
    data_dir: Option<Spanned<PathBuf>>,
    #[serde(default)]
    svid: RawSvid,
    #[serde(default)]
    authority: RawAuthority,
    #[serde(default)]
    attestor: RawAttestor,
    #[serde(default)]
    entries: Vec<RawEntry>,
    admin: Option<RawAdmin>,
    exchange: Option<RawExchange>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    limits: RawLimits,
    upstream: Option<RawUpstream>,
    server: Option<RawServer>,
    https: Option<RawHttps>,
    sds: Option<RawSds>,
    #[serde(default)]
    federation: Vec<RawFederation>,
    bundle_endpoint: Option<RawBundleEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSds {
    enabled: Option<bool>,
    default_svid_name: Option<Spanned<String>>,
    default_bundle_name: Option<Spanned<String>>,
    default_all_bundles_name: Option<Spanned<String>>,
    disable_spiffe_cert_validation: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederation {
    trust_domain: Spanned<String>,
    bundle_endpoint_url: Spanned<String>,
    bundle_endpoint_profile: Spanned<String>,
    endpoint_spiffe_id: Option<Spanned<String>>,
    bootstrap_bundle: Option<Spanned<PathBuf>>,
    ca_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundleEndpoint {
    listen: Spanned<String>,
    profile: Option<Spanned<String>>,
    cert_file: Option<Spanned<PathBuf>>,
    key_file: Option<Spanned<PathBuf>>,
    refresh_hint: Option<Spanned<String>>,
    reload_interval: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttps {
    listen: Spanned<String>,
    issuer: Option<Spanned<String>>,
    server_name: Option<String>,
    cert_file: Option<Spanned<PathBuf>>,
    key_file: Option<Spanned<PathBuf>>,
    reload_interval: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    addresses: Spanned<Vec<String>>,
    server_name: Option<String>,
    bundle_file: PathBuf,
    node_attestation: Spanned<String>,
    token_file: PathBuf,
    bundle_refresh: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Spanned<String>,
    keys_dir: PathBuf,
    server_name: Option<String>,
    node_svid_ttl: Option<Spanned<String>>,
    ca_publish_lead: Option<Spanned<String>>,
    key_reload_interval: Option<Spanned<String>>,
    join_token_dir: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    max_access_token_ttl: Option<Spanned<String>>,
    kubernetes: Option<RawServerKube>,
    store: Option<RawServerStore>,
    registration: Option<RawServerRegistration>,
    #[serde(default)]
    operators: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerRegistration {
    kind: Spanned<String>,
    namespaced: Option<bool>,
    federation: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerStore {
    kind: Spanned<String>,
    approvals: Option<bool>,
    namespace: Option<Spanned<String>>,
    batch_window: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    password_file: Option<PathBuf>,
    migrate: Option<bool>,
    tls_ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerKube {
    enabled: Option<bool>,
    api_server: Option<String>,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    audience: Option<String>,
    #[serde(default)]
    allowed_service_accounts: Vec<Spanned<String>>,
    pod_cache_ttl: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSvid {
    x509_ttl: Option<Spanned<String>>,
    jwt_ttl: Option<Spanned<String>>,
    wit_ttl: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthority {
    ca_ttl: Option<Spanned<String>>,
    jwt_key_ttl: Option<Spanned<String>>,
    jwt_key_type: Option<Spanned<String>>,
    ca_cert_file: Option<PathBuf>,
    ca_key_file: Option<PathBuf>,
    persist: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttestor {
    proc_root: Option<PathBuf>,
    #[serde(default)]
    unix: RawUnixAttestor,
    k8s: Option<RawK8sAttestor>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawK8sAttestor {
    enabled: Option<bool>,
    kubelet_host: Option<String>,
    kubelet_host_env: Option<Spanned<String>>,
    kubelet_port: Option<u16>,
    read_only_port: Option<u16>,
    token_path: Option<PathBuf>,
    kubelet_ca_path: Option<PathBuf>,
    skip_kubelet_verification: Option<bool>,
    poll_attempts: Option<u32>,
    poll_interval: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnixAttestor {
    discover_workload_path: Option<bool>,
    workload_size_limit: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    spiffe_id: Spanned<String>,
    selectors: Spanned<Vec<Spanned<String>>>,
    hint: Option<Spanned<String>>,
    x509_ttl: Option<Spanned<String>>,
    jwt_ttl: Option<Spanned<String>>,
    wit_ttl: Option<Spanned<String>>,
    federates_with: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    socket_path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExchange {
    enabled: Option<bool>,
    socket_path: Option<Spanned<PathBuf>>,
    policy_dir: Option<PathBuf>,
    policy_reload_interval: Option<Spanned<String>>,
    issuer: Option<Spanned<String>>,
    max_ttl: Option<Spanned<String>>,
    default_ttl: Option<Spanned<String>>,
    audit_log: Option<PathBuf>,
    audit_anchor: Option<PathBuf>,
    audit_commit_delay: Option<Spanned<String>>,
    max_delegation_depth: Option<Spanned<u32>>,
    approval_timeout: Option<Spanned<String>>,
    approval_grant_ttl: Option<Spanned<String>>,
    approval_poll_interval: Option<Spanned<String>>,
    denial_records_per_minute: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    shutdown_grace: Option<Spanned<String>>,
    requests_per_second: Option<Spanned<f64>>,
    max_connections: Option<Spanned<u32>>,
    max_connections_per_uid: Option<Spanned<u32>>,
    max_connections_per_process: Option<Spanned<u32>>,
    http_header_timeout: Option<Spanned<String>>,
    http_request_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    request_burst: Option<Spanned<f64>>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub trust_domain: spiffe::TrustDomain,
    pub socket_path: PathBuf,
    pub data_dir: PathBuf,
    pub x509_ttl: Duration,
    pub jwt_ttl: Duration,
    pub wit_ttl: Duration,
    pub authority: AuthorityConfig,
    pub proc_root: PathBuf,
    pub unix_attestor: tessera_attestor::UnixAttestorConfig,
    /// Kubernetes attestation, when `[attestor.k8s] enabled = true`.
    pub k8s_attestor: Option<tessera_attestor::K8sAttestorConfig>,
    pub entries: EntrySet,
    pub admin_listen: Option<SocketAddr>,
    pub admin_socket_path: Option<PathBuf>,
    pub log: LogConfig,
    pub shutdown_grace: Duration,
    /// Open connections per socket (Workload API, exchange) before new ones are refused.
    pub max_connections: usize,
    /// Of those, at most this many from one uid (None: three quarters of
    /// the socket's cap), so one user cannot take every slot.
    pub max_connections_per_uid: Option<usize>,
    /// And at most this many from one process (None: a quarter of the cap).
    pub max_connections_per_process: Option<usize>,
    /// HTTP sockets (exchange, operator): the request head must arrive within this.
    pub http_header_timeout: Duration,
    /// HTTP sockets: a whole request must complete within this (else 408).
    pub http_request_timeout: Duration,
    /// Every socket: a connection with no request or stream open for this
    /// long is closed.
    pub idle_timeout: Duration,
    /// Per-caller budget for Workload API calls and exchange requests.
    pub caller_budget: crate::rate_limit::Budget,
    /// Per-task token exchange, when an `[exchange]` table is present (and
    /// not `enabled = false`).
    pub exchange: Option<ExchangeConfig>,
    /// The trust domain's HTTPS face (`[https]`): OpenID discovery and keys,
    /// and the `iss` of JWT-SVIDs.
    pub https: Option<crate::https::HttpsConfig>,
    /// Upstream mode: the fleet authority signs (`[upstream]`).
    pub upstream: Option<crate::fleet::client::UpstreamConfig>,
    /// `tessera authority run`: the `[server]` table.
    pub server: Option<crate::fleet::server::ServerConfig>,
    /// Envoy SDS on the Workload API socket: on unless `[sds] enabled = false`.
    pub sds: Option<crate::sds::SdsConfig>,
    /// Foreign trust domains whose bundles are fetched (`[[federation]]`).
    pub federation: Vec<crate::federation::Relationship>,
    /// This trust domain's bundle endpoint (`[bundle_endpoint]`).
    pub bundle_endpoint: Option<crate::federation::EndpointConfig>,
    /// Warnings to log once logging is set up (e.g. very short TTLs).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct AuthorityConfig {
    pub ca_ttl: Duration,
    pub jwt_key_ttl: Duration,
    /// What JWT-SVIDs are signed with (SPIRE's `jwt_key_type`).
    pub jwt_key_type: crate::identity::jws::JwtKeyType,
    /// Operator-provided CA (both or neither).
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// Persist the generated CA and JWT keys under `data_dir` (0600).
    pub persist: bool,
}

#[derive(Debug, Clone, Default)]
pub struct LogConfig {
    pub level: Option<String>,
    pub json: bool,
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())]
            .bytes()
            .filter(|b| *b == b'\n')
            .count()
            + 1
    }

    fn invalid<T>(
        &self,
        key: &str,
        spanned: &Spanned<T>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: self.line(spanned.span()),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn ttl(
        &self,
        key: &str,
        value: &Option<Spanned<String>>,
        default: Duration,
        warnings: &mut Vec<String>,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let d = parse_duration(value.get_ref()).map_err(|e| {
            self.invalid(
                key,
                value,
                format!("not a duration ({e}); use e.g. \"90s\", \"1h\""),
            )
        })?;
        if d < MIN_TTL {
            return Err(self.invalid(
                key,
                value,
                format!("must be at least {}", humantime::format_duration(MIN_TTL)),
            ));
        }
        if d < SHORT_TTL_WARNING {
            warnings.push(format!(
                "{}:{}: `{key}` = {:?} is very short; fine for tests and demos, not for production",
                self.file,
                self.line(value.span()),
                value.get_ref()
            ));
        }
        Ok(d)
    }
}

impl Config {
    /// Load and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    /// Parse config text; `file` names the source in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            file: file.to_string(),
            source,
        })?;
        let cx = Ctx { file, text };
        let mut warnings = Vec::new();

        let trust_domain = spiffe::TrustDomain::new(raw.trust_domain.get_ref()).map_err(|e| {
            cx.invalid(
                "trust_domain",
                &raw.trust_domain,
                format!("invalid trust domain: {e}"),
            )
        })?;
        if trust_domain.as_str() != raw.trust_domain.get_ref() {
            return Err(cx.invalid(
                "trust_domain",
                &raw.trust_domain,
                "must be a bare, lowercase trust domain name such as \"example.org\"",
            ));
        }
        let x509_ttl = cx.ttl(
            "svid.x509_ttl",
            &raw.svid.x509_ttl,
            Duration::from_secs(3600),
            &mut warnings,
        )?;
        let jwt_ttl = cx.ttl(
            "svid.jwt_ttl",
            &raw.svid.jwt_ttl,
            Duration::from_secs(300),
            &mut warnings,
        )?;
        let wit_ttl = cx.ttl(
            "svid.wit_ttl",
            &raw.svid.wit_ttl,
            Duration::from_secs(3600),
            &mut warnings,
        )?;
        let ca_ttl = cx.ttl(
            "authority.ca_ttl",
            &raw.authority.ca_ttl,
            Duration::from_secs(24 * 3600),
            &mut warnings,
        )?;
        let jwt_key_ttl = cx.ttl(
            "authority.jwt_key_ttl",
            &raw.authority.jwt_key_ttl,
            Duration::from_secs(24 * 3600),
            &mut warnings,
        )?;
        let jwt_key_type = match &raw.authority.jwt_key_type {
            None => crate::identity::jws::JwtKeyType::default(),
            Some(v) => crate::identity::jws::JwtKeyType::parse(v.get_ref()).ok_or_else(|| {
                cx.invalid(
                    "authority.jwt_key_type",
                    v,
                    format!(
                        "{:?} is not a key type; expected one of {}",
                        v.get_ref(),
                        crate::identity::jws::JwtKeyType::NAMES.join(", ")
                    ),
                )
            })?,
        };

        let federation = Self::federation_config(&cx, &raw.federation, &trust_domain)?;
        if let (Some(first), Some(_)) = (raw.federation.first(), &raw.upstream) {
            return Err(cx.invalid(
                "federation",
                &first.trust_domain,
                "in upstream mode the fleet authority fetches foreign bundles and agents receive them with the trust domain's bundle; configure [[federation]] on the authority",
            ));
        }
        let mut entries = Vec::with_capacity(raw.entries.len());
        for (i, e) in raw.entries.iter().enumerate() {
            let key = |k: &str| format!("entries[{i}].{k}");
            let template = IdTemplate::parse(e.spiffe_id.get_ref())
                .map_err(|m| cx.invalid(&key("spiffe_id"), &e.spiffe_id, m))?;
            if template.trust_domain() != trust_domain.as_str() {
                return Err(cx.invalid(&key("spiffe_id"), &e.spiffe_id, format!(
                    "trust domain {:?} differs from the agent's {:?}; this agent signs only its own trust domain",
                    template.trust_domain(), trust_domain.as_str()
                )));
            }
            if e.selectors.get_ref().is_empty() {
                return Err(cx.invalid(
                    &key("selectors"),
                    &e.selectors,
                    "an entry needs at least one selector",
                ));
            }
            let mut selectors = Vec::new();
            for s in e.selectors.get_ref() {
                selectors.push(
                    Selector::parse(s.get_ref())
                        .map_err(|err| cx.invalid(&key("selectors"), s, err.to_string()))?,
                );
            }
            let hint = match &e.hint {
                Some(h) if h.get_ref().len() > 1024 => {
                    return Err(cx.invalid(&key("hint"), h, "hints are limited to 1024 bytes"));
                }
                Some(h) => Some(h.get_ref().clone()),
                None => None,
            };
            let entry_x509 = cx.ttl(&key("x509_ttl"), &e.x509_ttl, x509_ttl, &mut warnings)?;
            let entry_jwt = cx.ttl(&key("jwt_ttl"), &e.jwt_ttl, jwt_ttl, &mut warnings)?;
            let entry_wit = cx.ttl(&key("wit_ttl"), &e.wit_ttl, wit_ttl, &mut warnings)?;
            let mut federates_with = Vec::new();
            for d in e.federates_with.iter().flat_map(|l| l.get_ref()) {
                let text = d.get_ref();
                let td = spiffe::TrustDomain::new(text.strip_prefix("spiffe://").unwrap_or(text))
                    .map_err(|err| {
                    cx.invalid(
                        &key("federates_with"),
                        d,
                        format!("{text:?} is not a trust domain: {err}"),
                    )
                })?;
                if td == trust_domain {
                    return Err(cx.invalid(
                        &key("federates_with"),
                        d,
                        "names this agent's own trust domain, which every workload trusts already",
                    ));
                }
                // Single node: the domain must be one this agent fetches. In
                // upstream mode the fleet authority decides which it fetches;
                // an authority watching FederationRelationship objects may
                // get it from one.
                let live_federation = raw
                    .server
                    .as_ref()
                    .and_then(|s| s.registration.as_ref())
                    .and_then(|r| r.federation)
                    .unwrap_or(false);
                if raw.upstream.is_none()
                    && !live_federation
                    && !federation.iter().any(|f| f.trust_domain == td)
                {
                    return Err(cx.invalid(
                        &key("federates_with"),
                        d,
                        format!(
                            "no [[federation]] table for {:?}; add one naming its bundle endpoint",
                            td.as_str()
                        ),
                    ));
                }
                if !federates_with.contains(&td.as_str().to_string()) {
                    federates_with.push(td.as_str().to_string());
                }
            }
            entries.push(Entry {
                template,
                selectors,
                hint,
                x509_ttl: entry_x509,
                jwt_ttl: entry_jwt,
                wit_ttl: entry_wit,
                federates_with: federates_with.into(),
            });
        }

        let (admin_listen, admin_socket_path) = match &raw.admin {
            None => (None, None),
            Some(a) => {
                let listen = match &a.listen {
                    None => None,
                    Some(l) => Some(l.get_ref().parse::<SocketAddr>().map_err(|e| {
                        cx.invalid(
                            "admin.listen",
                            l,
                            format!("not an address like 127.0.0.1:9090 ({e})"),
                        )
                    })?),
                };
                (listen, a.socket_path.clone())
            }
        };
        let socket_path = raw
            .socket_path
            .as_ref()
            .map(|p| p.get_ref().clone())
            .unwrap_or_else(|| PathBuf::from("/run/tessera/sockets/agent.sock"));
        let data_dir = raw
            .data_dir
            .as_ref()
            .map(|p| p.get_ref().clone())
            .unwrap_or_else(|| PathBuf::from("/var/lib/tessera"));
        if let (Some(admin), Some(sock_dir)) = (&admin_socket_path, socket_path.parent())
            && admin.starts_with(sock_dir)
            && !sock_dir.as_os_str().is_empty()
        {
            return Err(ConfigError::Invalid {
                file: file.to_string(),
                line: raw.socket_path.as_ref().map_or(1, |p| cx.line(p.span())),
                key: "admin.socket_path".into(),
                message: "the admin socket must not live in the workload socket directory (workloads can reach everything there)".into(),
            });
        }

        let ca_files = match (&raw.authority.ca_cert_file, &raw.authority.ca_key_file) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    file: file.to_string(),
                    line: 1,
                    key: "authority.ca_cert_file".into(),
                    message: "set both ca_cert_file and ca_key_file, or neither".into(),
                });
            }
        };

        let json = match &raw.log.format {
            None => false,
            Some(f) => match f.get_ref().as_str() {
                "json" => true,
                "text" => false,
                _ => return Err(cx.invalid("log.format", f, "must be \"text\" or \"json\"")),
            },
        };
        let shutdown_grace = match &raw.limits.shutdown_grace {
            None => Duration::from_secs(5),
            Some(g) => parse_duration(g.get_ref())
                .map_err(|e| cx.invalid("limits.shutdown_grace", g, e.to_string()))?,
        };

        let positive = |key: &str, v: &Option<Spanned<f64>>, default: f64| match v {
            None => Ok(default),
            Some(x) if x.get_ref().is_finite() && *x.get_ref() >= 1.0 => Ok(*x.get_ref()),
            Some(x) => Err(cx.invalid(key, x, "must be a number of at least 1")),
        };
        let caller_budget = crate::rate_limit::Budget {
            rate: positive(
                "limits.requests_per_second",
                &raw.limits.requests_per_second,
                1000.0,
            )?,
            burst: positive("limits.request_burst", &raw.limits.request_burst, 2000.0)?,
        };

        let at_least_one = |key: &str, v: &Option<Spanned<u32>>| match v {
            None => Ok(None),
            Some(m) if *m.get_ref() >= 1 => Ok(Some(*m.get_ref() as usize)),
            Some(m) => Err(cx.invalid(key, m, "must be at least 1")),
        };
        let max_connections =
            at_least_one("limits.max_connections", &raw.limits.max_connections)?.unwrap_or(16_384);
        let max_connections_per_uid = at_least_one(
            "limits.max_connections_per_uid",
            &raw.limits.max_connections_per_uid,
        )?;
        let max_connections_per_process = at_least_one(
            "limits.max_connections_per_process",
            &raw.limits.max_connections_per_process,
        )?;

        let http_timeout = |key: &str, v: &Option<Spanned<String>>, default: u64| match v {
            None => Ok(Duration::from_secs(default)),
            Some(t) => match parse_duration(t.get_ref()) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(cx.invalid(key, t, "must be greater than zero")),
                Err(e) => Err(cx.invalid(key, t, e.to_string())),
            },
        };
        let http_header_timeout = http_timeout(
            "limits.http_header_timeout",
            &raw.limits.http_header_timeout,
            10,
        )?;
        let http_request_timeout = http_timeout(
            "limits.http_request_timeout",
            &raw.limits.http_request_timeout,
            30,
        )?;
        let idle_timeout = http_timeout("limits.idle_timeout", &raw.limits.idle_timeout, 120)?;

        let k8s_attestor = match &raw.attestor.k8s {
            Some(k) if k.enabled.unwrap_or(true) => Some(Self::k8s_config(&cx, k)?),
            _ => None,
        };

        let https = match &raw.https {
            None => None,
            Some(h) => Some(Self::https_config(&cx, h, max_connections)?),
        };
        let sds = match &raw.sds {
            None => Some(crate::sds::SdsConfig::default()),
            Some(s) if s.enabled.unwrap_or(true) => Some(Self::sds_config(&cx, s)?),
            Some(_) => None,
        };
        let exchange = match &raw.exchange {
            Some(x) if x.enabled.unwrap_or(true) => {
                let mut exchange = Self::exchange_config(
                    &cx,
                    x,
                    &trust_domain,
                    &socket_path,
                    &data_dir,
                    &mut warnings,
                )?;
                // With an HTTPS face, the token service is under its issuer
                // URL (set once the listener is bound, for port 0).
                exchange.issuer_follows_https = https.is_some() && x.issuer.is_none();
                if let Some(issuer) = https.as_ref().and_then(|h| h.issuer.clone())
                    && exchange.issuer_follows_https
                {
                    exchange.issuer = issuer;
                }
                Some(exchange)
            }
            _ => None,
        };
        let upstream = match &raw.upstream {
            Some(u) => Some(Self::upstream_config(&cx, u, &data_dir)?),
            None => None,
        };
        if upstream.is_some()
            && (raw.authority.ca_cert_file.is_some() || raw.authority.ca_ttl.is_some())
        {
            return Err(ConfigError::Invalid {
                file: file.to_string(),
                line: 1,
                key: "authority".into(),
                message: "[authority] configures the local CA; with [upstream] the fleet authority signs, so remove one of them".into(),
            });
        }
        if let (Some(_), Some(kind)) = (&upstream, &raw.authority.jwt_key_type) {
            return Err(cx.invalid(
                "authority.jwt_key_type",
                kind,
                "with [upstream] the fleet authority signs JWT-SVIDs with the jwt*.key files of its key directory (`tessera authority init --jwt-key-type`); remove this key",
            ));
        }
        let server = match &raw.server {
            Some(srv) => Some(Self::server_config(
                &cx,
                srv,
                &trust_domain,
                (x509_ttl, jwt_ttl, wit_ttl),
            )?),
            None => None,
        };
        if upstream.is_some() || server.is_some() {
            // In fleet mode the authority signs only what it can verify; an
            // entry it can never confirm would fail every call of a caller
            // that matches it.
            let (mut i, authority) = (0, server.is_some());
            entries.retain(|e| {
                let keep = match crate::fleet::entitlement::never_entitled(e, authority) {
                    Some(why) => {
                        warnings.push(format!(
                            "{file}: entries[{i}] ({}) is skipped in fleet mode: {why}",
                            raw.entries[i].spiffe_id.get_ref()
                        ));
                        false
                    }
                    None => true,
                };
                i += 1;
                keep
            });
        }
        let bundle_endpoint = match &raw.bundle_endpoint {
            None => None,
            Some(_) if upstream.is_some() => {
                return Err(ConfigError::Invalid {
                    file: file.to_string(),
                    line: 1,
                    key: "bundle_endpoint".into(),
                    message: "in upstream mode the fleet authority serves the trust domain's bundle endpoint; configure [bundle_endpoint] there".into(),
                });
            }
            Some(b) => Some(Self::bundle_endpoint_config(
                &cx,
                b,
                max_connections,
                ca_ttl,
                &mut warnings,
            )?),
        };

        Ok(Config {
            trust_domain,
            socket_path,
            data_dir,
            x509_ttl,
            jwt_ttl,
            wit_ttl,
            authority: AuthorityConfig {
                ca_ttl,
                jwt_key_ttl,
                jwt_key_type,
                ca_files,
                persist: raw.authority.persist.unwrap_or(true),
            },
            proc_root: raw
                .attestor
                .proc_root
                .unwrap_or_else(|| PathBuf::from("/proc")),
            unix_attestor: tessera_attestor::UnixAttestorConfig {
                discover_workload_path: raw.attestor.unix.discover_workload_path.unwrap_or(true),
                workload_size_limit: raw
                    .attestor
                    .unix
                    .workload_size_limit
                    .unwrap_or(128 * 1024 * 1024),
            },
            k8s_attestor,
            entries: EntrySet::new(entries),
            admin_listen,
            admin_socket_path,
            log: LogConfig {
                level: raw.log.level,
                json,
            },
            shutdown_grace,
            caller_budget,
            max_connections,
            max_connections_per_uid,
            max_connections_per_process,
            http_header_timeout,
            http_request_timeout,
            idle_timeout,
            exchange,
            https,
            upstream,
            server,
            sds,
            federation,
            bundle_endpoint,
            warnings,
        })
    }

    fn federation_config(
        cx: &Ctx<'_>,
        raw: &[RawFederation],
        own: &spiffe::TrustDomain,
    ) -> Result<Vec<crate::federation::Relationship>, ConfigError> {
        use crate::federation::{BootstrapInput, Field, Relationship, RelationshipInput};
        let mut out: Vec<Relationship> = Vec::with_capacity(raw.len());
        for (i, f) in raw.iter().enumerate() {
            let key = |k: &str| format!("federation[{i}].{k}");
            let input = RelationshipInput {
                trust_domain: f.trust_domain.get_ref(),
                bundle_endpoint_url: f.bundle_endpoint_url.get_ref(),
                bundle_endpoint_profile: f.bundle_endpoint_profile.get_ref(),
                endpoint_spiffe_id: f.endpoint_spiffe_id.as_ref().map(|s| s.get_ref().as_str()),
                bootstrap_bundle: f
                    .bootstrap_bundle
                    .as_ref()
                    .map(|p| BootstrapInput::File(p.get_ref())),
                ca_file: f.ca_file.as_ref().map(|p| p.get_ref().as_path()),
            };
            let relationship = Relationship::check(&input, own).map_err(|e| {
                // The line of the field at fault, or of the profile that
                // needs a missing one.
                let (name, span) = match e.field {
                    Field::TrustDomain => ("trust_domain", Some(f.trust_domain.span())),
                    Field::BundleEndpointUrl => {
                        ("bundle_endpoint_url", Some(f.bundle_endpoint_url.span()))
                    }
                    Field::BundleEndpointProfile => (
                        "bundle_endpoint_profile",
                        Some(f.bundle_endpoint_profile.span()),
                    ),
                    Field::EndpointSpiffeId => (
                        "endpoint_spiffe_id",
                        f.endpoint_spiffe_id.as_ref().map(|s| s.span()),
                    ),
                    Field::BootstrapBundle => (
                        "bootstrap_bundle",
                        f.bootstrap_bundle.as_ref().map(|s| s.span()),
                    ),
                    Field::CaFile => ("ca_file", f.ca_file.as_ref().map(|s| s.span())),
                };
                ConfigError::Invalid {
                    file: cx.file.to_string(),
                    line: cx.line(span.unwrap_or_else(|| f.bundle_endpoint_profile.span())),
                    key: key(name),
                    message: e.message,
                }
            })?;
            if out
                .iter()
                .any(|r| r.trust_domain == relationship.trust_domain)
            {
                return Err(cx.invalid(
                    &key("trust_domain"),
                    &f.trust_domain,
                    "appears in two [[federation]] tables",
                ));
            }
            out.push(relationship);
        }
        Ok(out)
    }

    fn bundle_endpoint_config(
        cx: &Ctx<'_>,
        b: &RawBundleEndpoint,
        max_connections: usize,
        ca_ttl: Duration,
        warnings: &mut Vec<String>,
    ) -> Result<crate::federation::EndpointConfig, ConfigError> {
        use crate::federation::{EndpointConfig, EndpointProfile};
        let listen = b.listen.get_ref().parse::<SocketAddr>().map_err(|e| {
            cx.invalid(
                "bundle_endpoint.listen",
                &b.listen,
                format!("not an address like 0.0.0.0:8443 ({e})"),
            )
        })?;
        let profile = match b.profile.as_ref().map(|p| p.get_ref().as_str()) {
            None | Some("https_spiffe") => {
                if let Some(c) = b.cert_file.as_ref().or(b.key_file.as_ref()) {
                    return Err(cx.invalid(
                        "bundle_endpoint.cert_file",
                        c,
                        "only used with profile = \"https_web\"; https_spiffe serves an X509-SVID of this trust domain",
                    ));
                }
                EndpointProfile::HttpsSpiffe
            }
            Some("https_web") => match (&b.cert_file, &b.key_file) {
                (Some(c), Some(k)) => EndpointProfile::HttpsWeb {
                    cert_file: c.get_ref().clone(),
                    key_file: k.get_ref().clone(),
                },
                _ => {
                    return Err(cx.invalid(
                        "bundle_endpoint.cert_file",
                        b.profile.as_ref().expect("matched Some"),
                        "https_web needs cert_file and key_file: a Web PKI certificate for the endpoint's host name",
                    ));
                }
            },
            Some(_) => {
                return Err(cx.invalid(
                    "bundle_endpoint.profile",
                    b.profile.as_ref().expect("matched Some"),
                    "must be \"https_spiffe\" or \"https_web\"",
                ));
            }
        };
        let refresh_hint = Self::duration_or(
            cx,
            "bundle_endpoint.refresh_hint",
            &b.refresh_hint,
            Duration::from_secs(300),
        )?;
        // A new CA is published at half the CA's life and signs from two
        // thirds: peers polling at the hint must see it well before.
        let lead = ca_ttl / 6;
        if lead < refresh_hint * 3 {
            warnings.push(format!(
                "{}: bundle_endpoint.refresh_hint {} is long for authority.ca_ttl {}: a new CA is published {} before it signs, and peers should fetch at least three times in between",
                cx.file,
                humantime::format_duration(refresh_hint),
                humantime::format_duration(ca_ttl),
                humantime::format_duration(lead),
            ));
        }
        Ok(EndpointConfig {
            listen,
            profile,
            refresh_hint,
            reload_interval: Self::duration_or(
                cx,
                "bundle_endpoint.reload_interval",
                &b.reload_interval,
                Duration::from_secs(10),
            )?,
            max_connections,
        })
    }

    fn duration_or(
        cx: &Ctx<'_>,
        key: &str,
        v: &Option<Spanned<String>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(t) => match parse_duration(t.get_ref()) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(cx.invalid(key, t, "must be greater than zero")),
                Err(e) => Err(cx.invalid(key, t, e.to_string())),
            },
        }
    }

    fn upstream_config(
        cx: &Ctx<'_>,
        u: &RawUpstream,
        data_dir: &Path,
    ) -> Result<crate::fleet::client::UpstreamConfig, ConfigError> {
        use crate::fleet::client::{NodeAttestation, UpstreamConfig};
        if u.addresses.get_ref().is_empty() {
            return Err(cx.invalid(
                "upstream.addresses",
                &u.addresses,
                "list at least one host:port",
            ));
        }
        for a in u.addresses.get_ref() {
            if a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(cx.invalid(
                    "upstream.addresses",
                    &u.addresses,
                    format!("{a:?} is not host:port"),
                ));
            }
        }
        let attestation = match u.node_attestation.get_ref().as_str() {
            "k8s_psat" => NodeAttestation::K8sPsat,
            "join_token" => NodeAttestation::JoinToken,
            _ => {
                return Err(cx.invalid(
                    "upstream.node_attestation",
                    &u.node_attestation,
                    "must be \"k8s_psat\" or \"join_token\"",
                ));
            }
        };
        Ok(UpstreamConfig {
            addresses: u.addresses.get_ref().clone(),
            server_name: u
                .server_name
                .clone()
                .unwrap_or_else(|| "tessera-authority".into()),
            bundle_file: u.bundle_file.clone(),
            attestation,
            token_file: u.token_file.clone(),
            bundle_refresh: Self::duration_or(
                cx,
                "upstream.bundle_refresh",
                &u.bundle_refresh,
                Duration::from_secs(10),
            )?,
            request_timeout: Self::duration_or(
                cx,
                "upstream.request_timeout",
                &u.request_timeout,
                Duration::from_secs(5),
            )?,
            state_dir: data_dir.to_path_buf(),
        })
    }

    fn server_config(
        cx: &Ctx<'_>,
        srv: &RawServer,
        td: &spiffe::TrustDomain,
        svid_ttls: (Duration, Duration, Duration),
    ) -> Result<crate::fleet::server::ServerConfig, ConfigError> {
        let mut operators = Vec::new();
        for o in &srv.operators {
            let id = spiffe::SpiffeId::new(o.get_ref())
                .map_err(|e| cx.invalid("server.operators", o, format!("not a SPIFFE ID: {e}")))?;
            if !id.is_member_of(td) {
                return Err(cx.invalid(
                    "server.operators",
                    o,
                    format!("must be an ID of trust domain {td} (the authority verifies operators' X.509-SVIDs against its own CAs)"),
                ));
            }
            if crate::fleet::is_reserved(&id) {
                return Err(cx.invalid(
                    "server.operators",
                    o,
                    "IDs under /tessera/ are the fleet's own (nodes, the authority) and can never be operators",
                ));
            }
            operators.push(id);
        }
        let listen = srv.listen.get_ref().parse::<SocketAddr>().map_err(|e| {
            cx.invalid(
                "server.listen",
                &srv.listen,
                format!("not an address like 0.0.0.0:8443 ({e})"),
            )
        })?;
        let kubernetes = match &srv.kubernetes {
            Some(k) if k.enabled.unwrap_or(true) => {
                let api_server = match &k.api_server {
                    Some(a) => a.clone(),
                    None => match (
                        std::env::var("KUBERNETES_SERVICE_HOST"),
                        std::env::var("KUBERNETES_SERVICE_PORT"),
                    ) {
                        (Ok(h), Ok(p)) if h.contains(':') => format!("https://[{h}]:{p}"),
                        (Ok(h), Ok(p)) => format!("https://{h}:{p}"),
                        _ => "https://kubernetes.default.svc".into(),
                    },
                };
                let mut allowed = Vec::new();
                for a in &k.allowed_service_accounts {
                    match a.get_ref().split_once(':') {
                        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => {
                            allowed.push(a.get_ref().clone())
                        }
                        _ => {
                            return Err(cx.invalid(
                                "server.kubernetes.allowed_service_accounts",
                                a,
                                "each must be \"namespace:service-account\"",
                            ));
                        }
                    }
                }
                if allowed.is_empty() {
                    return Err(ConfigError::Invalid {
                        file: cx.file.to_string(),
                        line: cx.line(srv.listen.span()),
                        key: "server.kubernetes.allowed_service_accounts".into(),
                        message: "name the agents' service account (\"namespace:name\"); no other may attest nodes".into(),
                    });
                }
                let sa = Path::new("/var/run/secrets/kubernetes.io/serviceaccount");
                Some(crate::fleet::kube::KubeConfig {
                    api_server,
                    ca_file: k.ca_file.clone().unwrap_or_else(|| sa.join("ca.crt")),
                    token_file: k.token_file.clone().unwrap_or_else(|| sa.join("token")),
                    audience: k
                        .audience
                        .clone()
                        .unwrap_or_else(|| "tessera-authority".into()),
                    allowed_service_accounts: allowed,
                    pod_cache_ttl: Self::duration_or(
                        cx,
                        "server.kubernetes.pod_cache_ttl",
                        &k.pod_cache_ttl,
                        Duration::from_secs(2),
                    )?,
                    timeout: Duration::from_secs(5),
                })
            }
            _ => None,
        };
        let store = match &srv.store {
            None => None,
            Some(st) => {
                let kind = match st.kind.get_ref().as_str() {
                    "kubernetes" => crate::fleet::store::StoreKind::Kubernetes,
                    "postgres" => crate::fleet::store::StoreKind::Postgres,
                    _ => {
                        return Err(cx.invalid(
                            "server.store.kind",
                            &st.kind,
                            "must be \"kubernetes\" (custom resources in the Kubernetes API) or \"postgres\" (tables in a PostgreSQL database)",
                        ));
                    }
                };
                let postgres = kind == crate::fleet::store::StoreKind::Postgres;
                if !postgres && kubernetes.is_none() {
                    return Err(cx.invalid(
                        "server.store.kind",
                        &st.kind,
                        "\"kubernetes\" needs [server.kubernetes] (the API server and the authority's credentials)",
                    ));
                }
                let database = if postgres {
                    if let Some(ns) = &st.namespace {
                        return Err(cx.invalid(
                            "server.store.namespace",
                            ns,
                            "only for kind = \"kubernetes\"",
                        ));
                    }
                    let Some(url) = &st.url else {
                        return Err(cx.invalid(
                            "server.store.url",
                            &st.kind,
                            "required with kind = \"postgres\", e.g. \"postgresql://tessera@db.example/tessera\"",
                        ));
                    };
                    let client = match (&st.tls_cert_file, &st.tls_key_file) {
                        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                        (None, None) => None,
                        (Some(_), None) | (None, Some(_)) => {
                            return Err(cx.invalid(
                                "server.store.tls_cert_file",
                                &st.kind,
                                "tls_cert_file and tls_key_file go together (a client certificate and its key)",
                            ));
                        }
                    };
                    let tls = match (&st.tls_ca_file, client) {
                        (Some(ca_file), client) => Some(crate::fleet::store::postgres::TlsFiles {
                            ca_file: ca_file.clone(),
                            client,
                        }),
                        (None, None) => None,
                        (None, Some(_)) => {
                            return Err(cx.invalid(
                                "server.store.tls_ca_file",
                                &st.kind,
                                "required with tls_cert_file: the CA the database's certificate is verified against",
                            ));
                        }
                    };
                    crate::fleet::store::postgres::check_url(url.get_ref(), tls.is_some())
                        .map_err(|m| cx.invalid("server.store.url", url, m))?;
                    Some(crate::fleet::store::postgres::DatabaseConfig {
                        url: url.get_ref().clone(),
                        password_file: st.password_file.clone(),
                        migrate: st.migrate.unwrap_or(true),
                        tls,
                    })
                } else {
                    for (key, set) in [
                        ("server.store.url", st.url.is_some()),
                        ("server.store.password_file", st.password_file.is_some()),
                        ("server.store.migrate", st.migrate.is_some()),
                        ("server.store.tls_ca_file", st.tls_ca_file.is_some()),
                        ("server.store.tls_cert_file", st.tls_cert_file.is_some()),
                        ("server.store.tls_key_file", st.tls_key_file.is_some()),
                    ] {
                        if set {
                            return Err(cx.invalid(key, &st.kind, "only for kind = \"postgres\""));
                        }
                    }
                    None
                };
                let namespace = match &st.namespace {
                    _ if postgres => String::new(),
                    Some(ns) => {
                        let n = ns.get_ref();
                        let dns_label = !n.is_empty()
                            && n.len() <= 63
                            && n.bytes()
                                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                            && !n.starts_with('-')
                            && !n.ends_with('-');
                        if !dns_label {
                            return Err(cx.invalid(
                                "server.store.namespace",
                                ns,
                                "not a Kubernetes namespace name (lowercase letters, digits and '-', at most 63)",
                            ));
                        }
                        n.clone()
                    }
                    // In a pod: the authority's own namespace.
                    None => std::fs::read_to_string(
                        "/var/run/secrets/kubernetes.io/serviceaccount/namespace",
                    )
                    .ok()
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| {
                        cx.invalid(
                            "server.store.namespace",
                            &st.kind,
                            "required outside a pod (the namespace of the RevocationBatch objects)",
                        )
                    })?,
                };
                let batch_window = Self::duration_or(
                    cx,
                    "server.store.batch_window",
                    &st.batch_window,
                    Duration::from_millis(50),
                )?;
                if batch_window > Duration::from_secs(1) {
                    let at = st
                        .batch_window
                        .as_ref()
                        .expect("set when above the default");
                    return Err(cx.invalid(
                        "server.store.batch_window",
                        at,
                        "at most 1s (revocations must reach every node within 2 s)",
                    ));
                }
                Some(crate::fleet::store::StoreConfig {
                    approvals: st.approvals.unwrap_or(false),
                    kind,
                    namespace,
                    database,
                    batch_window,
                })
            }
        };
        let registration = match &srv.registration {
            None => None,
            Some(r) => {
                let source = match r.kind.get_ref().as_str() {
                    "kubernetes" => crate::fleet::registration::Source::Kubernetes,
                    "postgres" => crate::fleet::registration::Source::Postgres,
                    _ => {
                        return Err(cx.invalid(
                            "server.registration.kind",
                            &r.kind,
                            "must be \"kubernetes\" (ClusterWorkloadEntry and WorkloadEntry objects) or \"postgres\" (rows of tessera_entries in the [server.store] database)",
                        ));
                    }
                };
                if source == crate::fleet::registration::Source::Postgres
                    && store.as_ref().map(|s| s.kind)
                        != Some(crate::fleet::store::StoreKind::Postgres)
                {
                    return Err(cx.invalid(
                        "server.registration.kind",
                        &r.kind,
                        "\"postgres\" needs [server.store] kind = \"postgres\" (the database the entries live in)",
                    ));
                }
                if source == crate::fleet::registration::Source::Kubernetes && kubernetes.is_none()
                {
                    return Err(cx.invalid(
                        "server.registration.kind",
                        &r.kind,
                        "\"kubernetes\" needs [server.kubernetes] (the API server and the authority's credentials)",
                    ));
                }
                if source == crate::fleet::registration::Source::Postgres
                    && r.federation == Some(true)
                {
                    return Err(cx.invalid(
                        "server.registration.federation",
                        &r.kind,
                        "FederationRelationship objects are kept in the Kubernetes API only; with kind = \"postgres\" use [[federation]] tables in the config file",
                    ));
                }
                Some(crate::fleet::registration::RegistrationConfig {
                    source,
                    namespaced: r.namespaced.unwrap_or(true),
                    federation: r.federation.unwrap_or(false),
                    x509_ttl: svid_ttls.0,
                    jwt_ttl: svid_ttls.1,
                    wit_ttl: svid_ttls.2,
                })
            }
        };
        Ok(crate::fleet::server::ServerConfig {
            registration,
            listen,
            keys_dir: srv.keys_dir.clone(),
            server_name: srv
                .server_name
                .clone()
                .unwrap_or_else(|| "tessera-authority".into()),
            node_svid_ttl: Self::duration_or(
                cx,
                "server.node_svid_ttl",
                &srv.node_svid_ttl,
                Duration::from_secs(3600),
            )?,
            ca_publish_lead: Self::duration_or(
                cx,
                "server.ca_publish_lead",
                &srv.ca_publish_lead,
                Duration::from_secs(600),
            )?,
            key_reload_interval: Self::duration_or(
                cx,
                "server.key_reload_interval",
                &srv.key_reload_interval,
                Duration::from_secs(30),
            )?,
            join_token_dir: srv.join_token_dir.clone(),
            audit_log: srv.audit_log.clone(),
            kubernetes,
            store,
            max_access_token_ttl: Self::duration_or(
                cx,
                "server.max_access_token_ttl",
                &srv.max_access_token_ttl,
                Duration::from_secs(3600),
            )?,
            max_connections: 4096,
            // Set from the bound `[https]` listener (its port may be 0).
            jwt_issuer: None,
            operators,
        })
    }

    fn exchange_config(
        cx: &Ctx<'_>,
        x: &RawExchange,
        trust_domain: &spiffe::TrustDomain,
        workload_socket: &Path,
        data_dir: &Path,
        warnings: &mut Vec<String>,
    ) -> Result<ExchangeConfig, ConfigError> {
        let duration = |key: &str, v: &Option<Spanned<String>>, default: Duration| match v {
            None => Ok(default),
            Some(v) => match parse_duration(v.get_ref()) {
                Ok(d) if d.is_zero() => Err(cx.invalid(key, v, "must be greater than zero")),
                Ok(d) => Ok(d),
                Err(e) => Err(cx.invalid(
                    key,
                    v,
                    format!("not a duration ({e}); use e.g. \"90s\", \"15m\""),
                )),
            },
        };
        let max_ttl = cx.ttl(
            "exchange.max_ttl",
            &x.max_ttl,
            Duration::from_secs(15 * 60),
            warnings,
        )?;
        let default_ttl = cx.ttl(
            "exchange.default_ttl",
            &x.default_ttl,
            Duration::from_secs(5 * 60).min(max_ttl),
            warnings,
        )?;
        let socket_path = match &x.socket_path {
            Some(p) => p.get_ref().clone(),
            None => workload_socket.with_file_name("exchange.sock"),
        };
        if socket_path == workload_socket {
            let span = x.socket_path.as_ref().map(|p| p.span()).unwrap_or(0..0);
            return Err(ConfigError::Invalid {
                file: cx.file.to_string(),
                line: cx.line(span),
                key: "exchange.socket_path".into(),
                message: "must differ from the Workload API socket_path".into(),
            });
        }
        let issuer = match &x.issuer {
            Some(i) if i.get_ref().is_empty() || i.get_ref().len() > 512 => {
                return Err(cx.invalid("exchange.issuer", i, "must be 1 to 512 characters"));
            }
            Some(i) => i.get_ref().clone(),
            None => format!("spiffe://{}/tessera", trust_domain.as_str()),
        };
        let max_delegation_depth = match &x.max_delegation_depth {
            Some(d) if *d.get_ref() > 16 => {
                return Err(cx.invalid(
                    "exchange.max_delegation_depth",
                    d,
                    "at most 16 (each hop nests an `act` claim)",
                ));
            }
            Some(d) => *d.get_ref(),
            None => 3,
        };
        let audit_log = x
            .audit_log
            .clone()
            .unwrap_or_else(|| data_dir.join("audit.jsonl"));
        let audit_commit_delay = match &x.audit_commit_delay {
            None => Duration::ZERO,
            Some(v) => match parse_duration(v.get_ref()) {
                Ok(d) if d <= crate::audit::MAX_COMMIT_DELAY => d,
                Ok(_) => {
                    return Err(cx.invalid(
                        "exchange.audit_commit_delay",
                        v,
                        "at most \"100ms\" (every exchange may wait this long for its record's batch)",
                    ));
                }
                Err(e) => {
                    return Err(cx.invalid(
                        "exchange.audit_commit_delay",
                        v,
                        format!("not a duration ({e}); use e.g. \"0s\", \"200us\", \"1ms\""),
                    ));
                }
            },
        };
        Ok(ExchangeConfig {
            socket_path,
            policy_dir: x.policy_dir.clone(),
            policy_reload_interval: duration(
                "exchange.policy_reload_interval",
                &x.policy_reload_interval,
                Duration::from_secs(2),
            )?,
            issuer,
            issuer_follows_https: false,
            max_ttl,
            default_ttl: default_ttl.min(max_ttl),
            audit_anchor: x
                .audit_anchor
                .clone()
                .unwrap_or_else(|| crate::audit::anchor::default_path(&audit_log)),
            audit_log,
            audit_commit_delay,
            max_delegation_depth,
            approval_timeout: duration(
                "exchange.approval_timeout",
                &x.approval_timeout,
                Duration::from_secs(10 * 60),
            )?,
            approval_grant_ttl: duration(
                "exchange.approval_grant_ttl",
                &x.approval_grant_ttl,
                Duration::from_secs(5 * 60),
            )?,
            approval_poll_interval: duration(
                "exchange.approval_poll_interval",
                &x.approval_poll_interval,
                Duration::from_secs(2),
            )?,
            denial_records_per_minute: match &x.denial_records_per_minute {
                Some(n) if *n.get_ref() == 0 => {
                    return Err(cx.invalid(
                        "exchange.denial_records_per_minute",
                        n,
                        "must be at least 1 (denials are always audited, up to this many per principal per minute)",
                    ));
                }
                Some(n) => *n.get_ref(),
                None => 600,
            },
        })
    }

    fn sds_config(cx: &Ctx<'_>, raw: &RawSds) -> Result<crate::sds::SdsConfig, ConfigError> {
        let defaults = crate::sds::SdsConfig::default();
        let name = |v: &Option<Spanned<String>>, default: String| {
            v.as_ref().map_or(default, |n| n.get_ref().clone())
        };
        let config = crate::sds::SdsConfig {
            default_svid_name: name(&raw.default_svid_name, defaults.default_svid_name),
            default_bundle_name: name(&raw.default_bundle_name, defaults.default_bundle_name),
            default_all_bundles_name: name(
                &raw.default_all_bundles_name,
                defaults.default_all_bundles_name,
            ),
            disable_spiffe_cert_validation: raw.disable_spiffe_cert_validation.unwrap_or(false),
        };
        if let Err((key, message)) = config.check() {
            let spanned = match key {
                "sds.default_svid_name" => &raw.default_svid_name,
                "sds.default_bundle_name" => &raw.default_bundle_name,
                _ => &raw.default_all_bundles_name,
            };
            // The key that failed was set (defaults pass the check).
            if let Some(spanned) = spanned {
                return Err(cx.invalid(key, spanned, message));
            }
        }
        Ok(config)
    }

    fn https_config(
        cx: &Ctx<'_>,
        h: &RawHttps,
        max_connections: usize,
    ) -> Result<crate::https::HttpsConfig, ConfigError> {
        let listen = h.listen.get_ref().parse::<SocketAddr>().map_err(|e| {
            cx.invalid(
                "https.listen",
                &h.listen,
                format!("not an address like 0.0.0.0:8443 ({e})"),
            )
        })?;
        let issuer = match &h.issuer {
            None => None,
            Some(i) => {
                let text = i.get_ref();
                let valid = crate::https::issuer_host(text).is_some()
                    && !text.ends_with('/')
                    && !text.contains(['?', '#'])
                    && text.len() <= 512;
                if !valid {
                    return Err(cx.invalid(
                        "https.issuer",
                        i,
                        "must be an https:// URL without query, fragment or trailing slash, such as https://tessera.example.com",
                    ));
                }
                Some(text.clone())
            }
        };
        let files = match (&h.cert_file, &h.key_file) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((c.get_ref().clone(), k.get_ref().clone())),
            (Some(c), None) => {
                return Err(cx.invalid("https.key_file", c, "is required with https.cert_file"));
            }
            (None, Some(k)) => {
                return Err(cx.invalid("https.cert_file", k, "is required with https.key_file"));
            }
        };
        let reload_interval = match &h.reload_interval {
            None => Duration::from_secs(10),
            Some(v) => match parse_duration(v.get_ref()) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    return Err(cx.invalid(
                        "https.reload_interval",
                        v,
                        "must be greater than zero",
                    ));
                }
                Err(e) => return Err(cx.invalid("https.reload_interval", v, e.to_string())),
            },
        };
        Ok(crate::https::HttpsConfig {
            listen,
            issuer,
            server_name: h.server_name.clone(),
            files,
            reload_interval,
            max_connections,
        })
    }

    fn k8s_config(
        cx: &Ctx<'_>,
        k: &RawK8sAttestor,
    ) -> Result<tessera_attestor::K8sAttestorConfig, ConfigError> {
        let duration = |key: &str, v: &Option<Spanned<String>>, default: Duration| match v {
            None => Ok(default),
            Some(v) => parse_duration(v.get_ref()).map_err(|e| cx.invalid(key, v, e.to_string())),
        };
        let host = match (&k.kubelet_host, &k.kubelet_host_env) {
            (Some(h), _) => h.clone(),
            (None, Some(var)) => std::env::var(var.get_ref()).map_err(|_| {
                cx.invalid(
                    "attestor.k8s.kubelet_host_env",
                    var,
                    format!("environment variable {} is not set", var.get_ref()),
                )
            })?,
            (None, None) => "127.0.0.1".to_string(),
        };
        let sa = PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount");
        let (port, read_only) = match k.read_only_port {
            Some(p) => (p, true),
            None => (k.kubelet_port.unwrap_or(10250), false),
        };
        Ok(tessera_attestor::K8sAttestorConfig {
            kubelet: tessera_attestor::kubelet::KubeletConfig {
                host,
                port,
                read_only,
                token_path: Some(k.token_path.clone().unwrap_or_else(|| sa.join("token"))),
                ca_path: Some(
                    k.kubelet_ca_path
                        .clone()
                        .unwrap_or_else(|| sa.join("ca.crt")),
                ),
                skip_verification: k.skip_kubelet_verification.unwrap_or(false),
                timeout: duration(
                    "attestor.k8s.request_timeout",
                    &k.request_timeout,
                    Duration::from_secs(10),
                )?,
            },
            poll_attempts: k.poll_attempts.unwrap_or(60).max(1),
            poll_interval: duration(
                "attestor.k8s.poll_interval",
                &k.poll_interval,
                Duration::from_millis(500),
            )?,
            cache_max_age: Duration::from_secs(5),
        })
    }

    /// The embedded `--dev` configuration: trust domain `example.org`, state
    /// under `base` (normally `./.tessera`), and one entry giving the invoking
    /// user's uid the ID `spiffe://example.org/user/<name>`.
    pub fn dev(base: &Path) -> Result<Self, ConfigError> {
        let uid = nix::unistd::geteuid();
        let name = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| format!("uid-{uid}"));
        let text = dev_config_text(base, uid.as_raw(), &sanitize_segment(&name));
        Self::parse(&text, "<embedded --dev config>")
    }
}

/// The embedded development configuration (also shown by `--print-config`).
pub fn dev_config_text(base: &Path, uid: u32, user_segment: &str) -> String {
    let base = base.display();
    format!(
        r#"trust_domain = "example.org"
socket_path  = "{base}/agent.sock"
data_dir     = "{base}"

[svid]
x509_ttl = "1h"
jwt_ttl  = "5m"

[[entries]]
spiffe_id = "spiffe://example.org/user/{user_segment}"
selectors = ["unix:uid:{uid}"]
hint      = "dev"

[admin]
listen = "127.0.0.1:0"
# The operator socket (approvals), beside the workload socket directory,
# never in it.
socket_path = "{base}-operator/admin.sock"

# The trust domain's HTTPS face on a free port: OpenID discovery and keys
# at https://localhost:<port>, which JWT-SVIDs carry as `iss`. Its
# certificate is issued by this trust domain's CA (`tessera api fetch x509
# --write DIR` writes the bundle to trust).
[https]
listen = "127.0.0.1:0"

# Token exchange on {base}/exchange.sock, with the demo policy `tessera run
# --dev` writes to {base}/policies/demo.cedar the first time: audience
# "demo", scope demo:read for your uid, demo:write once an operator approves
# (see docs/policy.md to write your own).
[exchange]
max_ttl = "15m"
policy_dir = "{base}/policies"
"#
    )
}

/// The demo policy of `--dev` (see [`dev_config_text`]): for `uid`, scope
/// `demo:read` on audience `demo`, and `demo:write` after an approval.
pub fn dev_demo_policy(uid: u32) -> String {
    format!(
        r#"// Written by `tessera run --dev` (once; edit freely, it is reloaded).
// Bearer tokens (no cnf): the SDK walk-throughs' servers speak plain HTTP on
// loopback and see no client certificate. Drop @bearer behind mTLS.
@id("dev-demo-read")
@max_ttl("10m")
@allow_delegation
@bearer
permit(principal, action == Tessera::Action::"demo:read", resource == Tessera::Audience::"demo")
when {{ principal.selectors.contains("unix:uid:{uid}") }};

@id("dev-demo-write-needs-approval")
@require_approval
@bearer
permit(principal, action == Tessera::Action::"demo:write", resource == Tessera::Audience::"demo")
when {{ principal.selectors.contains("unix:uid:{uid}") }};

// Over the HTTPS face (an OAuth client such as an MCP SDK) no process is
// attested: the JWT-SVID alone names the principal (this agent gives IDs
// only to your uid), and with no client certificate to bind to, the token
// is a bearer token.
@id("dev-demo-read-over-https")
@max_ttl("5m")
@bearer
permit(principal, action == Tessera::Action::"demo:read", resource == Tessera::Audience::"demo")
when {{ principal.path like "/user/*" && !principal.selectors.contains("unix:uid:{uid}") }};
"#
    )
}

/// Make a string usable as one SPIFFE ID path segment (`[A-Za-z0-9._-]`).
pub fn sanitize_segment(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match out.as_str() {
        "" | "." | ".." => format!("_{out}"),
        _ => out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "trust_domain = \"example.org\"\nsocket_path = \"/tmp/x/agent.sock\"\ndata_dir = \"/tmp/x\"\n";

    fn err(text: &str) -> String {
        Config::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn jwt_key_type_is_read_and_a_bad_one_names_the_key() {
        use crate::identity::jws::JwtKeyType;
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.authority.jwt_key_type, JwtKeyType::EcP256);
        for (name, kind) in [
            ("ec-p256", JwtKeyType::EcP256),
            ("rsa-2048", JwtKeyType::Rsa2048),
            ("rsa-4096", JwtKeyType::Rsa4096),
        ] {
            let text = format!("{MINIMAL}[authority]\njwt_key_type = \"{name}\"\n");
            let c = Config::parse(&text, "t.toml").unwrap();
            assert_eq!(c.authority.jwt_key_type, kind);
        }
        let e = err(&format!(
            "{MINIMAL}[authority]\njwt_key_type = \"rsa-1024\"\n"
        ));
        assert!(e.contains("authority.jwt_key_type"), "{e}");
        assert!(e.contains("t.toml:5"), "{e}");
        assert!(e.contains("rsa-2048"), "{e}");
        let upstream = "[upstream]\naddresses = [\"a:1\"]\nbundle_file = \"/b.pem\"\nnode_attestation = \"join_token\"\ntoken_file = \"/t\"\n";
        let e = err(&format!(
            "{MINIMAL}{upstream}[authority]\njwt_key_type = \"rsa-2048\"\n"
        ));
        assert!(
            e.contains("authority.jwt_key_type") && e.contains("--jwt-key-type"),
            "{e}"
        );
    }

    fn federation(extra: &str) -> String {
        format!(
            "{MINIMAL}[[federation]]\ntrust_domain = \"partner.example\"\nbundle_endpoint_url = \"https://bundle.partner.example:8443/\"\nbundle_endpoint_profile = \"https_web\"\n{extra}"
        )
    }

    #[test]
    fn federation_tables_and_federates_with_validate_and_name_their_keys() {
        use crate::federation::Profile;
        let entry = |fw: &str| {
            format!(
                "[[entries]]\nspiffe_id = \"spiffe://example.org/w\"\nselectors = [\"unix:uid:1\"]\nfederates_with = {fw}\n"
            )
        };
        let c = Config::parse(
            &federation(&entry("[\"spiffe://partner.example\"]")),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.federation.len(), 1);
        let r = &c.federation[0];
        assert_eq!(r.trust_domain.as_str(), "partner.example");
        assert_eq!(r.url.address(), "bundle.partner.example:8443");
        assert_eq!(r.profile, Profile::HttpsWeb { ca_file: None });
        let e = c.entries.iter().next().unwrap();
        assert_eq!(&*e.federates_with, ["partner.example".to_string()]);

        for (text, key, says) in [
            (
                format!("{MINIMAL}{}", entry("[\"partner.example\"]")),
                "entries[0].federates_with",
                "no [[federation]] table",
            ),
            (
                federation(&entry("[\"example.org\"]")),
                "entries[0].federates_with",
                "own trust domain",
            ),
            (
                federation(&entry("[\"Not A Domain\"]")),
                "entries[0].federates_with",
                "not a trust domain",
            ),
            (
                federation("").replace("https://bundle", "http://bundle"),
                "federation[0].bundle_endpoint_url",
                "https://",
            ),
            (
                federation("").replace("\"https_web\"", "\"https_pki\""),
                "federation[0].bundle_endpoint_profile",
                "https_web",
            ),
            (
                federation("endpoint_spiffe_id = \"spiffe://partner.example/x\"\n"),
                "federation[0].endpoint_spiffe_id",
                "only used with",
            ),
            (
                federation("").replace("\"https_web\"", "\"https_spiffe\""),
                "federation[0].endpoint_spiffe_id",
                "is required",
            ),
            (
                federation("endpoint_spiffe_id = \"spiffe://partner.example/x\"\n")
                    .replace("\"https_web\"", "\"https_spiffe\""),
                "federation[0].bootstrap_bundle",
                "is required",
            ),
            (
                federation("endpoint_spiffe_id = \"spiffe://partner.example/x\"\nbootstrap_bundle = \"/nonexistent/b.pem\"\n")
                    .replace("\"https_web\"", "\"https_spiffe\""),
                "federation[0].bootstrap_bundle",
                "cannot read",
            ),
            (
                federation("").replace("partner.example\"\nbundle", "example.org\"\nbundle"),
                "federation[0].trust_domain",
                "own trust domain",
            ),
            (
                format!("{}{}", federation(""), federation("").replace(MINIMAL, "")),
                "federation[1].trust_domain",
                "two [[federation]]",
            ),
        ] {
            let e = err(&text);
            assert!(e.contains(&format!("`{key}`")) && e.contains(says), "{key}: {e}");
        }
    }

    #[test]
    fn an_https_spiffe_endpoint_of_another_domain_needs_no_bootstrap_bundle() {
        let text =
            federation("endpoint_spiffe_id = \"spiffe://example.org/tessera/bundle-endpoint\"\n")
                .replace("\"https_web\"", "\"https_spiffe\"");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert!(matches!(
            &c.federation[0].profile,
            crate::federation::Profile::HttpsSpiffe {
                bootstrap_bundle: None,
                ..
            }
        ));
    }

    #[test]
    fn the_bundle_endpoint_table_validates_and_warns_about_a_long_hint() {
        let c = Config::parse(
            &format!("{MINIMAL}[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\n"),
            "t.toml",
        )
        .unwrap();
        let b = c.bundle_endpoint.unwrap();
        assert_eq!(b.profile, crate::federation::EndpointProfile::HttpsSpiffe);
        assert_eq!(b.refresh_hint, Duration::from_secs(300));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let e = err(&format!(
            "{MINIMAL}[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\nprofile = \"https_web\"\n"
        ));
        assert!(e.contains("cert_file and key_file"), "{e}");
        let e = err(&format!(
            "{MINIMAL}[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\ncert_file = \"/c\"\n"
        ));
        assert!(e.contains("`bundle_endpoint.cert_file`"), "{e}");
        let c = Config::parse(
            &format!("{MINIMAL}[authority]\nca_ttl = \"1h\"\n[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\nrefresh_hint = \"1h\"\n"),
            "t.toml",
        )
        .unwrap();
        assert!(
            c.warnings.iter().any(|w| w.contains("refresh_hint")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn upstream_mode_refuses_federation_and_the_bundle_endpoint() {
        let up = "[upstream]\naddresses = [\"a:1\"]\nbundle_file = \"/b.pem\"\nnode_attestation = \"join_token\"\ntoken_file = \"/t\"\n";
        let e = err(&format!("{}{up}", federation("")));
        assert!(e.contains("`federation`") && e.contains("authority"), "{e}");
        let e = err(&format!(
            "{MINIMAL}{up}[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\n"
        ));
        assert!(e.contains("`bundle_endpoint`"), "{e}");
        // federates_with in upstream mode names any domain: the authority
        // decides which it fetches.
        let c = Config::parse(
            &format!("{MINIMAL}{up}[[entries]]\nspiffe_id = \"spiffe://example.org/w\"\nselectors = [\"unix:uid:1\"]\nfederates_with = [\"partner.example\"]\n"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.entries.len(), 1);
    }

    #[test]
    fn upstream_and_server_tables_validate_and_name_their_keys() {
        let up = |extra: &str| {
            format!(
                "{MINIMAL}[upstream]\naddresses = [\"a:1\"]\nbundle_file = \"/b.pem\"\nnode_attestation = \"join_token\"\ntoken_file = \"/t\"\n{extra}"
            )
        };
        let c = Config::parse(&up(""), "t.toml").unwrap();
        let u = c.upstream.unwrap();
        assert_eq!(u.server_name, "tessera-authority");
        assert_eq!(u.bundle_refresh, Duration::from_secs(10));
        assert!(err(&up("bundle_refresh = \"0s\"\n")).contains("upstream.bundle_refresh"));
        assert!(err(&up("").replace("\"a:1\"", "\"nohost\"")).contains("upstream.addresses"));
        assert!(
            err(&up("").replace("join_token\"", "tpm\"")).contains("upstream.node_attestation")
        );
        assert!(err(&format!("{}[authority]\nca_ttl = \"2h\"\n", up(""))).contains("authority"));
        let srv = |extra: &str| {
            format!("{MINIMAL}[server]\nlisten = \"127.0.0.1:8443\"\nkeys_dir = \"/k\"\n{extra}")
        };
        let s = Config::parse(&srv(""), "t.toml").unwrap().server.unwrap();
        assert_eq!(s.ca_publish_lead, Duration::from_secs(600));
        assert!(s.kubernetes.is_none());
        assert!(err(&srv("").replace("127.0.0.1:8443", "nope")).contains("server.listen"));
        let k = "[server.kubernetes]\napi_server = \"https://k:6443\"\n";
        assert!(err(&srv(k)).contains("server.kubernetes.allowed_service_accounts"));
        assert!(
            err(&srv(&format!(
                "{k}allowed_service_accounts = [\"just-a-name\"]\n"
            )))
            .contains("namespace:service-account")
        );
        let ok = Config::parse(
            &srv(&format!(
                "{k}allowed_service_accounts = [\"tessera:agent\"]\n"
            )),
            "t.toml",
        )
        .unwrap()
        .server
        .unwrap();
        assert_eq!(ok.kubernetes.unwrap().audience, "tessera-authority");
        // Operators: SPIFFE IDs of this trust domain, never a fleet identity.
        let ops = Config::parse(
            &srv("operators = [\"spiffe://example.org/ops/alice\"]\n"),
            "t.toml",
        )
        .unwrap()
        .server
        .unwrap();
        assert_eq!(
            ops.operators[0].to_string(),
            "spiffe://example.org/ops/alice"
        );
        for bad in [
            "spiffe://other.org/ops/alice",
            "spiffe://example.org/tessera/node/k8s/n1",
            "alice",
        ] {
            let e = err(&srv(&format!("operators = [\"{bad}\"]\n")));
            assert!(e.contains("server.operators"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_postgres_store_names_the_key_at_fault() {
        let srv = |extra: &str| {
            format!("{MINIMAL}[server]\nlisten = \"127.0.0.1:8443\"\nkeys_dir = \"/k\"\n{extra}")
        };
        let pg = "[server.store]\nkind = \"postgres\"\n";
        let url = "url = \"postgresql://tessera@db.example/fleet\"\n";
        let s = Config::parse(
            &srv(&format!("{pg}{url}password_file = \"/run/pg\"\n")),
            "t.toml",
        )
        .unwrap()
        .server
        .unwrap();
        let store = s.store.unwrap();
        assert_eq!(store.kind, crate::fleet::store::StoreKind::Postgres);
        let db = store.database.unwrap();
        assert!(db.migrate);
        assert_eq!(
            db.password_file.unwrap(),
            std::path::PathBuf::from("/run/pg")
        );
        assert!(err(&srv(pg)).contains("server.store.url"));
        let e = err(&srv(&format!(
            "{pg}url = \"postgresql://tessera:s3cret@db.example/fleet\"\n"
        )));
        assert!(
            e.contains("server.store.url") && e.contains("password_file"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        assert!(
            err(&srv(&format!("{pg}{url}namespace = \"x\"\n"))).contains("server.store.namespace")
        );
        assert!(err(&srv("[server.store]\nkind = \"etcd\"\n")).contains("\"postgres\""));
        // TLS: the CA verifies the server; a client certificate comes with
        // its key and needs the CA; sslmode must agree.
        let tls =
            "tls_ca_file = \"/ca.pem\"\ntls_cert_file = \"/c.pem\"\ntls_key_file = \"/c.key\"\n";
        let db = Config::parse(&srv(&format!("{pg}{url}{tls}")), "t.toml")
            .unwrap()
            .server
            .unwrap()
            .store
            .unwrap()
            .database
            .unwrap();
        let files = db.tls.unwrap();
        assert_eq!(files.ca_file, std::path::PathBuf::from("/ca.pem"));
        assert_eq!(files.client, Some(("/c.pem".into(), "/c.key".into())));
        assert!(
            err(&srv(&format!("{pg}{url}tls_cert_file = \"/c.pem\"\n")))
                .contains("server.store.tls_cert_file")
        );
        assert!(
            err(&srv(&format!(
                "{pg}{url}tls_cert_file = \"/c.pem\"\ntls_key_file = \"/c.key\"\n"
            )))
            .contains("server.store.tls_ca_file")
        );
        let e = err(&srv(&format!(
            "{pg}url = \"postgresql://tessera@db.example/fleet?sslmode=require\"\n"
        )));
        assert!(
            e.contains("server.store.url") && e.contains("tls_ca_file"),
            "{e}"
        );
        let e = err(&srv(
            "[server.kubernetes]\napi_server = \"https://k:6443\"\nallowed_service_accounts = [\"tessera:agent\"]\n[server.store]\nkind = \"kubernetes\"\ntls_ca_file = \"/ca.pem\"\n",
        ));
        assert!(e.contains("server.store.tls_ca_file"), "{e}");
        // Registration in the database needs the store there.
        let reg = "[server.registration]\nkind = \"postgres\"\n";
        assert!(err(&srv(reg)).contains("server.registration.kind"));
        let s = Config::parse(&srv(&format!("{pg}{url}{reg}")), "t.toml")
            .unwrap()
            .server
            .unwrap();
        assert_eq!(
            s.registration.unwrap().source,
            crate::fleet::registration::Source::Postgres
        );
    }

    #[test]
    fn minimal_config_has_defaults() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.x509_ttl, Duration::from_secs(3600));
        assert_eq!(c.jwt_ttl, Duration::from_secs(300));
        assert!(c.entries.is_empty());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = err(&format!("{MINIMAL}\n[svid]\nx509_tl = \"1h\"\n"));
        assert!(e.contains("x509_tl") && e.contains("line 6"), "{e}");
    }

    #[test]
    fn invalid_spiffe_id_is_rejected_with_line() {
        for bad in [
            "spiffe://example.org/a//b",
            "spiffe://Example.org/a",
            "http://example.org/a",
            "spiffe://example.org/a/",
            "spiffe://example.org/%41",
            "spiffe://example.org/a/../b",
        ] {
            let e = err(&format!(
                "{MINIMAL}[[entries]]\nspiffe_id = \"{bad}\"\nselectors = [\"unix:uid:1\"]\n"
            ));
            assert!(
                e.contains("t.toml:5") && e.contains("entries[0].spiffe_id"),
                "{bad}: {e}"
            );
        }
        let e = err(&format!(
            "{MINIMAL}[[entries]]\nspiffe_id = \"spiffe://other.org/a\"\nselectors = [\"unix:uid:1\"]\n"
        ));
        assert!(e.contains("trust domain"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        assert!(err(&MINIMAL.replace("example.org", "EXAMPLE.org")).contains("trust_domain"));
        assert!(err(&format!("{MINIMAL}[svid]\nx509_ttl = \"soon\"\n")).contains("svid.x509_ttl"));
        assert!(err(&format!("{MINIMAL}[svid]\nx509_ttl = \"1s\"\n")).contains("at least"));
        assert!(err(&format!("{MINIMAL}[[entries]]\nspiffe_id = \"spiffe://example.org/a\"\nselectors = [\"uid\"]\n")).contains("entries[0].selectors"));
        assert!(
            err(&format!(
                "{MINIMAL}[[entries]]\nspiffe_id = \"spiffe://example.org/a\"\nselectors = []\n"
            ))
            .contains("at least one selector")
        );
        assert!(
            err(&format!("{MINIMAL}[admin]\nlisten = \"localhost\"\n")).contains("admin.listen")
        );
        assert!(
            err(&format!(
                "{MINIMAL}[admin]\nsocket_path = \"/tmp/x/admin.sock\"\n"
            ))
            .contains("admin socket")
        );
        // socket_path and data_dir have defaults (an authority needs neither).
        let bare = Config::parse("trust_domain = \"example.org\"\n", "t.toml").unwrap();
        assert_eq!(
            bare.socket_path,
            Path::new("/run/tessera/sockets/agent.sock")
        );
        assert_eq!(bare.data_dir, Path::new("/var/lib/tessera"));
        assert!(err("socket_path = \"/tmp/a.sock\"\n").contains("trust_domain"));
    }

    #[test]
    fn short_ttls_warn() {
        let c = Config::parse(&format!("{MINIMAL}[svid]\nx509_ttl = \"10s\"\n"), "t.toml").unwrap();
        assert_eq!(c.x509_ttl, Duration::from_secs(10));
        assert_eq!(c.warnings.len(), 1);
    }

    #[test]
    fn k8s_attestor_table() {
        let c = Config::parse(
            &format!(
                "{MINIMAL}[attestor.k8s]\nkubelet_host = \"10.0.0.5\"\npoll_interval = \"250ms\"\n"
            ),
            "t.toml",
        )
        .unwrap();
        let k = c.k8s_attestor.unwrap();
        assert_eq!(
            (k.kubelet.host.as_str(), k.kubelet.port, k.kubelet.read_only),
            ("10.0.0.5", 10250, false)
        );
        assert_eq!(k.poll_interval, Duration::from_millis(250));
        assert!(
            k.kubelet
                .token_path
                .unwrap()
                .ends_with("serviceaccount/token")
        );
        let c = Config::parse(
            &format!("{MINIMAL}[attestor.k8s]\nread_only_port = 10255\n"),
            "t.toml",
        )
        .unwrap();
        let k = c.k8s_attestor.unwrap();
        assert_eq!((k.kubelet.port, k.kubelet.read_only), (10255, true));
        let c = Config::parse(
            &format!("{MINIMAL}[attestor.k8s]\nenabled = false\n"),
            "t.toml",
        )
        .unwrap();
        assert!(c.k8s_attestor.is_none());
        let e = err(&format!(
            "{MINIMAL}[attestor.k8s]\nkubelet_host_env = \"TESSERA_TEST_SURELY_UNSET\"\n"
        ));
        assert!(
            e.contains("attestor.k8s.kubelet_host_env") && e.contains("TESSERA_TEST_SURELY_UNSET"),
            "{e}"
        );
        assert!(
            err(&format!("{MINIMAL}[attestor.k8s]\nkubelet_prot = 1\n")).contains("kubelet_prot")
        );
    }

    #[test]
    fn dev_config_parses() {
        let c = Config::dev(Path::new("/tmp/dev")).unwrap();
        assert_eq!(c.socket_path, Path::new("/tmp/dev/agent.sock"));
        assert_eq!(c.entries.len(), 1);
        assert_eq!(sanitize_segment("a@b c"), "a_b_c");
        assert_eq!(sanitize_segment(".."), "_..");
    }

    #[test]
    fn example_config_file_parses() {
        let text = include_str!("../../examples/tessera.toml");
        let c = Config::parse(text, "examples/tessera.toml").unwrap();
        assert!(c.entries.len() >= 2);
        assert_eq!(c.federation.len(), 1);
        assert!(c.bundle_endpoint.is_some());
        let x = c.exchange.expect("the example enables the exchange");
        assert_eq!(x.max_ttl, Duration::from_secs(900));
        assert_eq!(x.issuer, "spiffe://example.org/tessera");
        assert_eq!(c.sds, Some(crate::sds::SdsConfig::default()));
    }

    #[test]
    fn https_table_defaults_and_errors() {
        let c = Config::parse(
            &format!("{MINIMAL}[https]\nlisten = \"127.0.0.1:0\"\n"),
            "t.toml",
        )
        .unwrap();
        let h = c.https.unwrap();
        assert_eq!(h.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!((h.issuer, h.files), (None, None));
        assert!(Config::parse(MINIMAL, "t.toml").unwrap().https.is_none());
        let bad = |body: &str| err(&format!("{MINIMAL}[https]\n{body}"));
        assert!(bad("listen = \"localhost\"\n").contains("https.listen"));
        for issuer in ["http://x", "https://x/", "https://x?a=b", "tessera"] {
            let e = bad(&format!(
                "listen = \"127.0.0.1:0\"\nissuer = \"{issuer}\"\n"
            ));
            assert!(e.contains("https.issuer"), "{issuer}: {e}");
        }
        assert!(
            bad("listen = \"127.0.0.1:0\"\ncert_file = \"/c.pem\"\n").contains("https.key_file")
        );
        assert!(bad("listen = \"127.0.0.1:0\"\nport = 1\n").contains("port"));
        // The embedded dev config turns the face on.
        let dev = Config::dev(std::path::Path::new("/tmp/dev")).unwrap();
        assert_eq!(dev.https.map(|h| h.listen.port()), Some(0));
    }

    #[test]
    fn sds_is_on_by_default_with_spires_names() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.sds, Some(crate::sds::SdsConfig::default()));
        let off = Config::parse(&format!("{MINIMAL}[sds]\nenabled = false\n"), "t.toml").unwrap();
        assert!(off.sds.is_none());
        let c = Config::parse(
            &format!(
                "{MINIMAL}[sds]\ndefault_svid_name = \"cert\"\ndisable_spiffe_cert_validation = true\n"
            ),
            "t.toml",
        )
        .unwrap();
        let sds = c.sds.unwrap();
        assert_eq!(sds.default_svid_name, "cert");
        assert_eq!(sds.default_bundle_name, "ROOTCA");
        assert!(sds.disable_spiffe_cert_validation);
        // Errors name the key and its line.
        let e = Config::parse(
            &format!("{MINIMAL}[sds]\n\ndefault_all_bundles_name = \"ROOTCA\"\n"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sds.default_all_bundles_name"), "{e}");
        let line = MINIMAL.lines().count() + 3;
        assert!(e.contains(&format!(":{line}")), "{e}");
        let e = Config::parse(&format!("{MINIMAL}[sds]\nport = 1\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn exchange_table_defaults_and_errors() {
        let c = Config::parse(&format!("{MINIMAL}[exchange]\n"), "t.toml").unwrap();
        let x = c.exchange.unwrap();
        assert_eq!(x.socket_path, Path::new("/tmp/x/exchange.sock"));
        assert_eq!(x.audit_log, Path::new("/tmp/x/audit.jsonl"));
        assert_eq!(x.issuer, "spiffe://example.org/tessera");
        assert_eq!(
            (x.max_ttl, x.default_ttl),
            (Duration::from_secs(900), Duration::from_secs(300))
        );
        assert_eq!(x.max_delegation_depth, 3);
        assert_eq!(x.denial_records_per_minute, 600);
        assert_eq!(x.audit_commit_delay, Duration::ZERO, "no wait unless asked");
        assert!(
            x.audit_anchor.ends_with("audit.jsonl.anchor"),
            "beside the log by default"
        );
        assert!(x.policy_dir.is_none());
        let off =
            Config::parse(&format!("{MINIMAL}[exchange]\nenabled = false\n"), "t.toml").unwrap();
        assert!(off.exchange.is_none());
        // default_ttl never exceeds max_ttl.
        let c = Config::parse(
            &format!("{MINIMAL}[exchange]\nmax_ttl = \"2m\"\n"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.exchange.unwrap().default_ttl, Duration::from_secs(120));

        let err = |body: &str| {
            Config::parse(&format!("{MINIMAL}[exchange]\n{body}"), "t.toml")
                .unwrap_err()
                .to_string()
        };
        assert!(err("max_ttl = \"soon\"\n").contains("exchange.max_ttl"));
        assert!(err("max_delegation_depth = 99\n").contains("exchange.max_delegation_depth"));
        assert!(
            err("denial_records_per_minute = 0\n").contains("exchange.denial_records_per_minute")
        );
        assert!(err("socket_path = \"/tmp/x/agent.sock\"\n").contains("exchange.socket_path"));
        assert!(err("approval_timeout = \"0s\"\n").contains("exchange.approval_timeout"));
        assert!(err("audit_commit_delay = \"1s\"\n").contains("exchange.audit_commit_delay"));
        assert!(err("audit_commit_delay = \"-1\"\n").contains("exchange.audit_commit_delay"));
        let c = Config::parse(
            &format!("{MINIMAL}[exchange]\naudit_commit_delay = \"250us\"\n"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            c.exchange.unwrap().audit_commit_delay,
            Duration::from_micros(250)
        );
        assert!(
            err("polcy_dir = \"/x\"\n").contains("polcy_dir"),
            "unknown keys are named"
        );
    }
}
