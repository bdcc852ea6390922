//! `tessera bench`: a load generator over the agent's real Unix socket.
//!
//! By default every scenario starts its own agent (this binary, `tessera run`,
//! as a child process with a config made for the scenario) in a temporary
//! directory, so one command gives the numbers and `agent_rss_bytes` is the
//! agent's own memory. `--socket` targets a running agent instead, which
//! may be any Workload API agent (SPIRE's too): `--agent-pid` names its
//! process, so its CPU time and memory are read from `/proc` just as for an
//! agent the bench started. Scenarios that need a config only the bench can
//! write (K fresh entries, P generated policies) are then skipped with a
//! note; the others need the agent set up as BENCHMARKS.md describes (an
//! entry for the bench's uid, a short X509-SVID TTL for `fanout`, a
//! `--register-command` for `new-entry`).
//!
//! The bench process is the workload: entries select it by uid and executable
//! path. Where a scenario needs a second workload (identities cached by
//! someone else), a copy of this binary started from another path runs
//! `tessera api watch`, which the agent sees as a different program.

// A load generator measures real elapsed time, which paused test time must
// not touch: std's monotonic clock is the right one here.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use tessera_workload_api as pb;
use tessera_workload_api::client::SpiffeWorkloadApiClient;
use tonic::transport::Channel;

use super::client;

mod grants;
mod sds;

pub const SCENARIOS: &[&str] = &[
    "x509-first",
    "x509-cold",
    "jwt-fetch",
    "jwt-validate",
    "wit-fetch",
    "fanout",
    "exchange",
    "grants",
    "idle-memory",
    "new-entry",
    "sds-first",
    "sds-idle-memory",
];

/// The `tessera bench` command line.
#[derive(Args)]
pub struct BenchArgs {
    /// Scenarios to run (default: all): x509-first, x509-cold, jwt-fetch,
    /// jwt-validate, wit-fetch, fanout, exchange, grants, idle-memory, new-entry,
    /// sds-first, sds-idle-memory.
    pub scenarios: Vec<String>,
    /// One JSON object per line per scenario instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Concurrent clients (x509-first, jwt-*, wit-fetch, sds-first).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Open streams (fanout, idle-memory, sds-idle-memory).
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// fanout, idle-memory: how many of those streams wait for their first
    /// message at once while they are opened. SPIRE's agent (ef8527ec)
    /// deadlocks with a few hundred attestations in flight (BENCHMARKS.md,
    /// "Tessera and SPIRE side by side"), so the default keeps below that.
    #[arg(long, default_value_t = 32)]
    pub opening: usize,
    /// Distinct identities (x509-cold: issued per round; idle-memory: cached).
    #[arg(long, default_value_t = 100)]
    pub identities: usize,
    /// Cedar policies loaded (exchange).
    #[arg(long, default_value_t = 1000)]
    pub policies: usize,
    /// How long each closed-loop scenario runs.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// exchange: the agent's `exchange.audit_commit_delay` (how long the
    /// audit writer may wait for the records of exchanges in progress
    /// before it syncs a batch; 0 never waits).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub audit_commit_delay: Duration,
    /// Target a running agent instead of starting one.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// With --socket: the running agent's PID, whose CPU time and resident
    /// memory are then measured (/proc/PID/stat and /proc/PID/status).
    #[arg(long, requires = "socket")]
    pub agent_pid: Option<u32>,
    /// fanout: how long to wait for the agent to push a renewed X509-SVID
    /// to every open stream (with --socket, give the bench's entry an
    /// X509-SVID TTL well under this).
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    pub rotation_timeout: Duration,
    /// new-entry with --socket: a shell command that registers a new entry
    /// for the bench's process with the SPIFFE ID in $TESSERA_BENCH_NEW_ID
    /// (e.g. `spire-server entry create ...`, or appending to a Tessera
    /// config and sending SIGHUP). Timing starts when it exits.
    #[arg(long)]
    pub register_command: Option<String>,
    /// new-entry: how many entries are registered, one after another.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

#[derive(Debug, Clone)]
pub struct BenchParams {
    pub clients: usize,
    pub streams: usize,
    pub opening: usize,
    pub identities: usize,
    pub policies: usize,
    pub duration: Duration,
    pub audit_commit_delay: Duration,
    pub socket: Option<PathBuf>,
    pub agent_pid: Option<u32>,
    pub rotation_timeout: Duration,
    pub register_command: Option<String>,
    pub rounds: usize,
}

/// One scenario's figures.
#[derive(Debug, Default)]
pub struct BenchResult {
    pub scenario: String,
    pub params: serde_json::Map<String, serde_json::Value>,
    pub ops: u64,
    pub seconds: f64,
    pub latencies: Vec<Duration>,
    pub agent_rss_bytes: Option<u64>,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl BenchResult {
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let idx = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[idx].as_secs_f64() * 1000.0
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        o.insert("scenario".into(), self.scenario.clone().into());
        o.insert(
            "params".into(),
            serde_json::Value::Object(self.params.clone()),
        );
        o.insert("ops".into(), self.ops.into());
        o.insert("seconds".into(), round3(self.seconds).into());
        o.insert("ops_per_sec".into(), round3(self.ops_per_sec()).into());
        for (k, p) in [
            ("p50_ms", 0.5),
            ("p90_ms", 0.9),
            ("p99_ms", 0.99),
            ("max_ms", 1.0),
        ] {
            o.insert(k.into(), round3(self.percentile_ms(p)).into());
        }
        o.insert(
            "agent_rss_bytes".into(),
            self.agent_rss_bytes
                .map_or(serde_json::Value::Null, Into::into),
        );
        o.extend(self.extra.clone());
        serde_json::Value::Object(o)
    }

