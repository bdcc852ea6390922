//! `tessera authority`: the fleet signing service and its key directory.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};

use super::init_logging;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;

/// A fleet key directory and the CA to put in it.
#[derive(Args)]
pub(super) struct KeyDirArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    trust_domain: String,
    /// CA lifetime.
    #[arg(long, default_value = "1y")]
    ca_ttl: String,
}

impl KeyDirArgs {
    /// The trust domain, directory and CA lifetime, each checked.
    fn parse(self) -> anyhow::Result<(spiffe::TrustDomain, PathBuf, std::time::Duration)> {
        let td = spiffe::TrustDomain::new(&self.trust_domain)
            .map_err(|e| anyhow::anyhow!("--trust-domain {:?}: {e}", self.trust_domain))?;
        let ttl = humantime::parse_duration(&self.ca_ttl)
            .map_err(|e| anyhow::anyhow!("--ca-ttl {:?}: {e}", self.ca_ttl))?;
        Ok((td, self.dir, ttl))
    }
}

#[derive(Subcommand)]
pub(super) enum AuthorityCommand {
    /// Run the authority (`[server]` table of the config file).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Create a key directory: ca.crt, ca.key, jwt.key, access.key, wit.key (0600).
    Init {
        #[command(flatten)]
        args: KeyDirArgs,
        /// What jwt.key (JWT-SVIDs) is: ec-p256 (ES256), rsa-2048 or
        /// rsa-4096 (RS256, for Microsoft Entra workload identity federation).
        #[arg(long, default_value = "ec-p256")]
        jwt_key_type: String,
    },
    /// Add a successor CA (ca-<time>.crt/.key) to a key directory; replicas
    /// publish it at once and sign with it after `ca_publish_lead`.
    RotateCa(KeyDirArgs),
    /// Create a single-use join token for a machine outside Kubernetes; prints it.
    JoinToken {
        /// The authority's `server.join_token_dir` (a shared directory).
        #[arg(
            long,
            conflicts_with_all = ["manifest", "sql"],
            required_unless_present_any = ["manifest", "sql"]
        )]
        dir: Option<PathBuf>,
        /// Instead of a directory: write the token's `JoinToken` object
        /// (named by the token's hash; the token itself is not in it) to
        /// this file, for `kubectl -n <the authority's namespace> apply -f`.
        /// Replicas with `[server.store] kind = "kubernetes"` redeem it once.
        #[arg(long, conflicts_with = "sql")]
        manifest: Option<PathBuf>,
        /// Instead of a directory: write the SQL that stores the token (its
        /// hash, not the token) to this file, for `psql -f`. Replicas with
        /// `[server.store] kind = "postgres"` redeem it once.
        #[arg(long)]
        sql: Option<PathBuf>,
        /// The node's name (its ID becomes spiffe://<td>/tessera/node/join/<name>).
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "10m")]
        ttl: String,
    },
}

