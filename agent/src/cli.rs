//! The `tessera` command line. Exit code 0 on success; otherwise a one-line
//! error on stderr and a non-zero code.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tessera_workload_api as pb;

use crate::certs::{pem_encode, split_der_certs};
use crate::client;
use crate::config::Config;

#[derive(Parser)]
#[command(name = "tessera", version, about = "SPIFFE workload identity agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon.
    Run(RunArgs),
    /// Talk to a running agent over the Workload API.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Load-test the agent over its real socket (starts its own agent unless --socket).
    Bench(BenchArgs),
    /// Exit 0 if the agent answers on its socket.
    Healthcheck {
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Per-task tokens: exchange this workload's SVID, revoke, introspect.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Decide exchanges that wait for approval (operator socket; root or the agent's user).
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The multi-node signing service for a trust domain (see docs/architecture.md).
    #[command(subcommand)]
    Authority(AuthorityCommand),
}

#[derive(Subcommand)]
enum AuthorityCommand {
    /// Run the authority (`[server]` table of the config file).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Create a key directory: ca.crt, ca.key, jwt.key, access.key (0600).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        trust_domain: String,
        /// CA lifetime.
        #[arg(long, default_value = "1y")]
        ca_ttl: String,
    },
    /// Add a successor CA (ca-<time>.crt/.key) to a key directory; replicas
    /// publish it at once and sign with it after `ca_publish_lead`.
    RotateCa {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        trust_domain: String,
        #[arg(long, default_value = "1y")]
        ca_ttl: String,
    },
    /// Create a single-use join token for a machine outside Kubernetes; prints it.
    JoinToken {
        /// The authority's `server.join_token_dir`.
        #[arg(long)]
        dir: PathBuf,
        /// The node's name (its ID becomes spiffe://<td>/tessera/node/join/<name>).
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "10m")]
        ttl: String,
    },
}

/// Where the exchange socket is: `--exchange-socket`, else `exchange.sock`
/// beside the Workload API socket (`--socket` / `SPIFFE_ENDPOINT_SOCKET`).
#[derive(Args, Clone)]
struct ExchangeSocketArgs {
    /// Workload API socket (default: SPIFFE_ENDPOINT_SOCKET).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Exchange socket (default: exchange.sock next to the Workload API socket).
    #[arg(long)]
    exchange_socket: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// RFC 8693 exchange: fetch this workload's JWT-SVID and trade it for a
    /// task token. Prints the JSON response.
    Exchange(ExchangeArgs),
    /// End a task (revokes all its tokens) or revoke one token.
    Revoke {
        #[command(flatten)]
        sockets: ExchangeSocketArgs,
        #[arg(long, required_unless_present = "token", conflicts_with = "token")]
        task: Option<String>,
        #[arg(long)]
        token: Option<String>,
    },
    /// RFC 7662 introspection of a token; prints the JSON result.
    Introspect {
        #[command(flatten)]
        sockets: ExchangeSocketArgs,
        token: String,
    },
}

#[derive(Args)]
struct ExchangeArgs {
    #[command(flatten)]
    sockets: ExchangeSocketArgs,
    /// Logical audience of the token (or use --resource).
    #[arg(
        long,
        required_unless_present = "resource",
        conflicts_with = "resource"
    )]
    audience: Option<String>,
    /// RFC 8707 resource URI of the token's target (e.g. an MCP server).
    #[arg(long)]
    resource: Option<String>,
    /// Scopes the task needs (repeat or space-separate).
    #[arg(long, required = true, num_args = 1..)]
    scope: Vec<String>,
    /// Task id; ending the task revokes every token issued for it.
    #[arg(long)]
    task: Option<String>,
    /// Requested lifetime (e.g. 60s); policy and config may shorten it.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Delegate: a token issued to another workload, to act on its behalf.
    #[arg(long)]
    actor_token: Option<String>,
    /// Accept the permitted subset of the scopes instead of failing.
    #[arg(long)]
    subset: bool,
    /// Poll a pending approval.
    #[arg(long)]
    approval_id: Option<String>,
    /// When approval is pending, keep polling until decided (at most this long).
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
}