    fn ops_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ops as f64 / self.seconds
        } else {
            0.0
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs the named scenarios (all if empty), printing a table or JSON lines.
pub async fn run(names: &[String], params: BenchParams, json: bool) -> anyhow::Result<()> {
    let names: Vec<&str> = if names.is_empty() {
        SCENARIOS.to_vec()
    } else {
        names.iter().map(String::as_str).collect()
    };
    for n in &names {
        if !SCENARIOS.contains(n) {
            bail!(
                "unknown scenario {n:?}; choose from {}",
                SCENARIOS.join(", ")
            );
        }
    }
    if let Some(pid) = params.agent_pid
        && cpu_seconds_of(pid).is_none()
    {
        bail!("--agent-pid {pid}: cannot read /proc/{pid}/stat (no such process?)");
    }
    if !json {
        println!(
            "{:<13} {:>9} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10}  notes",
            "scenario", "ops", "ops/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "agent RSS"
        );
    }
    for name in names {
        let results = match name {
            "x509-first" => vec![x509_first(&params).await?],
            "x509-cold" => x509_cold(&params).await?,
            "jwt-fetch" => vec![
                jwt_fetch(&params, false).await?,
                jwt_fetch(&params, true).await?,
            ],
            "jwt-validate" => vec![jwt_validate(&params).await?],
            "wit-fetch" => vec![
                wit_fetch(&params, false).await?,
                wit_fetch(&params, true).await?,
            ],
            "fanout" => fanout(&params).await?,
            "idle-memory" => idle_memory(&params).await?,
            "exchange" => exchange(&params).await?,
            "grants" => grants::grants(&params).await?,
            "new-entry" => new_entry(&params).await?,
            "sds-first" => vec![sds::sds_first(&params).await?],
            "sds-idle-memory" => sds::sds_idle_memory(&params).await?,
            _ => unreachable!(),
        };
        for mut r in results {
            r.latencies.sort();
            if json {
                println!("{}", r.to_json());
            } else {
                let rss = r.agent_rss_bytes.map_or("-".to_string(), |b| {
                    format!("{:.1} MiB", b as f64 / 1048576.0)
                });
                let notes: Vec<String> = r
                    .params
                    .iter()
                    .chain(r.extra.iter())
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "{:<13} {:>9} {:>11.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10}  {}",
                    r.scenario,
                    r.ops,
                    r.ops_per_sec(),
                    r.percentile_ms(0.5),
                    r.percentile_ms(0.9),
                    r.percentile_ms(0.99),
                    r.percentile_ms(1.0),
                    rss,
                    notes.join(" ")
                );
            }
        }
    }
    Ok(())
}

/// An in-memory authority for timing the raw signing code in this process.
fn memory_authority() -> anyhow::Result<Arc<crate::identity::LocalAuthority>> {
    Ok(crate::identity::LocalAuthority::load(
        crate::identity::AuthoritySettings {
            trust_domain: spiffe::TrustDomain::new("example.org")?,
            ca_ttl: Duration::from_secs(86400),
            jwt_key_ttl: Duration::from_secs(86400),
            jwt_key_type: Default::default(),
            state_dir: None,
            ca_files: None,
        },
        Arc::new(crate::clock::SystemClock),
    )?)
}

/// An agent started for one scenario.
struct BenchAgent {
    child: Child,
    /// Keeps the agent's directory alive for as long as the agent runs.
    _dir: tempfile::TempDir,
    socket: PathBuf,
    config: PathBuf,
}

impl BenchAgent {
    /// `entries` is TOML for `[[entries]]`; `svid` the `[svid]` table body.
    fn start(entries: &str, svid: &str) -> anyhow::Result<Self> {
        Self::start_in(tempfile::tempdir()?, entries, svid, "")
    }

    /// Like [`Self::start`] in a prepared directory, with `extra` TOML
    /// appended (e.g. an `[exchange]` table).
    fn start_in(
        dir: tempfile::TempDir,
        entries: &str,
        svid: &str,
        extra: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with(dir, entries, svid, "", extra)
    }

    /// Like [`Self::start_in`], with `limits` TOML lines added to `[limits]`.
    fn start_with(
        dir: tempfile::TempDir,
        entries: &str,
        svid: &str,
        limits: &str,
        extra: &str,
    ) -> anyhow::Result<Self> {
        let socket = dir.path().join("agent.sock");
        let config = format!(
            "trust_domain = \"example.org\"\nsocket_path = \"{}\"\ndata_dir = \"{}/data\"\n[authority]\npersist = false\n[svid]\n{svid}\n[log]\nlevel = \"warn\"\n# The bench is one process measuring the agent, not an abusive caller.\n[limits]\nrequests_per_second = 1e12\nrequest_burst = 1e12\n{limits}{entries}\n{extra}",
            socket.display(),
            dir.path().display()
        );
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, config)?;
        // A profiler can wrap the agent (e.g. `valgrind --tool=massif`); it
        // must run the agent in its own process so signals reach it.
        let mut command = match std::env::var("TESSERA_BENCH_AGENT_WRAPPER") {
            Ok(wrapper) if !wrapper.trim().is_empty() => {
                let mut words = wrapper.split_whitespace();
                let mut c = Command::new(words.next().unwrap_or_default());
                c.args(words).arg(std::env::current_exe()?);
                c
            }
            _ => Command::new(std::env::current_exe()?),
        };
        let child = command
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the agent")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("the bench agent did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            child,
            _dir: dir,
            socket,
            config: path,
        })
    }

    fn rss_bytes(&self) -> Option<u64> {
        rss_of(self.child.id())
    }

    /// CPU time (user + system, all threads) the agent has used so far.
    fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds_of(self.child.id())
    }

    /// Appends `entries` (TOML) to the agent's config and has it reload.
    fn add_entries(&self, entries: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)?;
        f.write_all(format!("\n{entries}").as_bytes())?;
        f.sync_all()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )?;
        Ok(())
    }
}

