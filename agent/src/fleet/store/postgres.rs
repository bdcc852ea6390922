//! The fleet store on PostgreSQL (`[server.store] kind = "postgres"`): for
//! fleets outside Kubernetes, on a database operators already run (and make
//! highly available their usual way).
//!
//! Tables (all named `tessera_*`, in the connection's default schema; the
//! schema is created and migrated at start, see [`migrate`]):
//!
//! * `tessera_revocation_batches`: one row per batch (`seq`, `expires`,
//!   `writer`, `entries` as JSON). `seq` is the cursor nodes resume from.
//!   Writers take a transaction-scoped advisory lock before drawing `seq`,
//!   so rows commit in `seq` order: a reader that has seen `seq = n` has
//!   seen every row below it, and a watcher asking for `seq > n` never
//!   skips one.
//! * `tessera_join_tokens` (`hash`, `node`, `expires`): redeeming is one
//!   `DELETE ... RETURNING`, so exactly one replica gets a token.
//! * `tessera_node_denials` (`name`, `node_name`, `node_kind`,
//!   `svid_serial`, `reason`): what every replica enforces.
//! * `tessera_entries`: live registration entries ([`entries`]).
//!
//! Every table with a change feed has a statement trigger that sends a
//! `NOTIFY` on its channel; each replica `LISTEN`s on a connection of its
//! own per feed and reads what changed when woken, and also every
//! [`POLL`] in case a notification is lost (a connection pooler in
//! transaction mode drops them). A lost connection is reopened with
//! backoff and the feed resumes from its cursor.

pub mod approvals;
pub mod entries;
pub mod foreign_bundles;
pub mod nodes;
pub mod tls;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

pub use self::nodes::PgNodes;
pub use self::tls::TlsFiles;
use super::{Backend, Batch, StoreError, StoreFuture, StoreMetrics, View};
use crate::revocation::Record;

/// How `[server.store]` reaches the database.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// A libpq connection URL or key/value string, without a password.
    pub url: String,
    /// Read at each connection (so a rotated password is picked up).
    pub password_file: Option<PathBuf>,
    /// Create or upgrade the schema at start (the role must own it); with
    /// `false` the schema must already be at this version.
    pub migrate: bool,
    /// TLS to the database, the server verified against these files; `None`:
    /// no TLS (a Unix socket or a private network).
    pub tls: Option<TlsFiles>,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.url)
            .field("password_file", &self.password_file)
            .field("migrate", &self.migrate)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Checks a `url` value: parses, carries no password, and asks for TLS
/// exactly when `tls` (`server.store.tls_ca_file`) is set. The error names
/// what is wrong.
pub fn check_url(url: &str, tls: bool) -> Result<(), String> {
    if url.contains("sslmode=verify-") {
        return Err(
            "sslmode=verify-full and verify-ca are libpq's: set server.store.tls_ca_file instead (the server's certificate and host name are then always verified) and leave sslmode out or at require"
                .into(),
        );
    }
    let parsed: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("not a PostgreSQL connection string: {e}"))?;
    if parsed.get_password().is_some() {
        return Err(
            "holds a password; put it in server.store.password_file instead (the config file is not a secret)"
                .into(),
        );
    }
    if parsed.get_hosts().is_empty() {
        return Err("names no host (host=... or postgresql://HOST/...)".into());
    }
    match (parsed.get_ssl_mode(), tls) {
        (SslMode::Require, false) => Err(
            "sslmode=require needs server.store.tls_ca_file, the CA the database's certificate is verified against (docs/postgres.md)"
                .into(),
        ),
        (SslMode::Disable, true) => Err(
            "sslmode=disable contradicts server.store.tls_ca_file: remove one of them".into(),
        ),
        (_, true)
            if parsed
                .get_hosts()
                .iter()
                .any(|h| matches!(h, tokio_postgres::config::Host::Unix(_))) =>
        {
            Err("names a Unix socket: TLS (server.store.tls_ca_file) is for TCP hosts; a local socket needs none".into())
        }
        _ => Ok(()),
    }
}

/// Longest wait for one statement or one connection.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How often a feed reads its table even without a notification.
pub const POLL: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Advisory lock keys (arbitrary, constant): schema migrations and
/// revocation writes.
const MIGRATION_LOCK: i64 = 0x7465_7373_6572_6101;
const WRITE_LOCK: i64 = 0x7465_7373_6572_6102;