pub(super) async fn authority(cmd: AuthorityCommand) -> anyhow::Result<()> {
    let duration = |flag: &str, v: &str| {
        humantime::parse_duration(v).map_err(|e| anyhow::anyhow!("--{flag} {v:?}: {e}"))
    };
    match cmd {
        AuthorityCommand::Init { args, jwt_key_type } => {
            let kind = crate::identity::jws::JwtKeyType::parse(&jwt_key_type).ok_or_else(|| {
                anyhow::anyhow!(
                    "--jwt-key-type {jwt_key_type:?}: expected one of {}",
                    crate::identity::jws::JwtKeyType::NAMES.join(", ")
                )
            })?;
            let (td, dir, ttl) = args.parse()?;
            crate::identity::key_files::init_key_dir_of(&td, &dir, ttl, SystemClock.now(), kind)?;
            println!(
                "wrote {}/{{ca.crt,ca.key,jwt.key,access.key,wit.key}}",
                dir.display()
            );
            println!(
                "agents trust {}/ca.crt (upstream.bundle_file); keep the .key files secret",
                dir.display()
            );
            Ok(())
        }
        AuthorityCommand::RotateCa(args) => {
            let (td, dir, ttl) = args.parse()?;
            let name = crate::identity::key_files::add_ca(&td, &dir, ttl, SystemClock.now())?;
            println!(
                "wrote {}; replicas publish it within server.key_reload_interval and sign with it after server.ca_publish_lead",
                dir.join(name).display()
            );
            Ok(())
        }
        AuthorityCommand::JoinToken {
            dir,
            manifest,
            sql,
            node,
            ttl,
        } => {
            let ttl = duration("ttl", &ttl)?;
            let now = SystemClock.now();
            let token = match (dir, manifest, sql) {
                (Some(dir), _, _) => crate::fleet::join::create(&dir, &node, ttl, now)?,
                (None, None, Some(path)) => {
                    crate::fleet::join::check_node_name(&node)?;
                    let token = crate::fleet::join::new_token()?;
                    let expires = crate::clock::unix_seconds(now) + ttl.as_secs();
                    let insert = crate::fleet::store::postgres::nodes::join_token_insert(
                        &token, &node, expires,
                    );
                    std::fs::write(&path, insert)
                        .map_err(|e| anyhow::anyhow!("--sql {}: {e}", path.display()))?;
                    eprintln!(
                        "wrote the join token's row to {}; store it with psql \"<the [server.store] url>\" -f {}",
                        path.display(),
                        path.display()
                    );
                    token
                }
                (None, Some(path), _) => {
                    crate::fleet::join::check_node_name(&node)?;
                    let token = crate::fleet::join::new_token()?;
                    let expires = crate::clock::unix_seconds(now) + ttl.as_secs();
                    let object = crate::fleet::nodes::join_token_object(&token, &node, expires);
                    std::fs::write(&path, format!("{object:#}\n"))
                        .map_err(|e| anyhow::anyhow!("--manifest {}: {e}", path.display()))?;
                    eprintln!(
                        "wrote the JoinToken object to {}; apply it with kubectl -n <the authority's namespace> apply -f {}",
                        path.display(),
                        path.display()
                    );
                    token
                }
                (None, None, None) => anyhow::bail!("give --dir, --manifest or --sql"),
            };
            println!("{token}");
            Ok(())
        }
        AuthorityCommand::Run { config } => {
            let cfg = Config::load(&config)?;
            init_logging(cfg.log.level.as_deref(), cfg.log.json);
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            if cfg.server.is_none() {
                anyhow::bail!(
                    "{}: `tessera authority run` needs a [server] table",
                    config.display()
                );
            }
            let running =
                crate::app::authority::start_authority(&cfg, Arc::new(crate::clock::SystemClock))
                    .await?;
            if let Some(a) = running.server.admin_addr {
                tracing::info!(address = %a, "admin HTTP listening (/healthz /readyz /metrics)");
            }
            if let Some(issuer) = &running.https_issuer {
                tracing::info!(%issuer, "JWT-SVIDs carry this issuer; relying parties discover its keys at {issuer}/.well-known/openid-configuration");
            }
            // SIGHUP reloads the config file's entries (keys reload on their
            // own); other changes need a restart.
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            let stop = crate::app::wait_for_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = hup.recv() => reload_entries(&config, &running),
                }
            }
            tracing::info!("shutting down");
            running.shutdown();
            running.wait().await;
            Ok(())
        }
    }
}

/// SIGHUP: the config file's entries and `[[federation]]` relationships,
/// read again. A valid file replaces them at once (open streams and the
/// next signing see the new set); an invalid one is logged with its key and
/// line, and what is in force stays.
fn reload_entries(path: &std::path::Path, running: &crate::app::authority::RunningAuthority) {
    let entries = &running.server.entries;
    match Config::load(path) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            entries.set_config(&cfg.entries);
            running.relationships.set_config(cfg.federation.clone());
            tracing::info!(
                entries = cfg.entries.len(),
                live = entries.live_count(),
                federation = cfg.federation.len(),
                "SIGHUP: reloaded entries and federation relationships from {} (other changes need a restart; keys reload on their own)",
                path.display()
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: reload rejected; keeping the entries in force")
        }
    }
}