#[derive(Args)]
struct AdminSocketArgs {
    /// Operator socket (default: admin.socket_path from --config, else /run/tessera/admin.sock).
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Read admin.socket_path from this agent config.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ApprovalsCommand {
    /// Pending and recently decided approvals.
    List {
        #[command(flatten)]
        admin: AdminSocketArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending exchange.
    Approve {
        #[command(flatten)]
        admin: AdminSocketArgs,
        id: String,
    },
    /// Deny a pending exchange.
    Deny {
        #[command(flatten)]
        admin: AdminSocketArgs,
        id: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain; report the first tampered, missing or torn record.
    Verify { file: PathBuf },
}

#[derive(Args)]
struct RunArgs {
    /// Config file (TOML).
    #[arg(long, conflicts_with = "dev", required_unless_present = "dev")]
    config: Option<PathBuf>,
    /// Run with the embedded development config (state under ./.tessera/).
    #[arg(long)]
    dev: bool,
    /// Log format; overrides `[log] format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Args)]
struct BenchArgs {
    /// Scenarios to run (default: all): x509-first, x509-cold, jwt-fetch,
    /// jwt-validate, fanout, exchange, idle-memory.
    scenarios: Vec<String>,
    /// One JSON object per line per scenario instead of a table.
    #[arg(long)]
    json: bool,
    /// Concurrent clients (x509-first, jwt-*).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Open streams (fanout, idle-memory).
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Distinct identities (x509-cold: issued per round; idle-memory: cached).
    #[arg(long, default_value_t = 100)]
    identities: usize,
    /// Cedar policies loaded (exchange).
    #[arg(long, default_value_t = 1000)]
    policies: usize,
    /// How long each closed-loop scenario runs.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Target a running agent instead of starting one.
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum ApiCommand {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate through the agent.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Stream X.509 SVID updates as they rotate.
    Watch {
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum FetchCommand {
    /// Fetch X509-SVIDs and print ID, expiry and chain summary.
    X509 {
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Fetch and print JWT-SVIDs.
    Jwt {
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long, required = true)]
        audience: Vec<String>,
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

#[derive(Subcommand)]
enum ValidateCommand {
    /// Validate a JWT-SVID for an audience.
    Jwt {
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        audience: String,
        #[arg(long)]
        svid: String,
    },
}

/// Entry point used by `main.rs`; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Token(TokenCommand::Exchange(args)) => token_exchange(args).await,
        Command::Token(TokenCommand::Revoke {
            sockets,
            task,
            token,
        }) => {
            let xsock = exchange_socket(&sockets)?;
            let form = match (&task, &token) {
                (Some(t), _) => client::form(&[("task_id", t)]),
                (None, Some(t)) => client::form(&[("token", t)]),
                (None, None) => bail!("pass --task or --token"),
            };
            exchange_call(&xsock, http::Method::POST, "/revoke", Some(form)).await?;
            match task {
                Some(t) => println!("task {t} ended; its tokens are revoked"),
                None => println!("token revoked"),
            }
            Ok(())
        }
        Command::Token(TokenCommand::Introspect { sockets, token }) => {
            let xsock = exchange_socket(&sockets)?;
            let json = exchange_call(
                &xsock,
                http::Method::POST,
                "/introspect",
                Some(client::form(&[("token", &token)])),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(())
        }
        Command::Approvals(cmd) => approvals(cmd).await,
        Command::Audit(AuditCommand::Verify { file }) => audit_verify(&file),
        Command::Authority(cmd) => authority(cmd).await,
        Command::Bench(b) => {
            let params = crate::bench::BenchParams {
                clients: b.clients.max(1),
                streams: b.streams.max(1),
                identities: b.identities,
                policies: b.policies,
                duration: b.duration,
                socket: b.socket,
            };
            crate::bench::run(&b.scenarios, params, b.json).await
        }
        Command::Healthcheck { socket } => {
            let mut c = client::connect_resolved(socket.as_deref()).await?;
            // Any gRPC answer (even PermissionDenied) proves the agent serves.
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                c.fetch_x509_bundles(pb::with_security_header(pb::X509BundlesRequest {})),
            )
            .await
            .context("agent did not answer within 5s")?;
            match r {
                Ok(_) => {}
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                    ) => {}
                Err(s) => bail!("agent answered {:?}: {}", s.code(), s.message()),
            }
            println!("agent is healthy");
            Ok(())
        }
        Command::Api(ApiCommand::Fetch(FetchCommand::X509 { socket, write })) => {
            let mut c = client::connect_resolved(socket.as_deref()).await?;
            let mut stream = c
                .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
                .await
                .map_err(status)?
                .into_inner();
            let resp = stream
                .message()
                .await
                .map_err(status)?
                .context("the agent closed the stream without an answer")?;
            print_x509(&resp)?;
            if let Some(dir) = write {
                write_x509(&dir, &resp)?;
            }
            Ok(())
        }
        Command::Api(ApiCommand::Fetch(FetchCommand::Jwt {
            socket,
            audience,
            spiffe_id,
        })) => {
            let mut c = client::connect_resolved(socket.as_deref()).await?;
            let resp = c
                .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
                    audience,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                }))
                .await
                .map_err(status)?
                .into_inner();
            for svid in resp.svids {
                println!("token({}):\n\t{}", svid.spiffe_id, svid.svid);
                if !svid.hint.is_empty() {
                    println!("hint: {}", svid.hint);
                }
            }
            Ok(())
        }
        Command::Api(ApiCommand::Validate(ValidateCommand::Jwt {
            socket,
            audience,
            svid,
        })) => {
            let mut c = client::connect_resolved(socket.as_deref()).await?;
            let resp = c
                .validate_jwtsvid(pb::with_security_header(pb::ValidateJwtsvidRequest {
                    audience,
                    svid,
                }))
                .await
                .map_err(status)?
                .into_inner();
            println!("SVID is valid.");
            println!("SPIFFE ID : {}", resp.spiffe_id);
            let claims = resp.claims.map(struct_to_json).unwrap_or_default();
            println!("Claims    : {}", serde_json::Value::Object(claims));
            Ok(())
        }
        Command::Api(ApiCommand::Watch { socket }) => {
            let mut c = client::connect_resolved(socket.as_deref()).await?;
            let mut stream = c
                .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
                .await
                .map_err(status)?
                .into_inner();
            println!("Watching X.509 SVID updates (Ctrl-C to stop)");
            while let Some(resp) = stream.message().await.map_err(status)? {
                println!(
                    "--- update at {}",
                    humantime::format_rfc3339_seconds(SystemTime::now())
                );
                print_x509(&resp)?;
            }
            bail!("the agent closed the stream")
        }
    }
}

fn exchange_socket(args: &ExchangeSocketArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.exchange_socket {
        return Ok(p.clone());
    }
    let workload = client::socket_path(args.socket.as_deref()).context(
        "cannot locate the exchange socket: pass --exchange-socket, --socket or set SPIFFE_ENDPOINT_SOCKET",
    )?;
    Ok(workload.with_file_name("exchange.sock"))
}

/// Calls the exchange socket; a non-2xx answer becomes an error naming the
/// OAuth error code (the JSON body goes to stdout, so scripts can read it).
async fn exchange_call(
    socket: &Path,
    method: http::Method,
    path: &str,
    form: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let (status, body) = client::http_unix(socket, method, path, form).await?;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        serde_json::json!({"error": "invalid_response", "error_description": String::from_utf8_lossy(&body)})
    });
    if !status.is_success() {
        println!("{json}");
        bail!(
            "{} ({}): {}",
            json["error"].as_str().unwrap_or("error"),
            status.as_u16(),
            json["error_description"].as_str().unwrap_or("")
        );
    }
    Ok(json)
}