impl Drop for BenchAgent {
    /// SIGTERM first, so a wrapping profiler writes its report; SIGKILL if
    /// the agent has not exited within 30 s.
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(pid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> anyhow::Result<f64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)?;
    Ok(t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
}

fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks as f64 / hz as f64)
}

/// `agent_cpu_us_per_op`: the agent's own CPU time per operation over a
/// measured window, the figure that bounds throughput on dedicated cores
/// (the load generator shares these cores, so ops/s alone understates it).
fn insert_cpu_per_op(
    extra: &mut serde_json::Map<String, serde_json::Value>,
    before: Option<f64>,
    after: Option<f64>,
    ops: usize,
) {
    if let (Some(b), Some(a)) = (before, after)
        && ops > 0
    {
        extra.insert(
            "agent_cpu_us_per_op".into(),
            round3((a - b) * 1e6 / ops as f64).into(),
        );
    }
}

/// [`insert_cpu_per_op`] for a scenario whose window ends now.
fn cpu_per_op_extra(
    target: &Target,
    before: Option<f64>,
    ops: usize,
) -> serde_json::Map<String, serde_json::Value> {
    let mut extra = serde_json::Map::new();
    insert_cpu_per_op(&mut extra, before, target.cpu_seconds(), ops);
    extra
}

/// CPU time of `pid`'s live threads to the nanosecond (the scheduler's
/// run time per thread), for windows too short for `/proc/<pid>/stat`'s
/// clock ticks. Threads that exit within the window are not counted.
fn thread_cpu_seconds_of(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let schedstat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += schedstat
            .split_ascii_whitespace()
            .next()?
            .parse::<u64>()
            .ok()?;
    }
    Some(ns as f64 * 1e-9)
}

fn rss_of(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS:")
}

/// The anonymous part of a process's resident memory (heap, stacks, dirty
/// data): what it costs the node beyond the clean pages of its executable
/// and libraries, which the page cache shares and can reclaim.
fn anon_of(pid: u32) -> Option<u64> {
    status_bytes(pid, "RssAnon:")
}

/// A `kB` line of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// An entry that selects this bench process.
fn entry_for_me(id: &str) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    Ok(format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/{id}\"\nselectors = [\"unix:uid:{}\", \"unix:path:{}\"]\n",
        nix::unistd::geteuid(),
        exe.display()
    ))
}

/// The agent a scenario measures: one the bench started for it, or a
/// running one (`--socket`, and `--agent-pid` for its CPU and memory).
struct Target {
    agent: Option<BenchAgent>,
    socket: PathBuf,
    pid: Option<u32>,
}

impl Target {
    /// CPU time (user + system, all threads) the agent has used so far.
    fn cpu_seconds(&self) -> Option<f64> {
        self.pid.and_then(cpu_seconds_of)
    }

    fn rss_bytes(&self) -> Option<u64> {
        self.pid.and_then(rss_of)
    }

    fn anon_bytes(&self) -> Option<u64> {
        self.pid.and_then(anon_of)
    }
}

/// The agent to measure: `--socket` (with `--agent-pid`), or a fresh agent
/// with `entries` and the `[svid]` table body `svid`.
fn target(params: &BenchParams, entries: &str, svid: &str) -> anyhow::Result<Target> {
    target_with_limits(params, entries, svid, "")
}

/// [`target`], with `limits` TOML lines added to a fresh agent's `[limits]`.
fn target_with_limits(
    params: &BenchParams,
    entries: &str,
    svid: &str,
    limits: &str,
) -> anyhow::Result<Target> {
    match &params.socket {
        Some(s) => Ok(Target {
            agent: None,
            socket: s.clone(),
            pid: params.agent_pid,
        }),
        None => {
            let agent = BenchAgent::start_with(tempfile::tempdir()?, entries, svid, limits, "")?;
            Ok(Target {
                socket: agent.socket.clone(),
                pid: Some(agent.child.id()),
                agent: Some(agent),
            })
        }
    }
}

async fn first_x509(
    c: &mut SpiffeWorkloadApiClient<Channel>,
) -> anyhow::Result<pb::X509svidResponse> {
    let mut stream = c
        .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
        .await?
        .into_inner();
    stream
        .message()
        .await?
        .context("stream ended without a message")
}

fn params_map(pairs: &[(&str, serde_json::Value)]) -> serde_json::Map<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Runs `clients` tasks for `duration`; each calls `op` in a loop and the
/// latency of every call is recorded.
async fn closed_loop<F, Fut>(
    clients: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<(Vec<Duration>, f64)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let (latencies, started, _) = run_clients(clients, duration, move |i| {
        let call = op(i);
        async move { call.await.map(|()| true) }
    })
    .await?;
    Ok((latencies, started.elapsed().as_secs_f64()))
}

