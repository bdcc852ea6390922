//! `tessera run`: the node daemon, in the foreground until a signal.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};

use super::init_logging;
use crate::config::Config;

#[derive(Args)]
pub(super) struct RunArgs {
    /// Config file (TOML).
    #[arg(long, conflicts_with = "dev", required_unless_present = "dev")]
    pub(super) config: Option<PathBuf>,
    /// Run with the embedded development config (state under ./.tessera/).
    #[arg(long)]
    pub(super) dev: bool,
    /// Log format; overrides `[log] format`.
    #[arg(long, value_enum)]
    pub(super) log_format: Option<LogFormat>,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum LogFormat {
    Text,
    Json,
}

pub(super) async fn run(args: RunArgs) -> anyhow::Result<()> {
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
        started = crate::app::start(config, Arc::new(crate::clock::SystemClock)) => started?,
        _ = crate::app::wait_for_signal() => {
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
        if let Some(issuer) = &agent.https_issuer {
            println!("issuer: {issuer} ({issuer}/.well-known/openid-configuration)");
        }
    }
    crate::app::run_until_signalled(agent, config_path).await
}
