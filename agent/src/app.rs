//! Wiring of a running agent: sockets, signer, cache and rotation worker,
//! the gRPC server, the exchange and operator sockets, the admin server,
//! reload and graceful shutdown. Everything is built here from the parsed
//! config; nothing imports this module but the CLI.

pub mod authority;

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use tessera_attestor::{ProcRoot, UnixAttestor, WorkloadAttestor};
use tessera_workload_api as pb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditLog;
use crate::caller::Callers;
use crate::clock::Clock;
use crate::config::Config;
use crate::entries::EntrySet;
use crate::exchange::Exchange;
use crate::exchange::policy::PolicyStore;
use crate::identity::{AuthoritySettings, LocalAuthority, Signer, SvidCache, TrustStore};
use crate::metrics::{MethodLabels, Metrics};
use crate::revocation::RevocationStore;
use crate::sds::{Sds, SdsRoutes, SdsState};
use crate::transport::http::Limits;
use crate::transport::{Acceptor, ConnectionCaps};
use crate::workload_api::{ApiState, WorkloadApi, WorkloadApiRoutes};

/// A started agent. Dropping it does not stop it; call [`RunningAgent::shutdown`].
pub struct RunningAgent {
    pub socket_path: PathBuf,
    /// The token exchange, when configured.
    pub exchange: Option<Arc<Exchange>>,
    /// Sockets to remove on stop besides the Workload API socket.
    extra_sockets: Vec<PathBuf>,
    pub admin_addr: Option<SocketAddr>,
    /// The HTTPS face's issuer URL and address, when `[https]` is configured.
    pub https_issuer: Option<String>,
    pub https_addr: Option<SocketAddr>,
    /// The bundle endpoint, when `[bundle_endpoint]` is configured.
    pub bundle_endpoint: Option<crate::federation::BundleEndpoint>,
    /// Foreign bundle refresh (single-node mode; in upstream mode the fleet
    /// authority fetches).
    pub federation: Option<Arc<crate::federation::Federation>>,
    pub callers: Arc<Callers>,
    pub cache: Arc<SvidCache>,
    entries: Arc<crate::entries::EntrySources>,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
    grace: std::time::Duration,
}

impl RunningAgent {
    /// Replaces the registration entries; open streams re-evaluate at once.
    pub fn set_entries(&self, entries: EntrySet) {
        self.entries.set_local(&entries);
    }

    /// Begins graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops the agent: every stream ends (Unavailable), the server drains
    /// within the grace period, the socket file is removed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits for the server to end (after [`Self::shutdown`]).
    pub async fn wait(self) -> anyhow::Result<()> {
        let result = match tokio::time::timeout(self.grace, self.server).await {
            Ok(joined) => joined.context("server task panicked")?,
            Err(_) => {
                tracing::warn!("connections did not drain within the grace period; closing");
                Ok(())
            }
        };
        let _ = std::fs::remove_file(&self.socket_path);
        for path in &self.extra_sockets {
            let _ = std::fs::remove_file(path);
        }
        result
    }
}

/// Descriptors kept free of connections: files, the kubelet, the fleet
/// authority, the admin listener.
const RESERVED_DESCRIPTORS: u64 = 128;

/// The connection caps of each socket. Raises the soft RLIMIT_NOFILE to the
/// hard limit (the soft default of 1,024 would cap the agent far below
/// `limits.max_connections`), then lowers the cap to what the descriptors
/// hold: each connection costs its socket and the caller's pidfd, and a
/// connection the agent cannot accept waits in the listen queue, unserved,
/// instead of being refused. Of the cap, one uid and one process may hold
/// only their share (`limits.max_connections_per_uid`, `_per_process`).
fn connection_caps(config: &Config) -> ConnectionCaps {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum)
        && soft < hard
    {
        let raised = Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, soft, hard, "could not raise RLIMIT_NOFILE");
        }
    }
    let mut total = config.max_connections;
    if let Some(soft) = getrlimit(Resource::Nofile).current {
        let sockets = 1 + u64::from(config.exchange.is_some());
        let fit = (soft.saturating_sub(RESERVED_DESCRIPTORS) / (2 * sockets)).max(1);
        if (total as u64) > fit {
            tracing::warn!(
                rlimit_nofile = soft,
                max_connections = config.max_connections,
                per_socket = fit,
                "RLIMIT_NOFILE cannot hold limits.max_connections on every socket; holding fewer, so callers past them are refused at once instead of waiting unserved (raise LimitNOFILE= or ulimit -n for more)"
            );
            total = fit as usize;
        }
    }
    ConnectionCaps::new(
        total,
        config.max_connections_per_uid,
        config.max_connections_per_process,
    )
}