async fn token_exchange(args: ExchangeArgs) -> anyhow::Result<()> {
    let ExchangeArgs {
        sockets,
        audience,
        resource,
        scope,
        task,
        ttl,
        actor_token,
        subset,
        mut approval_id,
        wait,
    } = args;
    let xsock = exchange_socket(&sockets)?;
    let meta = exchange_call(
        &xsock,
        http::Method::GET,
        "/.well-known/oauth-authorization-server",
        None,
    )
    .await?;
    let issuer = meta["issuer"]
        .as_str()
        .context("the exchange metadata has no issuer")?
        .to_string();
    let mut api = match &sockets.socket {
        Some(p) => client::connect(p).await?,
        None => client::connect_resolved(None).await?,
    };
    let deadline = wait.map(|w| std::time::Instant::now() + w);
    loop {
        // A fresh JWT-SVID per attempt: polling may outlast one.
        let svid = api
            .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
                audience: vec![issuer.clone()],
                spiffe_id: String::new(),
            }))
            .await
            .map_err(status)?
            .into_inner()
            .svids
            .into_iter()
            .next()
            .context("the agent returned no JWT-SVID")?;
        let scopes = scope.join(" ");
        let ttl_secs = ttl.map(|t| t.as_secs().max(1).to_string());
        let mut pairs: Vec<(&str, &str)> = vec![
            ("grant_type", crate::exchange::request::GRANT_TOKEN_EXCHANGE),
            ("subject_token", &svid.svid),
            (
                "subject_token_type",
                crate::exchange::request::TOKEN_TYPE_JWT,
            ),
            ("scope", &scopes),
        ];
        if let Some(a) = &audience {
            pairs.push(("audience", a));
        }
        if let Some(r) = &resource {
            pairs.push(("resource", r));
        }
        if let Some(t) = &task {
            pairs.push(("task_id", t));
        }
        if let Some(t) = &ttl_secs {
            pairs.push(("requested_ttl", t));
        }
        if let Some(a) = &actor_token {
            pairs.push(("actor_token", a));
            pairs.push((
                "actor_token_type",
                crate::exchange::request::TOKEN_TYPE_ACCESS_TOKEN,
            ));
        }
        if subset {
            pairs.push(("scope_mode", "subset"));
        }
        if let Some(a) = &approval_id {
            pairs.push(("approval_id", a));
        }
        let (code, body) = client::http_unix(
            &xsock,
            http::Method::POST,
            "/token",
            Some(client::form(&pairs)),
        )
        .await?;
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let pending = json["error"] == "authorization_pending";
        if pending && let Some(deadline) = deadline {
            let id = json["approval_id"].as_str().unwrap_or_default().to_string();
            if approval_id.is_none() {
                eprintln!(
                    "waiting for an operator to approve {id} (tessera approvals approve {id})"
                );
            }
            approval_id = Some(id);
            if std::time::Instant::now() >= deadline {
                bail!(
                    "approval {} still pending after the --wait time",
                    approval_id.unwrap_or_default()
                );
            }
            let interval = json["interval"].as_u64().unwrap_or(2).clamp(1, 60);
            tokio::time::sleep(Duration::from_secs(interval)).await;
            continue;
        }
        if !code.is_success() {
            println!("{json}");
            bail!(
                "{} ({}): {}",
                json["error"].as_str().unwrap_or("error"),
                code.as_u16(),
                json["error_description"].as_str().unwrap_or("")
            );
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
}