/// Like [`closed_loop`], but `op` may answer `false` (nothing left to send):
/// that client stops, and the row's time ends with the last request.
async fn closed_loop_until<F, Fut>(
    clients: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<(Vec<Duration>, f64)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<bool>> + Send,
{
    let (latencies, started, end) = run_clients(clients, duration, op).await?;
    Ok((latencies, (end - started).as_secs_f64()))
}

/// The clients of [`closed_loop`] and [`closed_loop_until`]: every call's
/// latency, when they started and when the last call ended.
async fn run_clients<F, Fut>(
    clients: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<(Vec<Duration>, Instant, Instant)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<bool>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut last = started;
            while Instant::now() < deadline {
                let t = Instant::now();
                if !op(i).await? {
                    break;
                }
                last = Instant::now();
                lat.push(last - t);
            }
            Ok::<_, anyhow::Error>((lat, last))
        }));
    }
    let mut all = Vec::new();
    let mut end = started;
    for t in tasks {
        let (lat, last) = t.await??;
        all.extend(lat);
        end = end.max(last);
    }
    Ok((all, started, end))
}

/// One JWT-SVID for `audience` from the Workload API on `c`.
async fn jwt_svid(
    c: &mut SpiffeWorkloadApiClient<Channel>,
    audience: &str,
) -> anyhow::Result<String> {
    Ok(
        c.fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
            audience: vec![audience.into()],
            spiffe_id: String::new(),
        }))
        .await?
        .into_inner()
        .svids
        .into_iter()
        .next()
        .context("no JWT-SVID")?
        .svid,
    )
}

async fn x509_first(p: &BenchParams) -> anyhow::Result<BenchResult> {
    let target = target(p, &entry_for_me("bench/x509")?, "")?;
    // Warm the cache: the scenario measures a cached identity.
    first_x509(&mut client::connect(&target.socket).await?).await?;
    let socket = Arc::new(target.socket.clone());
    let cpu_before = target.cpu_seconds();
    let (latencies, seconds) = closed_loop(p.clients, p.duration, move |_| {
        let socket = socket.clone();
        async move {
            // A new workload each time: connect, attest, first message.
            let mut c = client::connect(&socket).await?;
            first_x509(&mut c).await?;
            Ok(())
        }
    })
    .await?;
    let extra = cpu_per_op_extra(&target, cpu_before, latencies.len());
    Ok(BenchResult {
        scenario: "x509-first".into(),
        params: params_map(&[
            ("clients", p.clients.into()),
            ("duration_s", p.duration.as_secs_f64().into()),
        ]),
        ops: latencies.len() as u64,
        seconds,
        latencies,
        agent_rss_bytes: target.rss_bytes(),
        extra,
    })
}

async fn x509_cold(p: &BenchParams) -> anyhow::Result<Vec<BenchResult>> {
    if p.socket.is_some() {
        eprintln!(
            "x509-cold: skipped with --socket (needs an agent configured with K fresh entries)"
        );
        return Ok(vec![]);
    }
    let k = p.identities.max(1);
    let mut entries = String::new();
    for i in 0..k {
        entries.push_str(&entry_for_me(&format!("bench/cold-{i}"))?);
    }
    const ROUNDS: usize = 3;
    let mut latencies = Vec::new();
    let mut total = 0.0;
    let mut rss = None;
    for _ in 0..ROUNDS {
        let agent = BenchAgent::start(&entries, "")?;
        let mut c = client::connect(&agent.socket).await?;
        // Attest first (a rejected validation), so only issuance is timed.
        let _ = c
            .validate_jwtsvid(pb::with_security_header(pb::ValidateJwtsvidRequest {
                audience: "x".into(),
                svid: "x".into(),
            }))
            .await;
        let t = Instant::now();
        let resp = first_x509(&mut c).await?;
        let took = t.elapsed();
        if resp.svids.len() != k {
            bail!("expected {k} SVIDs, got {}", resp.svids.len());
        }
        latencies.push(took);
        total += took.as_secs_f64();
        rss = agent.rss_bytes();
    }
    // The raw cost in this process: key generation + signing, same code.
    let authority = memory_authority()?;
    let raw_n = (k * ROUNDS).max(200);
    let t = Instant::now();
    for i in 0..raw_n {
        let id = spiffe::SpiffeId::new(format!("spiffe://example.org/raw/{i}"))?;
        std::hint::black_box(authority.issue_x509(&id, Duration::from_secs(3600))?);
    }
    let raw_rate = raw_n as f64 / t.elapsed().as_secs_f64();
    let rate = (k * ROUNDS) as f64 / total;
    let mut extra = serde_json::Map::new();
    extra.insert("raw_ops_per_sec".into(), round3(raw_rate).into());
    extra.insert("ratio_to_raw".into(), round3(rate / raw_rate).into());
    Ok(vec![BenchResult {
        scenario: "x509-cold".into(),
        params: params_map(&[("identities", k.into()), ("rounds", ROUNDS.into())]),
        ops: (k * ROUNDS) as u64,
        seconds: total,
        latencies,
        agent_rss_bytes: rss,
        extra,
    }])
}

async fn jwt_fetch(p: &BenchParams, unique_audiences: bool) -> anyhow::Result<BenchResult> {
    let target = target(p, &entry_for_me("bench/jwt")?, "")?;
    let mut clients = Vec::new();
    for _ in 0..p.clients {
        clients.push(client::connect(&target.socket).await?);
    }
    let clients = Arc::new(clients);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cpu_before = target.cpu_seconds();
    let (latencies, seconds) = closed_loop(p.clients, p.duration, move |i| {
        let mut c = clients[i].clone();
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            let audience = if unique_audiences {
                format!("bench-{n}")
            } else {
                "bench".to_string()
            };
            let r = c
                .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
                    audience: vec![audience],
                    spiffe_id: String::new(),
                }))
                .await?;
            anyhow::ensure!(!r.get_ref().svids.is_empty(), "no JWT-SVID");
            Ok(())
        }
    })
    .await?;
    let extra = cpu_per_op_extra(&target, cpu_before, latencies.len());
    Ok(BenchResult {
        scenario: "jwt-fetch".into(),
        params: params_map(&[
            ("clients", p.clients.into()),
            (
                "audiences",
                if unique_audiences { "unique" } else { "cached" }.into(),
            ),
        ]),
        ops: latencies.len() as u64,
        seconds,
        latencies,
        agent_rss_bytes: target.rss_bytes(),
        extra,
    })
}