/// The schema, one migration per version, applied in order once each.
const MIGRATIONS: &[&str] = &[
    // 1: revocations, join tokens, node denials, live entries.
    r#"
CREATE OR REPLACE FUNCTION tessera_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify(TG_ARGV[0], '');
  RETURN NULL;
END $$;

CREATE SEQUENCE tessera_revocation_seq;
CREATE TABLE tessera_revocation_batches (
  seq bigint PRIMARY KEY,
  expires bigint NOT NULL,
  writer text NOT NULL DEFAULT '',
  entries jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tessera_revocation_batches_expires ON tessera_revocation_batches (expires);
CREATE TRIGGER tessera_revocations_notify AFTER INSERT ON tessera_revocation_batches
  FOR EACH STATEMENT EXECUTE FUNCTION tessera_notify('tessera_revocations');

CREATE TABLE tessera_join_tokens (
  hash text PRIMARY KEY CHECK (hash ~ '^[0-9a-f]{64}$'),
  node text NOT NULL,
  expires bigint NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tessera_node_denials (
  name text PRIMARY KEY,
  node_name text,
  node_kind text CHECK (node_kind IN ('k8s', 'join')),
  svid_serial text,
  reason text NOT NULL DEFAULT '',
  created_at timestamptz NOT NULL DEFAULT now(),
  CHECK (node_name IS NOT NULL OR svid_serial IS NOT NULL)
);
CREATE TRIGGER tessera_node_denials_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
  ON tessera_node_denials
  FOR EACH STATEMENT EXECUTE FUNCTION tessera_notify('tessera_node_denials');

CREATE TABLE tessera_entries (
  scope text NOT NULL CHECK (scope IN ('cluster', 'namespaced')),
  namespace text NOT NULL DEFAULT '',
  name text NOT NULL,
  spec jsonb NOT NULL,
  generation bigint NOT NULL DEFAULT 1,
  status text NOT NULL DEFAULT 'Pending',
  message text NOT NULL DEFAULT '',
  observed_generation bigint NOT NULL DEFAULT 0,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (scope, namespace, name),
  CHECK ((scope = 'cluster') = (namespace = ''))
);
CREATE FUNCTION tessera_entries_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.spec IS DISTINCT FROM OLD.spec THEN
    NEW.generation := OLD.generation + 1;
    NEW.updated_at := now();
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER tessera_entries_generation BEFORE UPDATE OF spec ON tessera_entries
  FOR EACH ROW EXECUTE FUNCTION tessera_entries_generation();
CREATE TRIGGER tessera_entries_notify AFTER INSERT OR UPDATE OF spec OR DELETE OR TRUNCATE
  ON tessera_entries
  FOR EACH STATEMENT EXECUTE FUNCTION tessera_notify('tessera_entries');
"#,
    // 2: nodes' pending approvals, decided by operators at the authority.
    r#"
CREATE TABLE tessera_approvals (
  name text PRIMARY KEY,
  node text NOT NULL,
  approval_id text NOT NULL,
  deadline bigint NOT NULL,
  request jsonb NOT NULL,
  decision text CHECK (decision IN ('approved', 'denied')),
  decided_by text CHECK (decided_by LIKE 'spiffe://%'),
  decided_at timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (node, approval_id),
  CHECK ((decision IS NULL) = (decided_by IS NULL))
);
CREATE INDEX tessera_approvals_deadline ON tessera_approvals (deadline);
CREATE TRIGGER tessera_approvals_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
  ON tessera_approvals
  FOR EACH STATEMENT EXECUTE FUNCTION tessera_notify('tessera_approvals');
"#,
    // 3: foreign trust domains' bundles as last fetched ([[federation]]),
    // read by every replica at start.
    r#"
CREATE TABLE tessera_foreign_bundles (
  trust_domain text PRIMARY KEY,
  bundle text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
"#,
];

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// A `NOTIFY` channel's notifications, ended when the connection is lost.
type Messages = Pin<Box<dyn futures_util::Stream<Item = AsyncMessage> + Send>>;

/// Drives a connection whose notifications nobody wants, until it ends.
fn drive(mut messages: Messages) {
    tokio::spawn(async move {
        use futures_util::StreamExt;
        while messages.next().await.is_some() {}
    });
}

/// One database, shared by the store's parts on a replica: a connection
/// for statements (reopened when lost), and one per feed.
pub struct Database {
    config: DatabaseConfig,
    parsed: tokio_postgres::Config,
    shared: tokio::sync::Mutex<Option<Arc<Client>>>,
}

fn db_error(e: tokio_postgres::Error) -> StoreError {
    let text = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        // With its causes: "error performing TLS handshake" alone does not
        // say which certificate check failed.
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text = format!("{text}: {c}");
                cause = c.source();
            }
            text
        }
    };
    match e.code().map(|c| c.code()) {
        // Class 42 (a missing table, a missing privilege) and 28 (the role
        // cannot log in) need an operator, not a retry.
        Some(code) if code.starts_with("42") || code.starts_with("28") => StoreError::Refused(text),
        _ => StoreError::Unavailable(text),
    }
}