fn admin_socket(args: &AdminSocketArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.admin_socket {
        return Ok(p.clone());
    }
    if let Some(c) = &args.config {
        let config = Config::load(c)?;
        return config
            .admin_socket_path
            .with_context(|| format!("{} sets no admin.socket_path", c.display()));
    }
    Ok(PathBuf::from("/run/tessera/admin.sock"))
}

async fn approvals(cmd: ApprovalsCommand) -> anyhow::Result<()> {
    let (admin, path, json_out) = match &cmd {
        ApprovalsCommand::List { admin, json } => (admin, "/approvals".to_string(), *json),
        ApprovalsCommand::Approve { admin, id } => {
            (admin, format!("/approvals/{}/approve", urlencode(id)), true)
        }
        ApprovalsCommand::Deny { admin, id } => {
            (admin, format!("/approvals/{}/deny", urlencode(id)), true)
        }
    };
    let socket = admin_socket(admin)?;
    let method = if matches!(cmd, ApprovalsCommand::List { .. }) {
        http::Method::GET
    } else {
        http::Method::POST
    };
    let (code, body) = client::http_unix(&socket, method, &path, None).await?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("unexpected answer from {}", socket.display()))?;
    if !code.is_success() {
        bail!("{}", value["error"].as_str().unwrap_or("request failed"));
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let list = value.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no approvals");
        return Ok(());
    }
    println!(
        "{:<28} {:<9} {:<24} {:<40} SCOPES / AUDIENCE",
        "ID", "STATE", "TASK", "PRINCIPAL"
    );
    for a in list {
        println!(
            "{:<28} {:<9} {:<24} {:<40} {} -> {}",
            a["id"].as_str().unwrap_or(""),
            a["state"].as_str().unwrap_or(""),
            a["task_id"].as_str().unwrap_or(""),
            a["principal"].as_str().unwrap_or(""),
            a["scopes"]
                .as_array()
                .map(|s| s
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(" "))
                .unwrap_or_default(),
            a["audience"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn audit_verify(file: &Path) -> anyhow::Result<()> {
    let report = crate::audit::verify_file(file)?;
    for line in &report.recovered_torn_lines {
        println!("line {line}: torn by a crash and acknowledged by a recovery record");
    }
    match report.first_problem {
        None => {
            println!(
                "{}: {} records, chain intact",
                file.display(),
                report.records
            );
            if let Some(last) = report.last {
                println!("last record: seq {} hash {}", last.seq, last.hash);
            }
            Ok(())
        }
        Some(p) => bail!("{}: {p}", file.display()),
    }
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (config, config_path) = match (&args.config, args.dev) {
        (Some(path), _) => (Config::load(path)?, Some(path.clone())),
        (None, _) => {
            let base = std::env::current_dir()?.join(".tessera");
            (Config::dev(&base)?, None)
        }
    };
    let json = match args.log_format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => config.log.json,
    };
    init_logging(config.log.level.as_deref(), json);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    // Start-up may wait on the fleet authority (upstream mode): stop cleanly
    // if asked to meanwhile.
    let agent = tokio::select! {
        started = crate::daemon::start(config, Arc::new(crate::clock::SystemClock)) => started?,
        _ = crate::daemon::wait_for_signal() => {
            tracing::info!("stopped during start-up");
            return Ok(());
        }
    };
    if args.dev {
        println!(
            "Tessera dev agent: Workload API on {}",
            agent.socket_path.display()
        );
        println!(
            "export SPIFFE_ENDPOINT_SOCKET=unix://{}",
            agent.socket_path.display()
        );
        if let Some(a) = agent.admin_addr {
            println!("admin: http://{a}/healthz /readyz /metrics");
        }
    }
    crate::daemon::run_until_signalled(agent, config_path).await
}

async fn authority(cmd: AuthorityCommand) -> anyhow::Result<()> {
    let duration = |flag: &str, v: &str| {
        humantime::parse_duration(v).map_err(|e| anyhow::anyhow!("--{flag} {v:?}: {e}"))
    };
    let td = |v: &str| {
        spiffe::TrustDomain::new(v).map_err(|e| anyhow::anyhow!("--trust-domain {v:?}: {e}"))
    };
    match cmd {
        AuthorityCommand::Init {
            dir,
            trust_domain,
            ca_ttl,
        } => {
            let ttl = duration("ca-ttl", &ca_ttl)?;
            crate::authority::init_key_dir(
                &td(&trust_domain)?,
                &dir,
                ttl,
                std::time::SystemTime::now(),
            )?;
            println!(
                "wrote {}/{{ca.crt,ca.key,jwt.key,access.key}}",
                dir.display()
            );
            println!(
                "agents trust {}/ca.crt (upstream.bundle_file); keep the .key files secret",
                dir.display()
            );
            Ok(())
        }
        AuthorityCommand::RotateCa {
            dir,
            trust_domain,
            ca_ttl,
        } => {
            let ttl = duration("ca-ttl", &ca_ttl)?;
            let name = crate::authority::add_ca(
                &td(&trust_domain)?,
                &dir,
                ttl,
                std::time::SystemTime::now(),
            )?;
            println!(
                "wrote {}; replicas publish it within server.key_reload_interval and sign with it after server.ca_publish_lead",
                dir.join(name).display()
            );
            Ok(())
        }
        AuthorityCommand::JoinToken { dir, node, ttl } => {
            let ttl = duration("ttl", &ttl)?;
            let token = crate::fleet::join::create(&dir, &node, ttl, std::time::SystemTime::now())
                .map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
        AuthorityCommand::Run { config } => {
            let cfg = Config::load(&config)?;
            init_logging(cfg.log.level.as_deref(), cfg.log.json);
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            let server = cfg.server.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: `tessera authority run` needs a [server] table",
                    config.display()
                )
            })?;
            let running = crate::fleet::server::start(
                cfg.trust_domain.clone(),
                cfg.entries.clone(),
                server,
                cfg.admin_listen,
                Arc::new(crate::clock::SystemClock),
            )
            .await?;
            if let Some(a) = running.admin_addr {
                tracing::info!(address = %a, "admin HTTP listening (/healthz /readyz /metrics)");
            }
            // SIGHUP must not kill the authority (its default action);
            // config changes other than keys need a restart.
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            loop {
                tokio::select! {
                    _ = crate::daemon::wait_for_signal() => break,
                    _ = hup.recv() => tracing::info!("SIGHUP: keys reload on their own every server.key_reload_interval; restart to change entries"),
                }
            }
            tracing::info!("shutting down");
            running.shutdown();
            running.wait().await;
            Ok(())
        }
    }
}