/// The first message of a FetchWITSVID stream on `c` (the stream is then
/// dropped, as a workload that fetches once does).
async fn first_wit(
    c: &mut SpiffeWorkloadApiClient<Channel>,
) -> anyhow::Result<pb::WitsvidResponse> {
    let mut stream = c
        .fetch_witsvid(pb::with_security_header(pb::WitsvidRequest::default()))
        .await?
        .into_inner();
    let first = stream
        .message()
        .await?
        .context("stream ended without a message")?;
    anyhow::ensure!(!first.svids.is_empty(), "no WIT-SVID");
    Ok(first)
}

/// FetchWITSVID's first response for a cached identity: on an open
/// connection (`new_connection` false, beside jwt-fetch cached), or from a
/// new workload that connects and is attested first (beside x509-first).
/// `first_issue_ms`: the very first call, which generates the workload key
/// and signs the WIT-SVID.
async fn wit_fetch(p: &BenchParams, new_connection: bool) -> anyhow::Result<BenchResult> {
    let target = target(p, &entry_for_me("bench/wit")?, "")?;
    let mut warm = client::connect(&target.socket).await?;
    let t = Instant::now();
    first_wit(&mut warm).await?;
    let first_issue_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut clients = Vec::new();
    if !new_connection {
        for _ in 0..p.clients {
            clients.push(client::connect(&target.socket).await?);
        }
    }
    let clients = Arc::new(clients);
    let socket = Arc::new(target.socket.clone());
    let cpu_before = target.cpu_seconds();
    let (latencies, seconds) = closed_loop(p.clients, p.duration, move |i| {
        let socket = socket.clone();
        let open = clients.get(i).cloned();
        async move {
            let mut c = match open {
                Some(c) => c,
                None => client::connect(&socket).await?,
            };
            first_wit(&mut c).await?;
            Ok(())
        }
    })
    .await?;
    let mut extra = cpu_per_op_extra(&target, cpu_before, latencies.len());
    extra.insert("first_issue_ms".into(), first_issue_ms.into());
    Ok(BenchResult {
        scenario: "wit-fetch".into(),
        params: params_map(&[
            ("clients", p.clients.into()),
            (
                "connection",
                if new_connection { "new" } else { "open" }.into(),
            ),
        ]),
        ops: latencies.len() as u64,
        seconds,
        latencies,
        agent_rss_bytes: target.rss_bytes(),
        extra,
    })
}

async fn jwt_validate(p: &BenchParams) -> anyhow::Result<BenchResult> {
    let target = target(p, &entry_for_me("bench/jwt")?, "")?;
    let token = jwt_svid(&mut client::connect(&target.socket).await?, "bench").await?;
    let mut clients = Vec::new();
    for _ in 0..p.clients {
        clients.push(client::connect(&target.socket).await?);
    }
    let clients = Arc::new(clients);
    let token = Arc::new(token);
    let cpu_before = target.cpu_seconds();
    let (latencies, seconds) = closed_loop(p.clients, p.duration, move |i| {
        let mut c = clients[i].clone();
        let token = token.clone();
        async move {
            c.validate_jwtsvid(pb::with_security_header(pb::ValidateJwtsvidRequest {
                audience: "bench".into(),
                svid: token.to_string(),
            }))
            .await?;
            Ok(())
        }
    })
    .await?;
    let extra = cpu_per_op_extra(&target, cpu_before, latencies.len());
    Ok(BenchResult {
        scenario: "jwt-validate".into(),
        params: params_map(&[("clients", p.clients.into())]),
        ops: latencies.len() as u64,
        seconds,
        latencies,
        agent_rss_bytes: target.rss_bytes(),
        extra,
    })
}

/// Streams per HTTP/2 connection (below common max-concurrent-streams limits).
const STREAMS_PER_CONNECTION: usize = 100;

/// A digest of the X509-SVIDs (chains) in a response: tells a rotation from
/// a message that re-sends the same SVIDs (a bundle update, say).
fn svids_digest(r: &pb::X509svidResponse) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for s in &r.svids {
        s.x509_svid.hash(&mut h);
    }
    h.finish()
}

/// Opens `n` FetchX509SVID streams and waits for each first message, at most
/// `opening` at a time; returns the streams with the digest of their first
/// message's SVIDs, and the time it took.
async fn open_streams(
    socket: &Path,
    n: usize,
    opening: usize,
) -> anyhow::Result<(Vec<(tonic::Streaming<pb::X509svidResponse>, u64)>, Duration)> {
    let t = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..n.div_ceil(STREAMS_PER_CONNECTION) {
        conns.push(client::connect(socket).await?);
    }
    let opening = Arc::new(tokio::sync::Semaphore::new(opening.max(1)));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = conns[i / STREAMS_PER_CONNECTION].clone();
        let opening = opening.clone();
        tasks.push(tokio::spawn(async move {
            let _turn = opening.acquire_owned().await?;
            let mut s = c
                .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
                .await?
                .into_inner();
            let first = s.message().await?.context("no first message")?;
            Ok::<_, anyhow::Error>((s, svids_digest(&first)))
        }));
    }
    let mut streams = Vec::with_capacity(n);
    for t in tasks {
        streams.push(t.await??);
    }
    Ok((streams, t.elapsed()))
}