/// Upstream mode: every caller on this node gets `tessera:node:<node name>`,
/// the one fact about it the fleet authority can check without Kubernetes.
struct NodeAttestor(String);

impl tessera_attestor::Attestor for NodeAttestor {
    fn name(&self) -> &'static str {
        "tessera"
    }

    fn attest<'a>(
        &'a self,
        _: &'a tessera_attestor::ProcessRef,
        _: &'a ProcRoot,
    ) -> tessera_attestor::AttestFuture<'a> {
        let s = tessera_attestor::Selector::new(crate::fleet::NODE_SELECTOR, &self.0);
        Box::pin(async move { Ok(vec![s]) })
    }
}

/// Counts connections refused at a socket's cap, labelled by socket.
fn refused_counter(metrics: &Metrics, method: &'static str) -> impl Fn() + Send + Sync + 'static {
    let refused = metrics.connections_refused.clone();
    move || {
        refused.get_or_create(&MethodLabels { method }).inc();
    }
}

/// Starts the agent described by `config` and returns once its sockets are listening.
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<RunningAgent> {
    crate::fsutil::create_private_dir(&config.data_dir).context("data_dir")?;
    let caps = connection_caps(&config);
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let mut attestors: Vec<Arc<dyn tessera_attestor::Attestor>> =
        vec![Arc::new(UnixAttestor::new(config.unix_attestor.clone()))];
    // Bound first: with port 0 the port names the issuer, which JWT-SVIDs
    // carry from the first one on.
    let https = match &config.https {
        None => None,
        Some(h) => Some(crate::https::bind(h).await?),
    };
    let mut local_authority = None;
    let mut upstream = None;
    let (signer, trust): (Arc<dyn Signer>, Arc<TrustStore>) = match &config.upstream {
        None => {
            let authority = LocalAuthority::load(
                AuthoritySettings {
                    trust_domain: config.trust_domain.clone(),
                    ca_ttl: config.authority.ca_ttl,
                    jwt_key_ttl: config.authority.jwt_key_ttl,
                    jwt_key_type: config.authority.jwt_key_type,
                    state_dir: config.authority.persist.then(|| config.data_dir.clone()),
                    ca_files: config.authority.ca_files.clone(),
                },
                clock.clone(),
            )
            .context("loading the signing authority")?;
            if let Some(bound) = &https {
                authority.set_jwt_issuer(bound.issuer.clone());
            }
            let trust = authority.trust_store().clone();
            local_authority = Some(authority.clone());
            (authority, trust)
        }
        Some(up) => {
            let client = crate::fleet::client::Upstream::connect(
                up.clone(),
                config.trust_domain.clone(),
                clock.clone(),
                metrics.clone(),
                &shutdown,
            )
            .await?;
            tracing::info!(
                node = %client.node_id(),
                replicas = ?up.addresses,
                "upstream mode: the fleet authority signs; workload keys stay on this node"
            );
            attestors.push(Arc::new(NodeAttestor(client.node_name())));
            tokio::spawn(client.clone().run(shutdown.clone()));
            let trust = client.trust_store().clone();
            upstream = Some(client.clone());
            (client, trust)
        }
    };

    // Foreign bundles kept from the last run (or bootstrap bundles) are in
    // the trust store before the first workload connects.
    let federation = local_authority.as_ref().map(|_| {
        let federation = crate::federation::Federation::new(
            trust.clone(),
            Some(Arc::new(crate::federation::state::BundleState::new(
                &config.data_dir,
            ))),
            metrics.federation.clone(),
            clock.clone(),
            crate::federation::RefreshBounds::default(),
            shutdown.clone(),
        );
        federation.update(config.federation.clone());
        federation
    });
    let bundle_endpoint = match (&config.bundle_endpoint, &local_authority) {
        (Some(b), Some(authority)) => Some(
            crate::federation::endpoint::serve(
                b,
                trust.clone(),
                authority.clone(),
                clock.clone(),
                shutdown.clone(),
            )
            .await?,
        ),
        _ => None,
    };

    let listener = bind_socket(&config.socket_path, 0o777)?;
    let cache = SvidCache::new(signer, trust.clone(), clock.clone(), metrics.clone());
    tokio::spawn(cache.clone().run_rotation(shutdown.clone()));

    if let Some(k8s) = &config.k8s_attestor {
        tracing::info!(kubelet = %format!("{}:{}", k8s.kubelet.host, k8s.kubelet.port), read_only = k8s.kubelet.read_only, "Kubernetes attestation enabled");
        attestors.push(Arc::new(tessera_attestor::K8sAttestor::new(k8s.clone())));
    }
    let proc_root = ProcRoot::new(&config.proc_root);
    let attestor = WorkloadAttestor::new(proc_root.clone(), attestors);
    let entries_tx = Arc::new(crate::entries::EntrySources::new(&config.entries));
    let entries_rx = entries_tx.subscribe();
    if let Some(up) = &upstream {
        // The fleet's live entries (custom resources) join the config
        // file's; a workload that connects right after start finds them.
        let mut loaded =
            crate::fleet::registration::follow(up.clone(), entries_tx.clone(), shutdown.clone());
        if tokio::time::timeout(FLEET_ENTRIES_WAIT, loaded.wait_for(|l| *l))
            .await
            .is_err()
        {
            tracing::warn!(waited = ?FLEET_ENTRIES_WAIT, "the fleet's live registration entries have not arrived yet; serving the config file's meanwhile");
        }
    }
    let callers = Arc::new(Callers {
        attestor,
        entries: entries_rx,
        metrics: metrics.clone(),
        ready: AtomicBool::new(false),
        shutdown: shutdown.clone(),
        limiter: crate::rate_limit::RateLimiter::new(config.caller_budget),
    });
    let limits = http_limits(&config);

    let mut extra_sockets = Vec::new();
    let exchange_config = config.exchange.clone().map(|mut x| {
        if let Some(bound) = &https
            && x.issuer_follows_https
        {
            x.issuer = bound.issuer.clone();
        }
        x
    });
    let exchange = match &exchange_config {
        None => None,
        Some(x) => {
            let exchange = Arc::new(build_exchange(
                x,
                &config.data_dir,
                cache.clone(),
                clock.clone(),
                metrics.clone(),
            )?);
            let acceptor = Acceptor::new(
                bind_socket(&x.socket_path, 0o777)?,
                proc_root.clone(),
                caps,
                refused_counter(&metrics, "exchange"),
            )?;
            extra_sockets.push(x.socket_path.clone());
            tracing::info!(
                socket = %x.socket_path.display(),
                issuer = %x.issuer,
                policies = exchange.policy.policy_count(),
                "token exchange serving (/token /revoke /introspect /jwks)"
            );
            let (ex, c, sd) = (exchange.clone(), callers.clone(), shutdown.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::exchange::server::serve(acceptor, ex, c, limits, sd).await {
                    tracing::error!(error = %e, "token exchange server failed");
                }
            });
            tokio::spawn(exchange.clone().run_maintenance(shutdown.clone()));
            if let Some(up) = &upstream {
                follow_fleet_revocations(up, &exchange, &metrics, &shutdown).await;
                crate::fleet::approvals::follow(
                    up.clone(),
                    Arc::new(ExchangeApprovals {
                        exchange: exchange.clone(),
                        clock: clock.clone(),
                    }),
                    shutdown.clone(),
                );
            }
            Some(exchange)
        }
    };
    let https_addr = https.as_ref().map(|b| b.addr);
    let https_issuer = match (&config.https, https) {
        (Some(h), Some(bound)) => {
            let issuer = bound.issuer.clone();
            crate::https::serve(
                h,
                bound,
                local_authority,
                trust,
                exchange.clone().map(|x| crate::https::TokenService {
                    routes: Some(crate::exchange::remote::router(
                        x.clone(),
                        config.caller_budget,
                    )),
                    keys: Arc::new(move || x.jwks()),
                }),
                clock.clone(),
                shutdown.clone(),
            )?;
            Some(issuer)
        }
        _ => None,
    };
    if let Some(path) = &config.admin_socket_path {
        match &exchange {
            None => tracing::warn!(
                socket = %path.display(),
                "admin.socket_path is set but [exchange] is not; the operator socket serves approvals only, so it is not opened"
            ),
            Some(ex) => {
                // Operators are identified by uid only, and few connect at once.
                let acceptor = Acceptor::new(
                    bind_operator_socket(path)?,
                    proc_root.clone(),
                    ConnectionCaps::new(OPERATOR_CONNECTIONS, None, Some(OPERATOR_CONNECTIONS)),
                    refused_counter(&metrics, "operator"),
                )?;
                extra_sockets.push(path.clone());
                tracing::info!(socket = %path.display(), "operator socket listening (approvals)");
                let (ex, c, sd) = (ex.clone(), clock.clone(), shutdown.clone());
                tokio::spawn(async move {
                    if let Err(e) =
                        crate::exchange::operator::serve(acceptor, ex, c, limits, sd).await
                    {
                        tracing::error!(error = %e, "operator socket server failed");
                    }
                });
            }
        }
    }

    let admin_addr = match config.admin_listen {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin listener {addr}"))?;
            let local = listener.local_addr()?;
            tracing::info!(address = %local, "admin HTTP listening (/healthz /readyz /metrics)");
            let (callers, cache, clock, shutdown) = (
                callers.clone(),
                cache.clone(),
                clock.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                if let Err(e) = crate::admin::serve(listener, callers, cache, clock, shutdown).await
                {
                    tracing::error!(error = %e, "admin server failed");
                }
            });
            Some(local)
        }
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::server::SpiffeWorkloadApiServer<WorkloadApi>>()
        .await;
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET);
    // Envoy SDS on the same socket (as SPIRE serves it), unless `[sds] enabled = false`.
    let sds = match &config.sds {
        Some(sds_config) => {
            health
                .set_service_status(pb::sds::SERVICE_NAME, tonic_health::ServingStatus::Serving)
                .await;
            reflection =
                reflection.register_encoded_file_descriptor_set(pb::sds::FILE_DESCRIPTOR_SET);
            Some(SdsRoutes::new(
                Sds::new(Arc::new(SdsState {
                    callers: callers.clone(),
                    cache: cache.clone(),
                    config: sds_config.clone(),
                })),
                crate::sds::route::MAX_REQUEST,
            ))
        }
        None => None,
    };
    let reflection = reflection
        .build_v1()
        .context("building the reflection service")?;
    // Workload API requests are a few hundred bytes; anything past 64 KiB is
    // refused without buffering more than that.
    let api = WorkloadApiRoutes::new(
        WorkloadApi::new(ApiState::new(callers.clone(), cache.clone())),
        64 * 1024,
    );
    let incoming = crate::transport::grpc::incoming(
        Acceptor::new(
            listener,
            proc_root,
            caps,
            refused_counter(&metrics, "workload_api"),
        )?,
        config.idle_timeout,
    );
    // Ready before the server runs: connections already waiting in the
    // listen queue are answered the moment it starts, and must not be told
    // the agent is not ready (everything they need is built by now).
    callers.ready.store(true, Ordering::Release);
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            // Streams per connection; clients multiplex a handful at most.
            .max_concurrent_streams(Some(1024))
            // Streams count as activity until they end, so a connection is
            // closed only after the idle timeout with none open.
            .layer(crate::transport::idle::CountStreams)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(api)
            .add_optional_service(sds)
            .serve_with_incoming_shutdown(incoming, server_shutdown.cancelled_owned())
            .await
            .context("Workload API server failed")
    });
    tracing::info!(
        socket = %config.socket_path.display(),
        trust_domain = config.trust_domain.as_str(),
        entries = config.entries.len(),
        sds = config.sds.is_some(),
        "Workload API serving"
    );
    Ok(RunningAgent {
        socket_path: config.socket_path.clone(),
        exchange,
        extra_sockets,
        admin_addr,
        https_issuer,
        https_addr,
        bundle_endpoint,
        federation,
        callers,
        cache,
        entries: entries_tx,
        shutdown,
        server,
        grace: config.shutdown_grace,
    })
}