fn init_logging(level: Option<&str>, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.unwrap_or("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn print_x509(resp: &pb::X509svidResponse) -> anyhow::Result<()> {
    println!("Received {} svid(s)", resp.svids.len());
    for svid in &resp.svids {
        println!();
        println!("SPIFFE ID:\t\t{}", svid.spiffe_id);
        if !svid.hint.is_empty() {
            println!("Hint:\t\t\t{}", svid.hint);
        }
        let chain = split_der_certs(&svid.x509_svid)?;
        if let Some(leaf) = chain.first() {
            let (_, c) = x509_parser::parse_x509_certificate(leaf).context("unparsable SVID")?;
            println!("SVID Valid After:\t{}", c.validity().not_before);
            println!("SVID Valid Until:\t{}", c.validity().not_after);
            println!("Serial:\t\t\t{}", c.raw_serial_as_string());
        }
        for (i, ca) in split_der_certs(&svid.bundle)?.iter().enumerate() {
            let (_, c) = x509_parser::parse_x509_certificate(ca).context("unparsable bundle")?;
            println!("CA #{} Valid After:\t{}", i + 1, c.validity().not_before);
            println!("CA #{} Valid Until:\t{}", i + 1, c.validity().not_after);
        }
    }
    Ok(())
}

fn write_x509(dir: &Path, resp: &pb::X509svidResponse) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, svid) in resp.svids.iter().enumerate() {
        let certs: String = split_der_certs(&svid.x509_svid)?
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect();
        let bundle: String = split_der_certs(&svid.bundle)?
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect();
        std::fs::write(dir.join(format!("svid.{i}.pem")), certs)?;
        crate::fsutil::write_private_atomic(
            &dir.join(format!("svid.{i}.key")),
            pem_encode("PRIVATE KEY", &svid.x509_svid_key).as_bytes(),
        )?;
        std::fs::write(dir.join(format!("bundle.{i}.pem")), bundle)?;
        println!(
            "Wrote svid.{i}.pem, svid.{i}.key (0600) and bundle.{i}.pem to {}",
            dir.display()
        );
    }
    Ok(())
}

fn struct_to_json(s: prost_types::Struct) -> serde_json::Map<String, serde_json::Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, value_to_json(v)))
        .collect()
}

fn value_to_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => b.into(),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .unwrap_or_default(),
        Some(Kind::StringValue(s)) => s.into(),
        Some(Kind::ListValue(l)) => l.values.into_iter().map(value_to_json).collect(),
        Some(Kind::StructValue(s)) => serde_json::Value::Object(struct_to_json(s)),
    }
}