/// S streams open on one identity; the figure is how long the agent takes to
/// push the next renewed X509-SVID to all of them. Started by the bench, the
/// agent has a 10 s TTL (renewal 4-6 s after issue); a running agent must
/// give the bench's entry a TTL short enough to renew within
/// `--rotation-timeout`.
async fn fanout(p: &BenchParams) -> anyhow::Result<Vec<BenchResult>> {
    let target = target(p, &entry_for_me("bench/fanout")?, "x509_ttl = \"10s\"")?;
    let (streams, opened) = open_streams(&target.socket, p.streams, p.opening).await?;
    // The SVIDs the streams opened with (two sets if a renewal happened while
    // they were opening): the rotation measured is the first SVID set none
    // of them has seen, which reaches every stream as a push.
    let seen: Arc<std::collections::HashSet<u64>> =
        Arc::new(streams.iter().map(|(_, d)| *d).collect());
    let deadline = tokio::time::Instant::now() + p.rotation_timeout;
    let timeout = p.rotation_timeout;
    // The agent's CPU from the first renewed message's arrival to the last:
    // the push, without the wait for the renewal.
    let pid = target.pid;
    let cpu_at_first = Arc::new(std::sync::OnceLock::new());
    let mut tasks = Vec::with_capacity(streams.len());
    for (mut s, _) in streams {
        let seen = seen.clone();
        let cpu_at_first = cpu_at_first.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let m = tokio::time::timeout_at(deadline, s.message())
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "no renewed X509-SVID within {} (--rotation-timeout); is the SVID TTL short enough?",
                            humantime::format_duration(timeout)
                        )
                    })??
                    .context("stream ended")?;
                let digest = svids_digest(&m);
                if !seen.contains(&digest) {
                    let arrived = Instant::now();
                    cpu_at_first.get_or_init(|| pid.and_then(thread_cpu_seconds_of));
                    return Ok::<_, anyhow::Error>((arrived, digest));
                }
            }
        }));
    }
    let mut arrivals = Vec::with_capacity(tasks.len());
    for t in tasks {
        arrivals.push(t.await??);
    }
    let cpu_at_last = pid.and_then(thread_cpu_seconds_of);
    if arrivals.iter().any(|(_, d)| *d != arrivals[0].1) {
        bail!(
            "the SVID was renewed twice while the streams waited; lengthen its TTL beyond the push time"
        );
    }
    let mut arrivals: Vec<Instant> = arrivals.into_iter().map(|(t, _)| t).collect();
    arrivals.sort();
    let first = arrivals[0];
    let latencies: Vec<Duration> = arrivals.iter().map(|a| *a - first).collect();
    let all = latencies.last().copied().unwrap_or_default();
    let mut extra = serde_json::Map::new();
    extra.insert(
        "all_updated_ms".into(),
        round3(all.as_secs_f64() * 1000.0).into(),
    );
    extra.insert("open_seconds".into(), round3(opened.as_secs_f64()).into());
    insert_cpu_per_op(
        &mut extra,
        cpu_at_first.get().copied().flatten(),
        cpu_at_last,
        arrivals.len(),
    );
    Ok(vec![BenchResult {
        scenario: "fanout".into(),
        params: params_map(&[("streams", p.streams.into())]),
        ops: arrivals.len() as u64,
        seconds: all.as_secs_f64(),
        latencies,
        agent_rss_bytes: target.rss_bytes(),
        extra,
    }])
}