async fn timed<T>(
    what: &str,
    f: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(r) => r.map_err(db_error),
        Err(_) => Err(StoreError::Unavailable(format!(
            "{what}: no answer from the database within {TIMEOUT:?}"
        ))),
    }
}

/// A connection's messages (notifications) as a stream; polling it drives
/// the connection.
fn messages_of<S, T>(mut connection: tokio_postgres::Connection<S, T>) -> Messages
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(futures_util::stream::poll_fn(move |cx| {
        match connection.poll_message(cx) {
            std::task::Poll::Ready(Some(Ok(m))) => std::task::Poll::Ready(Some(m)),
            std::task::Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "the database connection ended");
                std::task::Poll::Ready(None)
            }
            std::task::Poll::Ready(None) => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }))
}

impl Database {
    /// Connects once (so a wrong URL, password or privilege fails the
    /// start, naming the key) and brings the schema to [`SCHEMA_VERSION`].
    pub async fn open(config: DatabaseConfig) -> Result<Arc<Self>, StoreError> {
        Self::open_at(config, SCHEMA_VERSION).await
    }

    /// [`open`](Self::open), with the schema brought no further than
    /// `version`: the database as a replica of an older release leaves it,
    /// for upgrade tests.
    #[doc(hidden)]
    pub async fn open_at_version(
        config: DatabaseConfig,
        version: i32,
    ) -> Result<Arc<Self>, StoreError> {
        Self::open_at(config, version.clamp(0, SCHEMA_VERSION)).await
    }

    async fn open_at(config: DatabaseConfig, version: i32) -> Result<Arc<Self>, StoreError> {
        let mut parsed: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e| StoreError::Refused(format!("url: {e}")))?;
        if parsed.get_connect_timeout().is_none() {
            parsed.connect_timeout(TIMEOUT);
        }
        if parsed.get_application_name().is_none() {
            parsed.application_name("tessera-authority");
        }
        // A peer that vanished (no FIN) is noticed within a minute.
        parsed.keepalives_idle(Duration::from_secs(30));
        if let Some(tls) = &config.tls {
            // Never "prefer": a server that declines TLS is refused.
            parsed.ssl_mode(SslMode::Require);
            // Unreadable files fail the start, naming the key.
            tls.client_config().map_err(StoreError::Refused)?;
        }
        let db = Arc::new(Self {
            config,
            parsed,
            shared: tokio::sync::Mutex::new(None),
        });
        let (mut client, messages) = db.connect().await?;
        drive(messages);
        migrate(&mut client, db.config.migrate, version).await?;
        Ok(db)
    }

    /// A new connection, its messages (notifications) as a stream, which
    /// must be polled for the connection to make progress.
    async fn connect(&self) -> Result<(Client, Messages), StoreError> {
        let mut config = self.parsed.clone();
        if let Some(path) = &self.config.password_file {
            let text = tokio::fs::read_to_string(path).await.map_err(|e| {
                StoreError::Refused(format!("password_file {}: {e}", path.display()))
            })?;
            config.password(text.trim_end_matches(['\r', '\n']));
        }
        match &self.config.tls {
            None => {
                let (client, connection) = timed("connect", config.connect(NoTls)).await?;
                Ok((client, messages_of(connection)))
            }
            Some(files) => {
                let tls = tls::MakeRustls(files.client_config().map_err(StoreError::Unavailable)?);
                let (client, connection) = timed("connect", config.connect(tls)).await?;
                Ok((client, messages_of(connection)))
            }
        }
    }

    /// The connection for statements, reopened if it was lost.
    pub async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut shared = self.shared.lock().await;
        if let Some(c) = shared.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let (client, messages) = self.connect().await?;
        drive(messages);
        let client = Arc::new(client);
        *shared = Some(client.clone());
        Ok(client)
    }

    /// A connection of its own that `LISTEN`s on `channel`.
    async fn listen(
        &self,
        channel: &'static str,
        shutdown: &CancellationToken,
    ) -> Result<Listener, StoreError> {
        let (client, mut messages) = self.connect().await?;
        let (tx, notified) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(m) = messages.next().await {
                if matches!(m, AsyncMessage::Notification(_)) && tx.send(()).is_err() {
                    return;
                }
            }
        });
        timed("LISTEN", client.batch_execute(&format!("LISTEN {channel}"))).await?;
        Ok(Listener {
            client,
            notified,
            shutdown: shutdown.clone(),
        })
    }
}

