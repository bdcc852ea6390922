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

/// The demo policy, the first time only: a policy directory that exists is
/// the user's, and is never written to.
fn write_dev_policy(base: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = base.join("policies");
    if dir.exists() {
        return Ok(());
    }
    crate::fsutil::create_private_dir(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let uid = nix::unistd::geteuid().as_raw();
    std::fs::write(dir.join("demo.cedar"), crate::config::dev_demo_policy(uid))
        .with_context(|| format!("writing the demo policy to {}", dir.display()))?;
    Ok(())
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
            write_dev_policy(&base)?;
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
    // Listening from here to the end, so no signal falls between start-up
    // and serving. Start-up may wait on the fleet authority (upstream mode):
    // stop cleanly if asked to meanwhile.
    let mut signals = crate::app::Signals::new()?;
    let sockets: Vec<PathBuf> = std::iter::once(config.socket_path.clone())
        .chain(config.exchange.as_ref().map(|x| x.socket_path.clone()))
        .collect();
    let agent = tokio::select! {
        started = crate::app::start(config, Arc::new(crate::clock::SystemClock)) => started?,
        _ = signals.stop() => {
            // Start-up may have bound sockets already; nothing serves them.
            for path in sockets {
                if std::fs::symlink_metadata(&path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    let _ = std::fs::remove_file(&path);
                }
            }
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
        println!(
            "try: tessera token exchange --audience demo --scope demo:read --task my-task   (demo:write waits for: tessera approvals approve ID --admin-socket {}-operator/admin.sock)",
            agent
                .socket_path
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .display()
        );
    }
    crate::app::run_until_signalled(agent, config_path, signals).await
}