/// Connections the operator socket holds at once.
const OPERATOR_CONNECTIONS: usize = 64;

/// Runs until SIGTERM/SIGINT. SIGHUP reloads the entries from `config_path`.
/// Returns on SIGTERM or SIGINT.
/// The process's stop and reload signals, listened to from before start-up
/// until exit. Created once: a signal that arrives while no listener exists
/// is lost (tokio keeps its handler installed), so handing over from a
/// start-up listener to a run-time one dropped a SIGTERM sent right after
/// start, and the agent ran on.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves at SIGTERM or SIGINT.
    pub async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Resolves at SIGTERM or SIGINT (for commands without a reload).
pub async fn wait_for_signal() {
    match Signals::new() {
        Ok(mut s) => s.stop().await,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Serves until SIGTERM or SIGINT; SIGHUP reloads the entries (and the
/// policies) from `config_path`.
pub async fn run_until_signalled(
    agent: RunningAgent,
    config_path: Option<PathBuf>,
    mut signals: Signals,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.hup.recv() => match &config_path {
                None => tracing::info!("SIGHUP ignored: the embedded config has nothing to reload"),
                Some(path) => match Config::load(path) {
                    Ok(c) => {
                        tracing::info!(entries = c.entries.len(), federation = c.federation.len(), "reloaded entries and federation relationships from {}", path.display());
                        // Relationships first: a new entry's federates_with
                        // then finds its domain's bundle on the way.
                        if let Some(f) = &agent.federation {
                            f.update(c.federation);
                        }
                        agent.set_entries(c.entries);
                        if let Some(ex) = agent.exchange.clone() {
                            let _ = tokio::task::spawn_blocking(move || ex.reload_policies()).await;
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "reload rejected; keeping the current entries"),
                },
            },
        }
    }
    tracing::info!("shutting down");
    agent.stop().await
}

fn http_limits(config: &Config) -> Limits {
    Limits {
        header_read_timeout: config.http_header_timeout,
        request_timeout: config.http_request_timeout,
        shutdown_grace: config.shutdown_grace,
        idle_timeout: config.idle_timeout,
    }
}

/// How long start-up waits for the fleet's live registration entries.
const FLEET_ENTRIES_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long start-up waits for the fleet's revocations before serving
/// anyway (not ready, and saying why, until they arrive).
const FLEET_REVOCATIONS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Upstream mode with an exchange: revocations made here go to the fleet and
/// the fleet's come here. Waits (bounded) until every revocation the fleet's
/// store holds is in force on this node, so a restarted node never answers
/// `active` for a token revoked elsewhere.
async fn follow_fleet_revocations(
    up: &Arc<crate::fleet::client::Upstream>,
    exchange: &Arc<Exchange>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) {
    let mut synced = crate::fleet::follow::start(
        up.clone(),
        exchange.revocation_store().clone(),
        metrics.clone(),
        shutdown.clone(),
    );
    let loaded = tokio::time::timeout(FLEET_REVOCATIONS_WAIT, synced.wait_for(|s| *s)).await;
    if loaded.is_err() {
        tracing::warn!(
            waited = ?FLEET_REVOCATIONS_WAIT,
            "the fleet's revocations are not loaded yet; serving, but not ready until they are"
        );
    }
}

/// The exchange's approvals as the fleet sees them: the bridge between the
/// two services (which do not import each other).
struct ExchangeApprovals {
    exchange: Arc<Exchange>,
    clock: Arc<dyn Clock>,
}

impl crate::fleet::approvals::LocalApprovals for ExchangeApprovals {
    fn pending(&self) -> Vec<crate::fleet::wire::PendingApproval> {
        self.exchange
            .approvals
            .list(self.clock.now())
            .into_iter()
            .filter(|a| a.state == crate::exchange::approvals::ApprovalState::Pending)
            .map(|a| crate::fleet::wire::PendingApproval {
                id: a.id,
                deadline: a.deadline,
                request: serde_json::to_value(&a.request).unwrap_or_default(),
            })
            .collect()
    }

    fn decide(
        &self,
        d: crate::fleet::wire::ApprovalDecision,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let now = self.clock.now();
            if let Err(e) = crate::exchange::operator::decide_and_audit(
                &self.exchange,
                &d.id,
                d.approve,
                &d.by,
                now,
            )
            .await
            {
                // Decided already (here, or a repeat from another replica)
                // or expired: nothing more to do, nothing audited twice.
                tracing::debug!(approval_id = %d.id, error = %e, "fleet decision not applied");
            }
        })
    }
}