/// A connection listening on one channel.
pub struct Listener {
    pub client: Client,
    notified: mpsc::UnboundedReceiver<()>,
    shutdown: CancellationToken,
}

/// Why a feed's wait ended.
pub enum Wake {
    /// Something may have changed: read again.
    Read,
    /// The connection is gone: follow on a new one.
    Lost(StoreError),
    /// The authority is stopping.
    Stop,
}

impl Listener {
    /// Waits for a notification or [`POLL`]. Notifications that came in a
    /// burst count once.
    pub async fn wait(&mut self) -> Wake {
        tokio::select! {
            _ = self.shutdown.cancelled() => Wake::Stop,
            n = self.notified.recv() => {
                if n.is_none() {
                    return Wake::Lost(StoreError::Unavailable("the listening connection was lost".into()));
                }
                while self.notified.try_recv().is_ok() {}
                Wake::Read
            }
            _ = tokio::time::sleep(POLL) => if self.client.is_closed() {
                Wake::Lost(StoreError::Unavailable("the listening connection was lost".into()))
            } else {
                Wake::Read
            },
        }
    }
}

/// Opens listening connections on one channel for a feed, again and again
/// with backoff when one is lost, until `shutdown`: what every table's
/// watcher runs on.
pub struct Follower {
    db: Arc<Database>,
    channel: &'static str,
    shutdown: CancellationToken,
    backoff: Duration,
    failing: bool,
}

impl Follower {
    pub fn new(db: Arc<Database>, channel: &'static str, shutdown: CancellationToken) -> Self {
        Self {
            db,
            channel,
            shutdown,
            backoff: Duration::from_millis(100),
            failing: false,
        }
    }

    /// The next listening connection; `None` once the authority stops.
    pub async fn next(&mut self) -> Option<Listener> {
        loop {
            if self.shutdown.is_cancelled() {
                return None;
            }
            match self.db.listen(self.channel, &self.shutdown).await {
                Ok(l) => {
                    if self.failing {
                        tracing::info!(
                            channel = self.channel,
                            "the fleet store's database is reachable again"
                        );
                        self.failing = false;
                    }
                    self.backoff = Duration::from_millis(100);
                    return Some(l);
                }
                Err(e) => self.lost(e).await,
            }
        }
    }

    /// The feed's connection failed with `e`: waits before the next one.
    pub async fn lost(&mut self, e: StoreError) {
        if !self.failing {
            tracing::warn!(channel = self.channel, error = %e, "lost the fleet store's database; reconnecting");
            self.failing = true;
        }
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            _ = tokio::time::sleep(self.backoff) => {}
        }
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// Follows a table that is read whole (it holds few rows): hands out its
/// listening connection to read on, once at each (re)connection and again
/// at every notification and every [`POLL`]; a lost connection, or a read
/// that failed, is followed on a new one after the [`Follower`]'s backoff.
/// What the approvals, node denials and live entries are read with.
pub struct TableFollower {
    follower: Follower,
    listener: Option<Listener>,
}

impl TableFollower {
    pub fn new(db: Arc<Database>, channel: &'static str, shutdown: CancellationToken) -> Self {
        Self {
            follower: Follower::new(db, channel, shutdown),
            listener: None,
        }
    }