/// Agent memory with S idle FetchX509SVID streams open. Started by the
/// bench, the agent also caches I identities for a second workload; a
/// running agent is measured as it is (start it fresh for a fair figure).
async fn idle_memory(p: &BenchParams) -> anyhow::Result<Vec<BenchResult>> {
    // A second workload, this binary copied elsewhere, holds I identities.
    let holder_dir = tempfile::tempdir()?;
    let holder = holder_dir.path().join("tessera-holder");
    let identities = if p.socket.is_some() { 0 } else { p.identities };
    let uid = nix::unistd::geteuid();
    let mut entries = entry_for_me("bench/idle")?;
    if identities > 0 {
        std::fs::copy(std::env::current_exe()?, &holder)?;
    }
    for i in 0..identities {
        entries.push_str(&format!(
            "[[entries]]\nspiffe_id = \"spiffe://example.org/bench/held-{i}\"\nselectors = [\"unix:uid:{uid}\", \"unix:path:{}\"]\n",
            holder.display()
        ));
    }
    let target = target(p, &entries, "")?;
    let baseline = target.rss_bytes();
    let baseline_anon = target.anon_bytes();
    let mut held = None;
    if identities > 0 {
        let mut child = Command::new(&holder)
            .args(["api", "watch", "--socket"])
            .arg(&target.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut out = std::io::BufReader::new(child.stdout.take().context("holder stdout")?);
        let mut line = String::new();
        loop {
            line.clear();
            if std::io::BufRead::read_line(&mut out, &mut line)? == 0 {
                bail!("the identity holder exited");
            }
            if line.starts_with("Received") {
                break;
            }
        }
        held = Some((child, out));
    }
    let with_identities = target.rss_bytes();
    let (streams, opened) = open_streams(&target.socket, p.streams, p.opening).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = target.rss_bytes();
    drop(streams);
    if let Some((mut child, _)) = held {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut extra = serde_json::Map::new();
    extra.insert(
        "baseline_rss_bytes".into(),
        baseline.map_or(serde_json::Value::Null, Into::into),
    );
    extra.insert(
        "baseline_anon_bytes".into(),
        baseline_anon.map_or(serde_json::Value::Null, Into::into),
    );
    if let (Some(before), Some(after)) = (with_identities, rss) {
        extra.insert(
            "rss_per_stream_bytes".into(),
            (after.saturating_sub(before) / p.streams.max(1) as u64).into(),
        );
    }
    Ok(vec![BenchResult {
        scenario: "idle-memory".into(),
        params: params_map(&[
            ("streams", p.streams.into()),
            ("identities", identities.into()),
        ]),
        ops: p.streams as u64,
        seconds: opened.as_secs_f64(),
        latencies: Vec::new(),
        agent_rss_bytes: rss,
        extra,
    }])
}

/// From registering a new entry to the workload's first SVID for it: an
/// open FetchX509SVID stream waits for the message that carries the new
/// SPIFFE ID. The bench's own agent is told by appending to its config and
/// SIGHUP; a running agent by `--register-command`. One operation per round.
async fn new_entry(p: &BenchParams) -> anyhow::Result<Vec<BenchResult>> {
    if p.socket.is_some() && p.register_command.is_none() {
        eprintln!(
            "new-entry: skipped with --socket unless --register-command says how to add an entry"
        );
        return Ok(vec![]);
    }
    let target = target(p, &entry_for_me("bench/new-entry")?, "")?;
    let run_id = std::process::id();
    let mut latencies = Vec::with_capacity(p.rounds);
    let mut register = Vec::with_capacity(p.rounds);
    for round in 0..p.rounds.max(1) {
        let id = format!("spiffe://example.org/bench/new-{run_id}-{round}");
        let mut c = client::connect(&target.socket).await?;
        let mut stream = c
            .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
            .await?
            .into_inner();
        stream.message().await?.context("no first message")?;
        let t = Instant::now();
        match (&target.agent, &p.register_command) {
            (Some(agent), _) => {
                let path = std::env::current_exe()?;
                agent.add_entries(&format!(
                    "[[entries]]\nspiffe_id = \"{id}\"\nselectors = [\"unix:uid:{}\", \"unix:path:{}\"]\n",
                    nix::unistd::geteuid(),
                    path.display()
                ))?;
            }
            (None, Some(command)) => {
                let status = Command::new("sh")
                    .args(["-c", command])
                    .env("TESSERA_BENCH_NEW_ID", &id)
                    .stdout(Stdio::null())
                    .status()
                    .context("running --register-command")?;
                if !status.success() {
                    bail!("--register-command failed ({status}) for {id}");
                }
            }
            (None, None) => unreachable!("checked above"),
        }
        let registered = Instant::now();
        register.push(registered - t);
        loop {
            let m = tokio::time::timeout(p.rotation_timeout, stream.message())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "{id} not delivered within {} (--rotation-timeout)",
                        humantime::format_duration(p.rotation_timeout)
                    )
                })??
                .context("stream ended")?;
            if m.svids.iter().any(|s| s.spiffe_id == id) {
                latencies.push(registered.elapsed());
                break;
            }
        }
    }
    register.sort();
    let mut extra = serde_json::Map::new();
    extra.insert(
        "register_p50_ms".into(),
        round3(register[register.len() / 2].as_secs_f64() * 1000.0).into(),
    );
    let seconds = latencies.iter().map(Duration::as_secs_f64).sum();
    Ok(vec![BenchResult {
        scenario: "new-entry".into(),
        params: params_map(&[("rounds", latencies.len().into())]),
        ops: latencies.len() as u64,
        seconds,
        latencies,
        agent_rss_bytes: target.rss_bytes(),
        extra,
    }])
}

/// Writes `n` Cedar policies: one permits this bench process `bench:read` on
/// `bench-api`; the rest are realistic but unrelated (one per audience and
/// action), so the scenario shows what slicing saves.
fn write_bench_policies(dir: &Path, n: usize) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let uid = nix::unistd::geteuid();
    let mut text = format!(
        "@id(\"bench\")\n@max_ttl(\"5m\")\npermit(principal, action == Tessera::Action::\"bench:read\", resource == Tessera::Audience::\"bench-api\")\nwhen {{ principal.selectors.contains(\"unix:uid:{uid}\") }};\n"
    );
    for j in 1..n {
        let _ = write!(
            text,
            "@id(\"filler-{j}\")\npermit(principal, action == Tessera::Action::\"scope-{j}:read\", resource == Tessera::Audience::\"svc-{j}\")\nwhen {{ principal.selectors.contains(\"unix:uid:{uid}\") && context.delegation_depth == 0 }};\n"
        );
    }
    std::fs::write(dir.join("bench.cedar"), text)?;
    Ok(())
}

/// The sending half of one keep-alive HTTP/1.1 connection.
type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Full<prost::bytes::Bytes>>;

/// HTTP/1.1 over `io`, its connection driven on a task of its own.
async fn http1<I>(io: I) -> anyhow::Result<Sender>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One keep-alive HTTP/1.1 connection to the exchange socket.
async fn exchange_conn(socket: &Path) -> anyhow::Result<Sender> {
    http1(tokio::net::UnixStream::connect(socket).await?).await
}