/// Opens the policy store, revocation state and audit log of the exchange.
fn build_exchange(
    x: &crate::exchange::ExchangeConfig,
    data_dir: &Path,
    cache: Arc<SvidCache>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Exchange> {
    let policy = match (PolicyStore::load(x.policy_dir.as_deref()), &x.policy_dir) {
        (Ok(p), _) => p,
        // Identity service must not depend on a policy file being valid:
        // start denying every exchange and pick up the fix on reload.
        (Err(e), Some(dir)) => {
            tracing::error!(error = %e, "exchange policies are invalid; every exchange is denied until they are fixed (reloaded automatically)");
            PolicyStore::deny_all_until_valid(dir)?
        }
        (Err(e), None) => return Err(e).context("loading exchange policies"),
    };
    if x.policy_dir.is_none() {
        tracing::warn!("exchange.policy_dir is not set: every token exchange will be denied");
    }
    let revocations = RevocationStore::open(Some(&data_dir.join("revocations.jsonl")), clock.now())
        .context("opening revocation state")?;
    if let Some(dir) = x.audit_log.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the audit log directory {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if let Some(dir) = x
        .audit_anchor
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the audit anchor directory {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let (audit, report) = AuditLog::open_anchored(
        &x.audit_log,
        &x.audit_anchor,
        clock.clone(),
        x.audit_commit_delay,
    )
    .with_context(|| format!("opening the audit log {}", x.audit_log.display()))?;
    tracing::info!(path = %x.audit_log.display(), records = report.records, "audit log open");
    Ok(Exchange::new(
        x.clone(),
        cache,
        Arc::new(policy),
        Arc::new(revocations),
        audit,
        clock,
        metrics,
    ))
}

/// Binds the operator socket: mode 0600 in a 0700 directory it creates if
/// missing (requests are also checked by uid, see `operator`).
fn bind_operator_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating operator socket directory {}", dir.display()))?;
        }
        // The directory is the operator socket's own (a hostPath the kubelet
        // may have created 0755): tighten it if it is ours, else say so.
        let meta = std::fs::metadata(dir)?;
        if meta.uid() == nix::unistd::geteuid().as_raw() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        } else if meta.mode() & 0o022 != 0 {
            tracing::warn!(dir = %dir.display(), "the operator socket directory is writable by others and not owned by the agent; the socket itself is 0600 and checks callers' uid");
        }
    }
    bind_socket(path, 0o600)
}

/// Binds a Unix socket with `mode`. A stale socket file left by a dead agent
/// is replaced; a live agent on the same path makes this one refuse to start;
/// any other kind of file is never deleted.
fn bind_socket(path: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    crate::fsutil::check_socket_dir(dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another agent is already serving on {}; refusing to start",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
            tracing::info!(socket = %path.display(), "replaced a stale socket file");
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    // Workload sockets (0777): anyone may connect; callers are identified by
    // kernel credentials, and a caller without an entry gets nothing.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}