    /// The connection to read the table on now; `None` once the authority
    /// stops.
    pub async fn next(&mut self) -> Option<&Client> {
        loop {
            let Some(l) = self.listener.as_mut() else {
                self.listener = Some(self.follower.next().await?);
                break;
            };
            match l.wait().await {
                Wake::Read => break,
                Wake::Lost(e) => self.failed(e).await,
                Wake::Stop => return None,
            }
        }
        self.listener.as_ref().map(|l| &l.client)
    }

    /// Reading the table failed with `e`: the next read is on a new
    /// connection, after a backoff.
    pub async fn failed(&mut self, e: StoreError) {
        self.listener = None;
        self.follower.lost(e).await;
    }
}

/// Brings the schema to `target` (normally [`SCHEMA_VERSION`]). Replicas
/// starting together serialize on an advisory lock, so each migration runs
/// once and none fails.
async fn migrate(client: &mut Client, allowed: bool, target: i32) -> Result<(), StoreError> {
    let tx = timed("BEGIN", client.transaction()).await?;
    timed(
        "migration lock",
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]),
    )
    .await?;
    let exists: bool = timed(
        "schema version",
        tx.query_one(
            "SELECT to_regclass('tessera_schema_migrations') IS NOT NULL",
            &[],
        ),
    )
    .await?
    .get(0);
    let current: i32 = if exists {
        timed(
            "schema version",
            tx.query_one(
                "SELECT coalesce(max(version), 0) FROM tessera_schema_migrations",
                &[],
            ),
        )
        .await?
        .get(0)
    } else {
        0
    };
    if current > SCHEMA_VERSION {
        tracing::warn!(
            current,
            known = SCHEMA_VERSION,
            "the fleet store's schema is newer than this authority; running on it (migrations only add)"
        );
        return Ok(());
    }
    if current >= target {
        return Ok(());
    }
    if !allowed {
        return Err(StoreError::Refused(format!(
            "the schema is at version {current}, this authority needs {target}: start one replica with migrate = true as the schema's owner first"
        )));
    }
    timed(
        "create tessera_schema_migrations",
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS tessera_schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        ),
    )
    .await?;
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target as usize)
        .skip(current as usize)
    {
        let version = i as i32 + 1;
        timed("migration", tx.batch_execute(sql)).await?;
        timed(
            "migration",
            tx.execute(
                "INSERT INTO tessera_schema_migrations (version) VALUES ($1)",
                &[&version],
            ),
        )
        .await?;
        tracing::info!(version, "fleet store schema migrated");
    }
    timed("COMMIT", tx.commit()).await
}

/// Revocation batches as rows of `tessera_revocation_batches`.
pub struct PgBackend {
    db: Arc<Database>,
    metrics: StoreMetrics,
    /// This replica (its host name), recorded in what it writes.
    writer: String,
}

impl PgBackend {
    pub fn new(db: Arc<Database>, metrics: StoreMetrics) -> Self {
        let writer = std::env::var("HOSTNAME").unwrap_or_default();
        Self {
            db,
            metrics,
            writer,
        }
    }

    /// Reads every batch after `cursor` into `view`; the new cursor.
    async fn catch_up(
        &self,
        client: &Client,
        view: &View,
        mut cursor: i64,
    ) -> Result<i64, StoreError> {
        const PAGE: i64 = 200;
        loop {
            let rows = timed(
                "read revocations",
                client.query(
                    "SELECT seq, expires, entries::text FROM tessera_revocation_batches WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&cursor, &PAGE],
                ),
            )
            .await;
            self.metrics.count("list", rows.is_ok());
            let rows = rows?;
            for row in &rows {
                let (seq, expires, entries): (i64, i64, String) =
                    (row.get(0), row.get(1), row.get(2));
                cursor = seq;
                match batch_of(seq, expires, &entries) {
                    Some(b) => view.add(b),
                    None => {
                        tracing::warn!(seq, "ignoring a revocation batch that is not well-formed")
                    }
                }
            }
            if (rows.len() as i64) < PAGE {
                return Ok(cursor);
            }
        }
    }
}

