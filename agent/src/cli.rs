//! The `tessera` command line. Exit code 0 on success; otherwise a one-line
//! error on stderr and a non-zero code. One file per subcommand group;
//! [`client`] is the Workload API and Unix-socket HTTP client they share.

mod api;
mod approvals;
mod audit;
mod authority;
pub mod bench;
pub mod client;
mod operator;
mod run;
mod token;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tessera", version, about = "SPIFFE workload identity agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon.
    Run(run::RunArgs),
    /// Talk to a running agent over the Workload API.
    #[command(subcommand)]
    Api(api::ApiCommand),
    /// Load-test the agent over its real socket (starts its own agent unless --socket).
    Bench(bench::BenchArgs),
    /// Exit 0 if the agent answers on its socket.
    Healthcheck {
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Per-task tokens: exchange this workload's SVID, revoke, introspect.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Decide exchanges that wait for approval (operator socket: root or the agent's user; or --authority: an operator SVID).
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCommand),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The multi-node signing service for a trust domain (see docs/architecture.md).
    #[command(subcommand)]
    Authority(authority::AuthorityCommand),
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

/// Runs one command line (`args[0]` is the program name) in the caller's
/// runtime, as `tessera` would: what tests use to drive the CLI itself.
pub async fn run_from<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    dispatch(Cli::try_parse_from(args)?).await
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
        Command::Run(args) => run::run(args).await,
        Command::Api(cmd) => api::api(cmd).await,
        Command::Healthcheck { socket } => api::healthcheck(socket).await,
        Command::Token(cmd) => token::token(cmd).await,
        Command::Approvals(cmd) => approvals::approvals(cmd).await,
        Command::Audit(audit::AuditCommand::Verify {
            file,
            anchor,
            no_anchor,
        }) => audit::audit_verify(&file, anchor.as_deref(), no_anchor),
        Command::Authority(cmd) => authority::authority(cmd).await,
        Command::Bench(b) => bench(b).await,
    }
}

/// `tessera bench`.
async fn bench(b: bench::BenchArgs) -> anyhow::Result<()> {
    let params = bench::BenchParams {
        clients: b.clients.max(1),
        streams: b.streams.max(1),
        opening: b.opening.max(1),
        identities: b.identities,
        policies: b.policies,
        duration: b.duration,
        audit_commit_delay: b.audit_commit_delay,
        socket: b.socket,
        agent_pid: b.agent_pid,
        rotation_timeout: b.rotation_timeout,
        register_command: b.register_command,
        rounds: b.rounds,
    };
    bench::run(&b.scenarios, params, b.json).await
}

pub(super) fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

pub(super) fn init_logging(level: Option<&str>, json: bool) {
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