/// `POST /token` with the form `body` on `conn`; `what` names the request
/// in the error when it is refused.
async fn post_token(conn: &mut Sender, host: &str, body: String, what: &str) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let req = http::Request::post("/token")
        .header(http::header::HOST, host)
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(http_body_util::Full::new(prost::bytes::Bytes::from(body)))?;
    let resp = conn.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "{what} failed ({status}): {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(())
}

async fn exchange(p: &BenchParams) -> anyhow::Result<Vec<BenchResult>> {
    if p.socket.is_some() {
        eprintln!("exchange: skipped with --socket (needs an agent with P generated policies)");
        return Ok(vec![]);
    }
    let n_policies = p.policies.max(1);
    let dir = tempfile::tempdir()?;
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir(&policy_dir)?;
    write_bench_policies(&policy_dir, n_policies)?;
    let xsock = dir.path().join("exchange.sock");
    let extra = format!(
        "[exchange]\nsocket_path = \"{}\"\npolicy_dir = \"{}\"\naudit_commit_delay = \"{}us\"\n",
        xsock.display(),
        policy_dir.display(),
        p.audit_commit_delay.as_micros()
    );
    let agent = BenchAgent::start_in(dir, &entry_for_me("bench/exchange")?, "", &extra)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !xsock.exists() {
        if Instant::now() > deadline {
            bail!("the exchange socket did not appear");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let issuer = "spiffe://example.org/tessera";
    let svid = jwt_svid(&mut client::connect(&agent.socket).await?, issuer).await?;
    let mut conns = Vec::new();
    for _ in 0..p.clients {
        conns.push(tokio::sync::Mutex::new(exchange_conn(&xsock).await?));
    }
    let conns = Arc::new(conns);
    let svid = Arc::new(svid);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cpu_before = agent.cpu_seconds();
    let (latencies, seconds) = closed_loop(p.clients, p.duration, move |i| {
        let conns = conns.clone();
        let svid = svid.clone();
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            let body = client::form(&[
                ("grant_type", crate::exchange::request::GRANT_TOKEN_EXCHANGE),
                ("subject_token", &svid),
                (
                    "subject_token_type",
                    crate::exchange::request::TOKEN_TYPE_JWT,
                ),
                ("audience", "bench-api"),
                ("scope", "bench:read"),
                ("task_id", &format!("bench-{n}")),
            ]);
            let mut conn = conns[i].lock().await;
            post_token(&mut conn, "localhost", body, "exchange").await
        }
    })
    .await?;
    let cpu_after = agent.cpu_seconds();
    let rss = agent.rss_bytes();

    // Raw costs in this process, same code: one sliced policy decision over
    // the same policies, and one ES256 signature of a token-sized claim set.
    let store =
        crate::exchange::policy::PolicyStore::load(Some(&agent._dir.path().join("policies")))?;
    let selectors = vec![format!("unix:uid:{}", nix::unistd::geteuid())];
    let scopes = vec!["bench:read".to_string()];
    // Timed as this thread's CPU, like the agent's figure: wall time
    // would count preemption by whatever else shares the cores.
    let raw_n = 20_000;
    let t = thread_cpu_seconds()?;
    for _ in 0..raw_n {
        let d = store.evaluate(&crate::exchange::policy::PolicyRequest {
            principal: "spiffe://example.org/bench/exchange",
            selectors: &selectors,
            audience: "bench-api",
            scopes: &scopes,
            task_id: "bench",
            requested_ttl_secs: 300,
            delegation_depth: 0,
            delegator: None,
            approved: false,
        });
        anyhow::ensure!(
            d.scopes.first().is_some_and(|s| s.allowed),
            "bench policy must permit"
        );
        std::hint::black_box(d);
    }
    let decision_us = (thread_cpu_seconds()? - t) * 1e6 / raw_n as f64;
    let authority = memory_authority()?;
    let key = authority.access_signing_key()?;
    let claims = serde_json::json!({
        "iss": issuer, "sub": "spiffe://example.org/bench/exchange", "aud": "bench-api",
        "client_id": "spiffe://example.org/bench/exchange", "scope": "bench:read",
        "iat": 1, "nbf": 1, "exp": 2, "jti": "AAAAAAAAAAAAAAAAAAAAAA", "txn": "bench",
        "cnf": {"x5t#S256": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
    });
    let sign_n = 5_000;
    let t = thread_cpu_seconds()?;
    for _ in 0..sign_n {
        std::hint::black_box(key.sign(&claims)?);
    }
    let sign_us = (thread_cpu_seconds()? - t) * 1e6 / sign_n as f64;
    let mut extra = serde_json::Map::new();
    extra.insert("raw_decision_us".into(), round3(decision_us).into());
    extra.insert("raw_es256_sign_us".into(), round3(sign_us).into());
    insert_cpu_per_op(&mut extra, cpu_before, cpu_after, latencies.len());
    // The floor an exchange cannot go below (one decision, one signature)
    // and the agent's CPU per exchange as a multiple of it.
    let floor_us = decision_us + sign_us;
    extra.insert("raw_floor_us".into(), round3(floor_us).into());
    if let Some(cpu) = extra.get("agent_cpu_us_per_op").and_then(|v| v.as_f64()) {
        extra.insert("agent_cpu_over_floor".into(), round3(cpu / floor_us).into());
    }
    Ok(vec![BenchResult {
        scenario: "exchange".into(),
        params: params_map(&[
            ("clients", p.clients.into()),
            ("policies", n_policies.into()),
            (
                "audit_commit_delay_us",
                (p.audit_commit_delay.as_micros() as u64).into(),
            ),
        ]),
        ops: latencies.len() as u64,
        seconds,
        latencies,
        agent_rss_bytes: rss,
        extra,
    }])
}