/// A row as a batch, if it is one we can read.
fn batch_of(seq: i64, expires: i64, entries: &str) -> Option<Batch> {
    let records: Vec<Record> = serde_json::from_str(entries).ok()?;
    Some(Batch {
        cursor: u64::try_from(seq).ok()?,
        name: seq.to_string(),
        expires: u64::try_from(expires).ok()?,
        records: records
            .into_iter()
            .filter(|r| r.validate().is_ok())
            .collect(),
    })
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Backend for PgBackend {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn write_batch<'a>(&'a self, records: &'a [Record], expires: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let entries = serde_json::to_string(records)
                .map_err(|e| StoreError::Refused(format!("revocations as JSON: {e}")))?;
            let client = self.db.client().await?;
            // One statement, so one round trip and one transaction: the lock
            // (held to commit) is taken before `nextval`, so rows commit in
            // `seq` order.
            timed(
                "write revocations",
                client.execute(
                    "INSERT INTO tessera_revocation_batches (seq, expires, writer, entries) \
                     SELECT nextval('tessera_revocation_seq'), $2, $3, ($4::text)::jsonb \
                     FROM (SELECT pg_advisory_xact_lock($1)) AS serialized",
                    &[&WRITE_LOCK, &as_i64(expires), &self.writer, &entries],
                ),
            )
            .await
            .map(|_| ())
        })
    }

    fn collect_expired<'a>(&'a self, view: &'a View, now: u64) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let gone = view.expired(now);
            let client = self.db.client().await?;
            timed(
                "delete expired revocations",
                client.execute(
                    "DELETE FROM tessera_revocation_batches WHERE expires < $1",
                    &[&as_i64(now)],
                ),
            )
            .await?;
            // No change feed for deletes: every replica's collector forgets
            // what it knows to have expired (deleting twice is harmless).
            for (name, _) in gone {
                view.remove(&name);
            }
            Ok(1)
        })
    }

    fn run(
        self: Arc<Self>,
        view: Arc<View>,
        shutdown: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let mut cursor: i64 = 0;
            let mut follower = Follower::new(self.db.clone(), "tessera_revocations", shutdown);
            while let Some(mut l) = follower.next().await {
                let lost = loop {
                    match self.catch_up(&l.client, &view, cursor).await {
                        Ok(c) => {
                            cursor = c;
                            if !view.is_synced() {
                                self.metrics.count("watch", true);
                            }
                            view.mark_synced();
                        }
                        Err(e) => break e,
                    }
                    match l.wait().await {
                        Wake::Read => {}
                        Wake::Lost(e) => break e,
                        Wake::Stop => return,
                    }
                };
                self.metrics.count("watch", false);
                follower.lost(lost).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_for_what_the_store_cannot_take() {
        assert!(check_url("postgresql://tessera@db.example:5432/fleet", false).is_ok());
        assert!(check_url("host=/run/postgresql user=tessera dbname=fleet", false).is_ok());
        let e = check_url("postgresql://tessera:hunter2@db.example/fleet", false).unwrap_err();
        assert!(e.contains("password_file") && !e.contains("hunter2"), "{e}");
        assert!(
            check_url("postgresql://db.example/fleet?sslmode=require", false)
                .unwrap_err()
                .contains("tls_ca_file")
        );
        assert!(check_url("postgresql://db.example/fleet?sslmode=require", true).is_ok());
        assert!(check_url("postgresql://db.example/fleet", true).is_ok());
        assert!(
            check_url("postgresql://db.example/fleet?sslmode=disable", true)
                .unwrap_err()
                .contains("contradicts")
        );
        assert!(
            check_url("postgresql://db.example/fleet?sslmode=verify-full", true)
                .unwrap_err()
                .contains("tls_ca_file")
        );
        assert!(
            check_url("host=/run/postgresql dbname=fleet", true)
                .unwrap_err()
                .contains("Unix socket")
        );
        assert!(
            check_url("postgres://", false)
                .unwrap_err()
                .contains("host")
        );
        assert!(check_url("not a url ==", false).is_err());
    }

    #[test]
    fn rows_read_as_batches() {
        let b = batch_of(
            7,
            1000,
            r#"[{"k":"jti","id":"a","until":900},{"k":"task","id":"","until":1000}]"#,
        )
        .unwrap();
        assert_eq!((b.cursor, b.name.as_str(), b.expires), (7, "7", 1000));
        assert_eq!(b.records.len(), 1, "an empty id is dropped");
        assert!(batch_of(8, 1, "{}").is_none());
        assert!(batch_of(-1, 1, "[]").is_none());
    }
}
