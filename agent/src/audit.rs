//! Tamper-evident, hash-chained JSONL audit log.
//!
//! Every token-exchange decision is written as one JSON object per line:
//!
//! ```text
//! {"seq":7,"ts":"2025-01-01T12:00:00.123Z","prev":"<64 hex>",<caller fields…>,"hash":"<64 hex>"}
//! ```
//!
//! # Chain design
//!
//! - `seq` starts at 1 and grows by exactly 1 per record.
//! - `prev` is the hex SHA-256 of the previous record's *full line bytes*
//!   (including its `hash` member, without the newline); 64 zeros for the first
//!   record.
//! - `hash` is the hex SHA-256 of the record's own line with the trailing
//!   `,"hash":"<hex>"` member removed. The log always writes `hash` as the last
//!   member, so the hashed bytes are exactly the bytes on disk: no JSON
//!   canonicalisation is involved.
//!
//! With both, [`verify_file`] locates the first damaged record:
//!
//! | change                                   | reported at            | kind              |
//! |------------------------------------------|------------------------|-------------------|
//! | a field edited (hash not recomputed)     | that line              | `HashMismatch`    |
//! | a field edited and `hash` recomputed     | the next line          | `PrevMismatch`    |
//! | a record deleted (or the first one)      | where the next now is  | `SeqGap`          |
//! | two records swapped                      | the first of the two   | `SeqGap`          |
//! | a copied/forged record inserted          | the inserted line      | `SeqRegression`/`PrevMismatch` |
//! | a non-record line inserted               | that line              | `Malformed`       |
//! | a crash cut the last line (not reopened) | that line              | `TornTail`        |
//!
//! The chain alone cannot show a rewrite of the whole tail or a clean cut of
//! the last records. The [`anchor`] can: after every batch, before any record
//! of it is acknowledged, the log writes the last record's `seq` and line hash
//! to a file of its own. A log that ends before the anchored record, or whose
//! record at that `seq` differs, is refused at open ([`AuditError::Tampered`])
//! and reported by [`verify_file`] (`Truncated`, `Rewritten`). Records after
//! the anchor were never acknowledged (a crash between the two writes, or
//! someone appending): `open` acknowledges them with an
//! `audit.unanchored_records` record naming them, as it does torn lines.
//!
//! The anchor is written before any record of a batch is acknowledged, so
//! it holds against anyone reading or changing the files and survives a
//! crash of the agent; it is synced to the device at most once every
//! [`ANCHOR_SYNC_INTERVAL`] (and when the log closes), not once per batch:
//! a second `fdatasync` per batch cost about 10 % of an exchange's CPU. A
//! power loss can therefore leave the anchor up to that much behind, which
//! shows as records after the anchor, named at the next open, never as
//! tampering.
//!
//! # Durability
//!
//! [`AuditLog::append`] resolves only after the line has been `fdatasync`ed.
//! One writer thread does group commit: it takes every queued record (up to
//! [`MAX_BATCH_RECORDS`]), writes them with one `write`, calls `sync_data` once
//! and then acknowledges every waiter, so throughput is not bounded by the
//! latency of one fsync.
//!
//! With a commit delay (`exchange.audit_commit_delay`, like PostgreSQL's
//! `commit_delay`; 0, the default, never waits), the writer, having taken
//! what is queued, waits up to that long for more before it syncs, but only
//! while records are known to be on their way ([`AuditLog::expect`]: an
//! exchange announces its record when it starts deciding) and only until
//! they have all arrived; while it waits it is parked, and the last of them
//! unparks it, so a held batch costs one wake-up, not one per record.
//! Batches grow, so fewer syncs are paid per record, at the price of up to
//! the delay in latency; nothing is acknowledged before its batch is
//! durable, delay or not.
//!
//! If a write or fsync fails, every record of that batch gets an error, the
//! chain head goes back to the last durable record and the file is truncated
//! back to its last durable length (retried before the next batch if that
//! fails too), so no half-written line is left behind and the next record
//! starts on a fresh line. Failed records are never acknowledged.
//!
//! # Torn lines
//!
//! A crash in the middle of a write can leave an incomplete last line. On
//! [`AuditLog::open`] such a line is kept, terminated with a newline, and
//! acknowledged by a recovery record chained to the last good record:
//! `{"event":"audit.recovered_torn_line","torn_line":N,"torn_bytes":B,"torn_bytes_sha256":"…"}`.
//! [`verify_file`] lists such lines in [`VerifyReport::recovered_torn_lines`];
//! an invalid line without a matching recovery record right after it is a
//! problem. A complete, valid last record that only lacks its newline is not
//! torn: `open` adds the newline and keeps it.
//!
//! The file is created with mode 0600 and locked (`flock`) while open, so two
//! agents cannot interleave records. Do not rotate or edit it while the agent
//! runs. See `docs/audit.md`.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::time::Instant;

use nix::fcntl::{Flock, FlockArg};
use ring::digest;
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use crate::clock::Clock;

pub mod anchor;
use anchor::{Anchor, Mark};

/// Longest line the log writes or reads as a record (1 MiB).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Most records written with one fsync.
pub const MAX_BATCH_RECORDS: usize = 4096;
/// Most bytes written with one fsync (a batch stops growing once past this).
const MAX_BATCH_BYTES: usize = 8 << 20;
/// `event` value of the record that acknowledges a torn line.
pub const RECOVERY_EVENT: &str = "audit.recovered_torn_line";
/// `event` value of the record that acknowledges records found after the anchor.
pub const UNANCHORED_EVENT: &str = "audit.unanchored_records";
/// Most time between a mark written to the anchor and its sync.
pub const ANCHOR_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the writer logs the anchored position (for an off-host copy).
const CHECKPOINT_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// `prev` of the first record.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Members the log sets itself; callers may not provide them.
pub const RESERVED_FIELDS: [&str; 4] = ["seq", "ts", "prev", "hash"];

/// Longest `exchange.audit_commit_delay` (PostgreSQL's `commit_delay` has
/// the same bound).
pub const MAX_COMMIT_DELAY: Duration = Duration::from_millis(100);

/// Room left in a line for `seq`, `ts`, `prev` and `hash`.
const HEADER_ROOM: usize = 256;

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log {path} is locked by another process")]
    Locked { path: PathBuf },
    #[error("audit log {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("reading audit log {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log {path}: write failed, record not logged: {message}")]
    Write { path: PathBuf, message: String },
    #[error("audit record fields must be a JSON object")]
    NotAnObject,
    #[error("audit record field {0:?} is reserved (seq, ts, prev and hash are set by the log)")]
    ReservedField(String),
    #[error("audit record is {bytes} bytes, more than the {max}-byte line limit")]
    TooLarge { bytes: usize, max: usize },
    #[error("audit record cannot be serialised: {0}")]
    Serialize(String),
    #[error("audit log writer has stopped")]
    Closed,
    #[error("audit anchor {path}: {source}")]
    Anchor {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "audit log {path} does not hold what was acknowledged: {message}. Keep the file and its anchor {anchor} as evidence, move both aside, and start again to begin a new log"
    )]
    Tampered {
        path: PathBuf,
        anchor: PathBuf,
        message: String,
    },
}

/// Acknowledgement of a durable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReceipt {
    /// The record's `seq` (0 from a disabled log).
    pub seq: u64,
    /// The record's `hash` member (empty from a disabled log).
    pub hash: String,
}

impl AuditReceipt {
    fn disabled() -> Self {
        Self {
            seq: 0,
            hash: String::new(),
        }
    }
}

/// What [`AuditLog::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Records in the file after opening (including recovery records written now).
    pub records: u64,
    /// Incomplete lines at the end of the file, now acknowledged by recovery records.
    pub torn_tail: Option<TornTail>,
    /// The first chain problem found while reading the file (logged as an
    /// error; the log still opens and appends after the last record).
    pub problem: Option<Problem>,
}

/// Torn lines recovered by [`AuditLog::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Usually one line; several after repeated crashes during recovery.
    pub lines: Vec<TornLine>,
    /// The file did not end with a newline; one was added.
    pub newline_added: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornLine {
    /// 1-based line number.
    pub line: u64,
    /// Length in bytes, without the newline.
    pub bytes: u64,
    /// Hex SHA-256 of the line's bytes (without the newline).
    pub sha256: String,
    /// `seq` of the recovery record that acknowledges it.
    pub recovery_seq: u64,
}

/// Result of [`verify_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines that are well-formed records (recovery records included).
    pub records: u64,
    /// The first problem; `None` if the chain verifies.
    pub first_problem: Option<Problem>,
    /// Torn lines (crash artefacts) acknowledged by a recovery record.
    pub recovered_torn_lines: Vec<u64>,
    /// `seq` and `hash` of the last record, to compare with a kept receipt.
    pub last: Option<AuditReceipt>,
    /// What the log holds against its anchor (`None`: no anchor was given).
    pub anchor: Option<AnchorState>,
}

/// The log compared with its anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorState {
    /// No anchor file, or one that is neither blank nor holds a valid mark:
    /// truncation and rewriting cannot be detected.
    Missing,
    /// Every record up to `seq` is the one acknowledged; `after` records
    /// follow it, not (yet) acknowledged: being written now, or left by a
    /// crash between the log write and the anchor write, or appended by
    /// someone else (an agent reopening the log names them in an
    /// `audit.unanchored_records` record).
    Holds { seq: u64, after: u64 },
    /// The log ends before the anchored record (also reported as a problem).
    Truncated { anchored: u64, last: u64 },
    /// The record at the anchored `seq` is not the acknowledged one.
    Rewritten { seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line number.
    pub line: u64,
    /// The `seq` of the record on that line, if it has one.
    pub seq: Option<u64>,
    pub kind: ProblemKind,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {:?}: {}", self.line, self.kind, self.message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The record's content does not match its `hash`: this line was edited.
    HashMismatch,
    /// `prev` does not match the previous record: that record was edited (with
    /// its hash recomputed) or a record was inserted or removed.
    PrevMismatch,
    /// `seq` jumps forward: records were deleted or lines reordered.
    SeqGap,
    /// `seq` repeats or goes back: a record was inserted, duplicated or reordered.
    SeqRegression,
    /// Not a well-formed record and not acknowledged by a recovery record.
    Malformed,
    /// Incomplete line(s) at the end of the file, not yet recovered (the agent
    /// crashed mid-write and has not reopened the log since).
    TornTail,
    /// The log ends before the last acknowledged record (its anchor).
    Truncated,
    /// The record at the anchored `seq` is not the acknowledged one: records
    /// were rewritten (hashes recomputed) from there or before.
    Rewritten,
}

/// A shared handle on the audit log; clones share one writer.
#[derive(Clone)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Some(inner) => f
                .debug_struct("AuditLog")
                .field("path", &inner.path)
                .finish(),
            None => f.write_str("AuditLog(disabled)"),
        }
    }
}

struct Inner {
    path: PathBuf,
    on_the_way: Arc<OnTheWay>,
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    #[cfg(test)]
    faults: Arc<faults::Faults>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its current batch; joining
        // releases the file lock before a reopen.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Request {
    /// The caller's members, serialised: `,"k":v,"k2":v2` (or empty).
    members: String,
    reply: oneshot::Sender<Result<AuditReceipt, AuditError>>,
}

impl AuditLog {
    /// Opens (creating with mode 0600; the parent directory must exist) and
    /// recovers the chain head (last seq + line hash) from the file. A torn
    /// last line is acknowledged with a recovery record (see the module doc).
    /// Records are timestamped from `clock`.
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<(Self, OpenReport), AuditError> {
        Self::open_anchored(path, &anchor::default_path(path), clock, Duration::ZERO)
    }

    /// [`open`](Self::open) with the anchor at `anchor_path` (see [`anchor`])
    /// and a group-commit delay (see the module doc; the configuration
    /// allows at most [`MAX_COMMIT_DELAY`]).
    pub fn open_anchored(
        path: &Path,
        anchor_path: &Path,
        clock: Arc<dyn Clock>,
        commit_delay: Duration,
    ) -> Result<(Self, OpenReport), AuditError> {
        Self::open_inner(
            path,
            anchor_path,
            clock,
            commit_delay,
            #[cfg(test)]
            Arc::default(),
        )
    }

    fn open_inner(
        path: &Path,
        anchor_path: &Path,
        clock: Arc<dyn Clock>,
        commit_delay: Duration,
        #[cfg(test)] faults: Arc<faults::Faults>,
    ) -> Result<(Self, OpenReport), AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_owned(),
            source,
        };
        let existed = path.symlink_metadata().is_ok();
        let anchor_err = |source| AuditError::Anchor {
            path: anchor_path.to_owned(),
            source,
        };
        if !existed {
            anchor::create_if_missing(anchor_path).map_err(anchor_err)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(AuditError::NotAFile {
                path: path.to_owned(),
            });
        }
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(AuditError::Locked {
                    path: path.to_owned(),
                });
            }
            Err((_, errno)) => return Err(open_err(io::Error::from(errno))),
        };
        if meta.permissions().mode() & 0o777 != 0o600 {
            if existed {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "audit log had loose permissions; setting 0600");
            }
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(open_err)?;
        }
        if !existed {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(open_err)?;
        }

        // Opened under the log's lock: one writer for both.
        let (anchor, mark) = Anchor::open(anchor_path).map_err(anchor_err)?;
        let scan =
            scan(BufReader::with_capacity(64 * 1024, &*file), mark.as_ref()).map_err(|source| {
                AuditError::Read {
                    path: path.to_owned(),
                    source,
                }
            })?;
        // Acknowledged records must all be there, unchanged: refuse to
        // append to (and so bury) a log that lost or rewrote some.
        match &scan.report.anchor {
            Some(AnchorState::Truncated { anchored, last }) => {
                return Err(AuditError::Tampered {
                    path: path.to_owned(),
                    anchor: anchor_path.to_owned(),
                    message: format!(
                        "record {anchored} was acknowledged, but the last readable record is {last} (records were removed, or the acknowledged last line was overwritten)"
                    ),
                });
            }
            Some(AnchorState::Rewritten { seq }) => {
                return Err(AuditError::Tampered {
                    path: path.to_owned(),
                    anchor: anchor_path.to_owned(),
                    message: format!(
                        "record {seq} is not the record that was acknowledged (records were rewritten)"
                    ),
                });
            }
            Some(AnchorState::Missing) if scan.report.records > 0 => {
                tracing::warn!(path = %path.display(), anchor = %anchor_path.display(), "audit log has no anchor yet (first start with anchoring, or the anchor was removed); anchoring its current end");
            }
            _ => {}
        }
        let unanchored = match (&scan.report.anchor, &mark) {
            (Some(AnchorState::Holds { after, .. }), Some(m)) if *after > 0 => {
                Some((m.seq, *after))
            }
            _ => None,
        };
        let problem = scan.report.first_problem.clone();
        if let Some(p) = &problem {
            tracing::error!(path = %path.display(), line = p.line, kind = ?p.kind, "audit log chain problem: {}", p.message);
        }

        let mut writer = Writer {
            path: path.to_owned(),
            anchor,
            checkpoint_logged: None,
            anchor_synced: None,
            anchor_unsynced: false,
            file,
            commit_delay,
            on_the_way: Arc::default(),
            head_seq: scan.head_seq,
            head_prev: scan.head_prev.clone(),
            good_len: scan.len,
            dirty: false,
            clock: clock.clone(),
            #[cfg(test)]
            faults: faults.clone(),
        };

        // Recovery: terminate the last line and acknowledge torn lines.
        let mut records = scan.report.records;
        let newline_added = !scan.ends_with_newline;
        let mut buf = Vec::new();
        if newline_added {
            buf.push(b'\n');
        }
        let mut torn = Vec::new();
        let ts = timestamp(clock.now());
        // The last record read, before this open adds any.
        let scanned_head = writer.head_seq;
        for p in &scan.pending {
            tracing::warn!(
                path = %path.display(),
                line = p.line,
                bytes = p.bytes,
                "audit log ends with a torn line ({}); writing a recovery record",
                p.reason
            );
            let mut fields = Map::new();
            fields.insert("event".into(), RECOVERY_EVENT.into());
            fields.insert("torn_line".into(), p.line.into());
            fields.insert("torn_bytes".into(), p.bytes.into());
            fields.insert("torn_bytes_sha256".into(), p.sha256.clone().into());
            let seq = writer.chain_onto(&mut buf, &ts, &fields)?;
            records += 1;
            torn.push(TornLine {
                line: p.line,
                bytes: p.bytes,
                sha256: p.sha256.clone(),
                recovery_seq: seq,
            });
        }
        // After the recovery records: those must follow their torn lines.
        if let Some((anchored, after)) = unanchored {
            tracing::warn!(path = %path.display(), anchored, after, "audit log holds records after its anchor (never acknowledged: a crash between writing and anchoring, or appended by someone else); writing a record naming them");
            let mut fields = Map::new();
            fields.insert("event".into(), UNANCHORED_EVENT.into());
            fields.insert("anchored_seq".into(), anchored.into());
            fields.insert("first_seq".into(), (anchored + 1).into());
            fields.insert("last_seq".into(), scanned_head.into());
            writer.chain_onto(&mut buf, &ts, &fields)?;
            records += 1;
        }
        if !buf.is_empty() {
            (&*writer.file)
                .write_all(&buf)
                .and_then(|()| writer.file.sync_data())
                .map_err(|e| AuditError::Write {
                    path: path.to_owned(),
                    message: format!("recovering the end of the file: {e}"),
                })?;
            writer.good_len += buf.len() as u64;
        }
        if writer.head_seq > 0 && mark.as_ref().map(|m| m.seq) != Some(writer.head_seq) {
            writer.anchor_head().map_err(anchor_err)?;
        }
        let torn_tail = (!torn.is_empty()).then_some(TornTail {
            lines: torn,
            newline_added,
        });

        let (tx, rx) = mpsc::channel();
        let on_the_way = writer.on_the_way.clone();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(open_err)?;
        if !commit_delay.is_zero() {
            // Set before any record can be sent: the writer only waits for
            // announced records once it holds a batch.
            let _ = on_the_way.writer.set(thread.thread().clone());
        }
        tracing::debug!(path = %path.display(), records, "audit log open");
        let log = AuditLog {
            inner: Some(Arc::new(Inner {
                path: path.to_owned(),
                on_the_way,
                tx: Some(tx),
                thread: Some(thread),
                #[cfg(test)]
                faults,
            })),
        };
        Ok((
            log,
            OpenReport {
                records,
                torn_tail,
                problem,
            },
        ))
    }

    /// A log that records nothing (no `audit_log` configured): `append`
    /// returns seq 0 and an empty hash.
    pub fn disabled() -> Self {
        AuditLog { inner: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn path(&self) -> Option<&Path> {
        self.inner.as_ref().map(|i| i.path.as_path())
    }

    /// Announces a record that will be appended soon (see the module doc:
    /// with a commit delay, the writer waits for announced records before
    /// syncing). The announcement ends when the returned guard is dropped
    /// or handed to [`append_expected`](Self::append_expected).
    pub fn expect(&self) -> Expected {
        Expected(self.inner.as_ref().map(|inner| {
            inner.on_the_way.count.fetch_add(1, Ordering::AcqRel);
            inner.on_the_way.clone()
        }))
    }

    /// Appends one record; resolves after the line is durable. The caller's
    /// members come after `seq`, `ts` and `prev`, which (with `hash`) may not
    /// appear in `fields`. Dropping the future does not withdraw the record.
    pub async fn append(&self, fields: Map<String, Value>) -> Result<AuditReceipt, AuditError> {
        if self.inner.is_none() {
            return Ok(AuditReceipt::disabled());
        }
        self.send(serialize_members(&fields)?, Expected(None)).await
    }

    /// [`append`](Self::append) for a typed record, which must serialise to
    /// a JSON object without the log's own members, announced earlier with
    /// [`expect`](Self::expect).
    pub async fn append_expected<T: serde::Serialize>(
        &self,
        record: &T,
        expected: Expected,
    ) -> Result<AuditReceipt, AuditError> {
        if self.inner.is_none() {
            return Ok(AuditReceipt::disabled());
        }
        let members = typed_members(record)?;
        self.send(members, expected).await
    }

    async fn send(&self, members: String, expected: Expected) -> Result<AuditReceipt, AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(AuditReceipt::disabled());
        };
        let (reply, rx) = oneshot::channel();
        let queued = inner
            .tx
            .as_ref()
            .ok_or(AuditError::Closed)?
            .send(Request { members, reply });
        // No longer on its way once queued, and only then: a writer woken
        // by the count reaching zero must find this record in the queue.
        drop(expected);
        queued.map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// [`append`](Self::append) for a `serde_json::Value`, which must be an object.
    pub async fn append_value(&self, fields: Value) -> Result<AuditReceipt, AuditError> {
        match fields {
            Value::Object(map) => self.append(map).await,
            _ => Err(AuditError::NotAnObject),
        }
    }
}

/// A record announced with [`AuditLog::expect`]; dropping it withdraws the
/// announcement.
#[must_use = "an announcement ends when this is dropped"]
pub struct Expected(Option<Arc<OnTheWay>>);

impl Drop for Expected {
    fn drop(&mut self) {
        if let Some(on_the_way) = self.0.take() {
            on_the_way.settle();
        }
    }
}

/// Records announced with [`AuditLog::expect`] and not yet queued (or
/// withdrawn), shared by the announcers and the writer.
#[derive(Default)]
struct OnTheWay {
    count: AtomicUsize,
    /// The writer thread, with a commit delay: it parks while records are on
    /// their way and is unparked once, by the last of them, rather than
    /// woken by every record that arrives.
    writer: OnceLock<std::thread::Thread>,
}

impl OnTheWay {
    /// One announced record is queued or withdrawn.
    fn settle(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(writer) = self.writer.get()
        {
            writer.unpark();
        }
    }
}

/// A typed record's members as `,"k":v,…`: its own serialisation, in its
/// member order, with the braces cut off. Our record types never name the
/// log's members; debug builds (the tests) check it.
fn typed_members<T: serde::Serialize>(record: &T) -> Result<String, AuditError> {
    let mut out =
        serde_json::to_string(record).map_err(|e| AuditError::Serialize(e.to_string()))?;
    if !(out.starts_with('{') && out.ends_with('}')) {
        return Err(AuditError::NotAnObject);
    }
    #[cfg(debug_assertions)]
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&out)
        && let Some(k) = map.keys().find(|k| RESERVED_FIELDS.contains(&k.as_str()))
    {
        return Err(AuditError::ReservedField(k.clone()));
    }
    out.pop();
    if out.len() == 1 {
        out.clear();
    } else {
        out.replace_range(..1, ",");
    }
    if out.len() + HEADER_ROOM > MAX_LINE_BYTES {
        return Err(AuditError::TooLarge {
            bytes: out.len() + HEADER_ROOM,
            max: MAX_LINE_BYTES,
        });
    }
    Ok(out)
}

fn serialize_members(fields: &Map<String, Value>) -> Result<String, AuditError> {
    let mut out = String::new();
    for (k, v) in fields {
        if RESERVED_FIELDS.contains(&k.as_str()) {
            return Err(AuditError::ReservedField(k.clone()));
        }
        out.push(',');
        out.push_str(&serde_json::to_string(k).map_err(|e| AuditError::Serialize(e.to_string()))?);
        out.push(':');
        out.push_str(&serde_json::to_string(v).map_err(|e| AuditError::Serialize(e.to_string()))?);
    }
    if out.len() + HEADER_ROOM > MAX_LINE_BYTES {
        return Err(AuditError::TooLarge {
            bytes: out.len() + HEADER_ROOM,
            max: MAX_LINE_BYTES,
        });
    }
    Ok(out)
}

/// Builds one record line (without newline); returns it and its `hash`.
fn build_line(seq: u64, ts: &str, prev: &str, members: &str) -> (String, String) {
    let mut line = String::with_capacity(members.len() + HEADER_ROOM);
    line.push_str("{\"seq\":");
    line.push_str(&seq.to_string());
    line.push_str(",\"ts\":\"");
    line.push_str(ts);
    line.push_str("\",\"prev\":\"");
    line.push_str(prev);
    line.push('"');
    line.push_str(members);
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(line.as_bytes());
    ctx.update(b"}");
    let hash = hex::encode(ctx.finish());
    line.push_str(",\"hash\":\"");
    line.push_str(&hash);
    line.push_str("\"}");
    (line, hash)
}

/// RFC 3339 UTC with milliseconds.
fn timestamp(now: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(now);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

struct Writer {
    path: PathBuf,
    anchor: Anchor,
    /// When the anchored position was last logged.
    checkpoint_logged: Option<std::time::SystemTime>,
    /// When the anchor was last synced to the device.
    anchor_synced: Option<std::time::SystemTime>,
    /// A mark was written after that sync.
    anchor_unsynced: bool,
    file: Flock<File>,
    /// How long a batch may wait for announced records before its sync.
    commit_delay: Duration,
    /// Records announced and not yet queued ([`AuditLog::expect`]).
    on_the_way: Arc<OnTheWay>,
    head_seq: u64,
    /// SHA-256 of the last record's line: the next record's `prev`.
    head_prev: String,
    /// File length after the last durable batch.
    good_len: u64,
    /// A failed batch may have left bytes past `good_len`.
    dirty: bool,
    clock: Arc<dyn Clock>,
    #[cfg(test)]
    faults: Arc<faults::Faults>,
}

impl Writer {
    /// Chains one record the log writes itself (a recovery record) onto the
    /// head, into `buf`; returns its `seq`. Written by the caller.
    fn chain_onto(
        &mut self,
        buf: &mut Vec<u8>,
        ts: &str,
        fields: &Map<String, Value>,
    ) -> Result<u64, AuditError> {
        let members = serialize_members(fields)?;
        let seq = self.head_seq + 1;
        let (line, _hash) = build_line(seq, ts, &self.head_prev, &members);
        self.head_prev = sha256_hex(line.as_bytes());
        self.head_seq = seq;
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        Ok(seq)
    }

    fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut buf = Vec::new();
        let mut waiters = Vec::new();
        loop {
            // Idle: make sure the last mark reaches the device.
            let first = match rx.recv_timeout(ANCHOR_SYNC_INTERVAL) {
                Ok(first) => first,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.sync_anchor();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.sync_anchor();
                    return;
                }
            };
            buf.clear();
            let ts = timestamp(self.clock.now());
            let mut seq = self.head_seq;
            let mut prev = self.head_prev.clone();
            let mut next = Some(first);
            let mut deadline = None;
            while let Some(req) = next.take() {
                seq += 1;
                let (line, hash) = build_line(seq, &ts, &prev, &req.members);
                prev = sha256_hex(line.as_bytes());
                buf.extend_from_slice(line.as_bytes());
                buf.push(b'\n');
                waiters.push((req.reply, seq, hash));
                if waiters.len() < MAX_BATCH_RECORDS && buf.len() < MAX_BATCH_BYTES {
                    next = rx.try_recv().ok();
                    if next.is_none() {
                        next = self.wait_for_more(&rx, &mut deadline);
                    }
                }
            }
            match self.write_batch(&buf) {
                Ok(()) => {
                    self.head_seq = seq;
                    self.head_prev = prev;
                    self.good_len += buf.len() as u64;
                    // Acknowledged only once anchored. If the anchor cannot
                    // be written the records stay in the log, unacknowledged,
                    // and the next open names them.
                    match self.anchor_head() {
                        Ok(()) => {
                            for (reply, seq, hash) in waiters.drain(..) {
                                let _ = reply.send(Ok(AuditReceipt { seq, hash }));
                            }
                        }
                        Err(e) => {
                            tracing::error!(anchor = %self.anchor.path().display(), error = %e, records = waiters.len(), "audit anchor write failed; records not acknowledged");
                            let message = format!(
                                "the anchor {} could not be written: {e}",
                                self.anchor.path().display()
                            );
                            for (reply, _, _) in waiters.drain(..) {
                                let _ = reply.send(Err(AuditError::Write {
                                    path: self.path.clone(),
                                    message: message.clone(),
                                }));
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, records = waiters.len(), "audit log write failed; records not logged");
                    let message = e.to_string();
                    for (reply, _, _) in waiters.drain(..) {
                        let _ = reply.send(Err(AuditError::Write {
                            path: self.path.clone(),
                            message: message.clone(),
                        }));
                    }
                    // Best effort now; retried before the next batch.
                    let _ = self.ensure_clean();
                }
            }
        }
    }

    /// With a commit delay, the next record of a batch that has taken
    /// everything queued: while announced records are still on their way,
    /// parks until the last of them is queued (its sender unparks this
    /// thread: one wake-up for the batch, not one per record) or the batch's
    /// deadline (set at the first wait) passes. `None`: sync now.
    fn wait_for_more(
        &self,
        rx: &mpsc::Receiver<Request>,
        deadline: &mut Option<Instant>,
    ) -> Option<Request> {
        let pending = || self.on_the_way.count.load(Ordering::Acquire) != 0;
        if self.commit_delay.is_zero() || !pending() {
            return None;
        }
        let until = *deadline.get_or_insert_with(|| Instant::now() + self.commit_delay);
        while pending() {
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                break;
            };
            // May also return early (a stale unpark): the loop checks again.
            std::thread::park_timeout(left);
        }
        rx.try_recv().ok()
    }

    /// Syncs the anchor if a mark was written since the last sync.
    fn sync_anchor(&mut self) {
        if self.anchor_unsynced {
            match self.anchor.sync() {
                Ok(()) => {
                    self.anchor_synced = Some(self.clock.now());
                    self.anchor_unsynced = false;
                }
                Err(e) => {
                    tracing::error!(anchor = %self.anchor.path().display(), error = %e, "could not sync the audit anchor")
                }
            }
        }
    }

    /// Anchors the chain head, and now and then logs it, so a copy of the
    /// position also lives wherever the agent's logs are shipped.
    fn anchor_head(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if self.faults.take(&self.faults.fail_anchors) {
            return Err(io::Error::other("injected anchor failure"));
        }
        let mark = Mark {
            seq: self.head_seq,
            line_sha256: self.head_prev.clone(),
        };
        let now = self.clock.now();
        let sync = self.anchor_synced.is_none_or(|t| {
            now.duration_since(t)
                .map_or(true, |d| d >= ANCHOR_SYNC_INTERVAL)
        });
        self.anchor.record(&mark, sync)?;
        if sync {
            self.anchor_synced = Some(now);
        }
        self.anchor_unsynced = !sync;
        let due = self.checkpoint_logged.is_none_or(|t| {
            now.duration_since(t)
                .is_ok_and(|d| d >= CHECKPOINT_LOG_INTERVAL)
        });
        if due {
            tracing::info!(path = %self.path.display(), seq = mark.seq, line_sha256 = %mark.line_sha256, "audit checkpoint");
            self.checkpoint_logged = Some(now);
        }
        Ok(())
    }

    fn write_batch(&mut self, buf: &[u8]) -> io::Result<()> {
        self.ensure_clean()?;
        self.dirty = true;
        #[cfg(test)]
        if self.faults.take(&self.faults.fail_writes) {
            (&*self.file).write_all(&buf[..buf.len() / 2])?;
            return Err(io::Error::other("injected write failure"));
        }
        (&*self.file).write_all(buf)?;
        self.file.sync_data()?;
        #[cfg(test)]
        self.faults.batches.fetch_add(1, Ordering::SeqCst);
        self.dirty = false;
        Ok(())
    }

    /// Cuts off whatever a failed batch left past the last durable length.
    fn ensure_clean(&mut self) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        #[cfg(test)]
        if self.faults.take(&self.faults.fail_truncates) {
            return Err(io::Error::other("injected truncate failure"));
        }
        self.file.set_len(self.good_len)?;
        self.file.sync_data()?;
        self.dirty = false;
        tracing::warn!(path = %self.path.display(), len = self.good_len, "audit log: removed the partial write of a failed batch");
        Ok(())
    }
}

/// Checks the hash chain of the audit log at `path`, streaming, and, given
/// its anchor, that every acknowledged record is there unchanged.
pub fn verify_file(path: &Path, anchor_path: Option<&Path>) -> Result<VerifyReport, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Open {
        path: path.to_owned(),
        source,
    })?;
    let mark = match anchor_path {
        None => None,
        Some(a) => Some(anchor::read(a).map_err(|source| AuditError::Anchor {
            path: a.to_owned(),
            source,
        })?),
    };
    let scan = scan(
        BufReader::with_capacity(64 * 1024, file),
        mark.as_ref().and_then(Option::as_ref),
    )
    .map_err(|source| AuditError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut report = scan.report;
    if mark.is_none() {
        report.anchor = None;
    }
    Ok(report)
}

/// An invalid line not (yet) acknowledged by a recovery record.
struct Pending {
    line: u64,
    bytes: u64,
    sha256: String,
    reason: String,
}

struct Scan {
    report: VerifyReport,
    head_seq: u64,
    head_prev: String,
    /// Invalid lines at the end of the file without a recovery record.
    pending: Vec<Pending>,
    ends_with_newline: bool,
    len: u64,
}

impl Scan {
    fn problem(&mut self, line: u64, seq: Option<u64>, kind: ProblemKind, message: String) {
        if self.report.first_problem.is_none() {
            self.report.first_problem = Some(Problem {
                line,
                seq,
                kind,
                message,
            });
        }
    }
}

struct Record {
    seq: u64,
    prev: String,
    hash: String,
    hash_ok: bool,
    recovers: Option<(u64, String)>,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn parse_record(line: &[u8]) -> Result<Record, String> {
    let obj: Map<String, Value> =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let seq = obj
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or("missing or invalid \"seq\"")?;
    obj.get("ts")
        .and_then(Value::as_str)
        .ok_or("missing or invalid \"ts\"")?;
    let hex_field = |name: &str| {
        obj.get(name)
            .and_then(Value::as_str)
            .filter(|s| is_hex64(s))
            .map(str::to_owned)
            .ok_or_else(|| format!("missing or invalid {name:?}"))
    };
    let prev = hex_field("prev")?;
    let hash = hex_field("hash")?;
    let suffix = format!(",\"hash\":\"{hash}\"}}");
    let body = line
        .strip_suffix(suffix.as_bytes())
        .ok_or("\"hash\" is not the last member")?;
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(body);
    ctx.update(b"}");
    let hash_ok = hex::encode(ctx.finish()) == hash;
    let recovers = (obj.get("event").and_then(Value::as_str) == Some(RECOVERY_EVENT))
        .then(|| {
            Some((
                obj.get("torn_line")?.as_u64()?,
                obj.get("torn_bytes_sha256")?.as_str()?.to_owned(),
            ))
        })
        .flatten();
    Ok(Record {
        seq,
        prev,
        hash,
        hash_ok,
        recovers,
    })
}

fn scan<R: BufRead>(mut reader: R, mark: Option<&Mark>) -> io::Result<Scan> {
    let mut s = Scan {
        report: VerifyReport {
            records: 0,
            first_problem: None,
            recovered_torn_lines: Vec::new(),
            last: None,
            anchor: None,
        },
        head_seq: 0,
        head_prev: GENESIS_PREV.to_owned(),
        pending: Vec::new(),
        ends_with_newline: true,
        len: 0,
    };
    let mut prev_line = 0u64;
    let mut buf = Vec::new();
    let mut n = 0u64;
    // The line number and line hash of the anchored record, in its place.
    let mut anchored: Option<(u64, String)> = None;
    while let Some(info) = read_line_capped(&mut reader, &mut buf, MAX_LINE_BYTES)? {
        n += 1;
        s.len += info.len + u64::from(info.terminated);
        s.ends_with_newline = info.terminated;
        let parsed = if info.oversized {
            Err(format!("longer than {MAX_LINE_BYTES} bytes"))
        } else {
            parse_record(&buf)
        };
        let rec = match parsed {
            Ok(rec) => rec,
            Err(reason) => {
                s.pending.push(Pending {
                    line: n,
                    bytes: info.len,
                    sha256: info.sha256,
                    reason,
                });
                continue;
            }
        };
        if let Some(first) = s.pending.first() {
            let matches = rec
                .recovers
                .as_ref()
                .is_some_and(|(l, h)| *l == first.line && *h == first.sha256);
            if matches {
                s.report.recovered_torn_lines.push(first.line);
                s.pending.remove(0);
            } else {
                let (line, msg) = (
                    first.line,
                    format!(
                        "not a valid audit record ({}) and not followed by a recovery record",
                        first.reason
                    ),
                );
                s.problem(line, None, ProblemKind::Malformed, msg);
                s.pending.clear();
            }
        }
        let expected = s.head_seq.saturating_add(1);
        if !rec.hash_ok {
            s.problem(
                n,
                Some(rec.seq),
                ProblemKind::HashMismatch,
                "the record's content does not match its hash: this line was modified".into(),
            );
        } else if rec.seq > expected {
            s.problem(
                n,
                Some(rec.seq),
                ProblemKind::SeqGap,
                format!(
                    "expected seq {expected}, found {}: records deleted or lines reordered",
                    rec.seq
                ),
            );
        } else if rec.seq < expected {
            s.problem(
                n,
                Some(rec.seq),
                ProblemKind::SeqRegression,
                format!(
                    "expected seq {expected}, found {}: a record was inserted, duplicated or reordered",
                    rec.seq
                ),
            );
        } else if rec.prev != s.head_prev {
            let msg = if prev_line == 0 {
                "the first record's prev is not 64 zeros: records before it were removed".into()
            } else {
                format!(
                    "prev does not match the SHA-256 of line {prev_line}: that record was modified, or a record was inserted or removed"
                )
            };
            s.problem(n, Some(rec.seq), ProblemKind::PrevMismatch, msg);
        }
        if mark.is_some_and(|m| m.seq == rec.seq) && rec.seq == expected {
            anchored = Some((n, info.sha256.clone()));
        }
        // Continue from this record whatever happened, to find the head.
        s.head_seq = rec.seq;
        s.head_prev = info.sha256;
        prev_line = n;
        s.report.records += 1;
        s.report.last = Some(AuditReceipt {
            seq: rec.seq,
            hash: rec.hash,
        });
    }
    if let Some(first) = s.pending.first() {
        let (line, msg) = (
            first.line,
            format!(
                "incomplete last line ({}): the writer stopped mid-write and the log has not been reopened since (opening it appends a recovery record)",
                first.reason
            ),
        );
        s.problem(line, None, ProblemKind::TornTail, msg);
    }
    s.report.anchor = Some(match mark {
        None => AnchorState::Missing,
        // A blank anchor: nothing was acknowledged, so nothing can be missing.
        Some(m) if m.seq == 0 => AnchorState::Holds {
            seq: 0,
            after: s.head_seq,
        },
        Some(m) if s.head_seq < m.seq => {
            s.problem(
                n + 1,
                Some(m.seq),
                ProblemKind::Truncated,
                format!(
                    "the anchor says record {} was acknowledged, but the log ends at record {}: acknowledged records were removed",
                    m.seq, s.head_seq
                ),
            );
            AnchorState::Truncated {
                anchored: m.seq,
                last: s.head_seq,
            }
        }
        Some(m) => match anchored {
            Some((_, hash)) if hash == m.line_sha256 => AnchorState::Holds {
                seq: m.seq,
                after: s.head_seq - m.seq,
            },
            found => {
                s.problem(
                    found.map_or(n, |(line, _)| line),
                    Some(m.seq),
                    ProblemKind::Rewritten,
                    format!(
                        "record {} is not the one acknowledged (its hash differs from the anchor's): records were rewritten",
                        m.seq
                    ),
                );
                AnchorState::Rewritten { seq: m.seq }
            }
        },
    });
    Ok(s)
}

pub(crate) struct LineInfo {
    /// Bytes in the line, without the newline.
    pub(crate) len: u64,
    pub(crate) terminated: bool,
    /// Longer than the cap: `buf` is empty.
    pub(crate) oversized: bool,
    /// Hex SHA-256 of the whole line without the newline.
    pub(crate) sha256: String,
}

/// Reads one line into `buf` (without the newline), keeping at most `cap`
/// bytes in memory. `None` at end of file.
pub(crate) fn read_line_capped<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<Option<LineInfo>> {
    buf.clear();
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut len = 0u64;
    let mut oversized = false;
    let mut terminated = false;
    loop {
        let chunk = match reader.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            break;
        }
        let (take, found) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        let part = &chunk[..take];
        ctx.update(part);
        len += take as u64;
        if !oversized {
            if buf.len() + take <= cap {
                buf.extend_from_slice(part);
            } else {
                oversized = true;
                buf.clear();
            }
        }
        reader.consume(take + usize::from(found));
        if found {
            terminated = true;
            break;
        }
    }
    if len == 0 && !terminated {
        return Ok(None);
    }
    Ok(Some(LineInfo {
        len,
        terminated,
        oversized,
        sha256: hex::encode(ctx.finish()),
    }))
}

#[cfg(test)]
mod faults {
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Injected failures for the writer (tests only).
    #[derive(Default)]
    pub(super) struct Faults {
        /// Writes that write half the batch, then fail.
        pub(super) fail_writes: AtomicU32,
        /// Truncations (after a failed write) that fail.
        pub(super) fail_truncates: AtomicU32,
        /// Anchor writes that fail (after the batch is in the log).
        pub(super) fail_anchors: AtomicU32,
        /// Batches written and synced.
        pub(super) batches: AtomicU32,
    }

    impl Faults {
        pub(super) fn take(&self, counter: &AtomicU32) -> bool {
            counter
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use std::sync::atomic::Ordering;

    fn fields(i: u64) -> Map<String, Value> {
        let Value::Object(m) = serde_json::json!({
            "event": "token.exchange",
            "decision": "allow",
            "i": i,
            "subject": "spiffe://example.org/agent",
        }) else {
            unreachable!()
        };
        m
    }

    async fn write_n(log: &AuditLog, from: u64, n: u64) {
        for i in from..from + n {
            log.append(fields(i)).await.unwrap();
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut s = lines.join("\n");
        s.push('\n');
        std::fs::write(path, s).unwrap();
    }

    fn problem(path: &Path) -> Problem {
        verify_file(path, None)
            .unwrap()
            .first_problem
            .expect("a problem")
    }

    async fn log_of(n: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (log, report) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        assert_eq!(report.records, 0);
        write_n(&log, 0, n).await;
        (dir, path)
    }

    #[tokio::test]
    async fn clean_log_verifies() {
        let (_dir, path) = log_of(300).await;
        let r = verify_file(&path, None).unwrap();
        assert_eq!(r.first_problem, None);
        assert_eq!(r.records, 300);
        assert_eq!(r.last.as_ref().unwrap().seq, 300);
        let ls = lines(&path);
        let first: Value = serde_json::from_str(&ls[0]).unwrap();
        assert_eq!(first["seq"], 1);
        assert_eq!(first["prev"], GENESIS_PREV);
        assert_eq!(first["decision"], "allow");
        let ts = first["ts"].as_str().unwrap();
        assert_eq!(ts.len(), "2025-01-01T00:00:00.000Z".len());
        assert!(ts.ends_with('Z'));
        let second: Value = serde_json::from_str(&ls[1]).unwrap();
        assert_eq!(second["prev"], sha256_hex(ls[0].as_bytes()));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[tokio::test]
    async fn receipt_matches_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let (log, _) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        let r = log.append(fields(1)).await.unwrap();
        assert_eq!(r.seq, 1);
        let v: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert_eq!(v["hash"], r.hash.as_str());
        assert_eq!(verify_file(&path, None).unwrap().last, Some(r));
    }

    #[tokio::test]
    async fn rejects_reserved_and_non_objects() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(&dir.path().join("a.jsonl"), Arc::new(SystemClock)).unwrap();
        let mut f = fields(1);
        f.insert("seq".into(), 5.into());
        assert!(matches!(
            log.append(f).await,
            Err(AuditError::ReservedField(k)) if k == "seq"
        ));
        assert!(matches!(
            log.append_value(Value::from(3)).await,
            Err(AuditError::NotAnObject)
        ));
        let mut big = Map::new();
        big.insert("x".into(), "y".repeat(MAX_LINE_BYTES).into());
        assert!(matches!(
            log.append(big).await,
            Err(AuditError::TooLarge { .. })
        ));
        assert_eq!(log.append(fields(2)).await.unwrap().seq, 1);
    }

    #[tokio::test]
    async fn disabled_is_a_no_op() {
        let log = AuditLog::disabled();
        assert!(!log.is_enabled());
        assert_eq!(log.append(fields(1)).await.unwrap().seq, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_are_gapless() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (log, _) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        let mut tasks = Vec::new();
        for t in 0..50u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..40u64 {
                    seqs.push(log.append(fields(t * 1000 + i)).await.unwrap().seq);
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (1..=2000).collect::<Vec<_>>());
        let r = verify_file(&path, None).unwrap();
        assert_eq!(r.first_problem, None);
        assert_eq!(r.records, 2000);
    }

    #[tokio::test]
    async fn tampered_field_found_at_its_line() {
        let (_dir, path) = log_of(100).await;
        let mut ls = lines(&path);
        ls[49] = ls[49].replace("\"decision\":\"allow\"", "\"decision\":\"deny\"");
        write_lines(&path, &ls);
        let p = problem(&path);
        assert_eq!(
            (p.line, p.kind, p.seq),
            (50, ProblemKind::HashMismatch, Some(50))
        );
    }

    #[tokio::test]
    async fn tampered_with_recomputed_hash_found_at_next_line() {
        let (_dir, path) = log_of(100).await;
        let mut ls = lines(&path);
        let v: Value = serde_json::from_str(&ls[49]).unwrap();
        let mut f = fields(49);
        f.insert("decision".into(), "deny".into());
        let members = serialize_members(&f).unwrap();
        ls[49] = build_line(
            50,
            v["ts"].as_str().unwrap(),
            v["prev"].as_str().unwrap(),
            &members,
        )
        .0;
        write_lines(&path, &ls);
        let p = problem(&path);
        assert_eq!((p.line, p.kind), (51, ProblemKind::PrevMismatch));
        assert!(p.message.contains("line 50"), "{}", p.message);
    }

    #[tokio::test]
    async fn deleted_line() {
        let (_dir, path) = log_of(100).await;
        let mut ls = lines(&path);
        ls.remove(59);
        write_lines(&path, &ls);
        let p = problem(&path);
        assert_eq!((p.line, p.kind, p.seq), (60, ProblemKind::SeqGap, Some(61)));

        let mut ls = lines(&path);
        ls.remove(0);
        write_lines(&path, &ls);
        let p = problem(&path);
        assert_eq!((p.line, p.kind), (1, ProblemKind::SeqGap));
    }

    #[tokio::test]
    async fn swapped_lines() {
        let (_dir, path) = log_of(100).await;
        let mut ls = lines(&path);
        ls.swap(29, 30);
        write_lines(&path, &ls);
        let p = problem(&path);
        assert_eq!((p.line, p.kind), (30, ProblemKind::SeqGap));
    }

    #[tokio::test]
    async fn inserted_lines() {
        let (_dir, path) = log_of(100).await;
        let orig = lines(&path);
        let mut ls = orig.clone();
        let dup = ls[19].clone();
        ls.insert(20, dup);
        write_lines(&path, &ls);
        let p = problem(&path);
        assert_eq!((p.line, p.kind), (21, ProblemKind::SeqRegression));

        let mut ls = orig;
        ls.insert(20, "{\"event\":\"forged\"}".into());
        write_lines(&path, &ls);
        let p = problem(&path);
        assert_eq!((p.line, p.kind), (21, ProblemKind::Malformed));
    }

    /// A crash in the middle of writing record 11: part of its line is on
    /// disk, it was never acknowledged (nor anchored).
    fn tear_a_write(path: &Path) {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(b"{\"seq\":11,\"ts\":\"2025-01-01T").unwrap();
    }

    #[tokio::test]
    async fn torn_tail_recovered_on_reopen() {
        let (_dir, path) = log_of(10).await;
        tear_a_write(&path);

        // Before a restart: reported as a torn tail.
        let p = problem(&path);
        assert_eq!((p.line, p.kind), (11, ProblemKind::TornTail));

        let (log, report) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        let torn = report.torn_tail.expect("torn tail");
        assert!(torn.newline_added);
        assert_eq!(torn.lines.len(), 1);
        assert_eq!(torn.lines[0].line, 11);
        assert_eq!(torn.lines[0].recovery_seq, 11);
        assert_eq!(report.records, 11);
        assert_eq!(report.problem.map(|p| p.kind), Some(ProblemKind::TornTail));

        let r = log.append(fields(99)).await.unwrap();
        assert_eq!(r.seq, 12);
        let v = verify_file(&path, Some(&anchor::default_path(&path))).unwrap();
        assert_eq!(v.first_problem, None);
        assert_eq!(v.recovered_torn_lines, vec![11]);
        assert_eq!(v.records, 12);
        assert_eq!(v.anchor, Some(AnchorState::Holds { seq: 12, after: 0 }));
        let rec: Value = serde_json::from_str(&lines(&path)[11]).unwrap();
        assert_eq!(rec["event"], RECOVERY_EVENT);
        assert_eq!(rec["torn_line"], 11);
        drop(log);

        // Reopening again finds nothing to recover.
        let (_log, report) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        assert_eq!(report.torn_tail, None);
        assert_eq!(report.problem, None);
        assert_eq!(report.records, 12);
    }

    /// A crash right after a new log's first open leaves an empty log: its
    /// anchor already exists (it is created first), blank, and a blank anchor
    /// means "nothing acknowledged", so the log verifies. A crash after the
    /// first records but before their first anchor write leaves them after
    /// that blank mark: unacknowledged, named when the log reopens. An anchor
    /// that is neither blank nor valid is still no anchor.
    #[tokio::test]
    async fn a_new_log_is_anchored_from_its_first_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let anchor_path = anchor::default_path(&path);
        let (log, _) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        assert!(anchor_path.exists(), "anchor created with the log");
        drop(log);
        let v = verify_file(&path, Some(&anchor_path)).unwrap();
        assert_eq!((v.records, v.first_problem), (0, None));
        assert_eq!(v.anchor, Some(AnchorState::Holds { seq: 0, after: 0 }));

        // Records written, their anchor write lost: blank anchor, 3 records.
        let (_dir2, logged) = log_of(3).await;
        let logged_anchor = anchor::default_path(&logged);
        std::fs::write(&logged_anchor, b"").unwrap();
        let v = verify_file(&logged, Some(&logged_anchor)).unwrap();
        assert_eq!(v.anchor, Some(AnchorState::Holds { seq: 0, after: 3 }));
        let (log, report) = AuditLog::open(&logged, Arc::new(SystemClock)).unwrap();
        assert_eq!(report.problem, None);
        drop(log);
        let v = verify_file(&logged, Some(&logged_anchor)).unwrap();
        assert_eq!(v.first_problem, None);
        assert_eq!(v.anchor, Some(AnchorState::Holds { seq: 4, after: 0 }));
        let rec: Value = serde_json::from_str(&lines(&logged)[3]).unwrap();
        assert_eq!(rec["event"], UNANCHORED_EVENT);

        // Garbage where the anchor should be: no anchor.
        std::fs::write(&logged_anchor, b"{\"seq\": 4}").unwrap();
        let v = verify_file(&logged, Some(&logged_anchor)).unwrap();
        assert_eq!(v.anchor, Some(AnchorState::Missing));
    }

    /// What the chain alone let through: cutting the tail, rewriting the
    /// tail with recomputed hashes, and overwriting the last acknowledged
    /// record (which reopening used to label torn by a crash). The anchor
    /// catches each; `open` refuses to append to such a log.
    #[tokio::test]
    async fn the_anchor_catches_truncation_and_rewriting() {
        let anchored = |path: &Path| verify_file(path, Some(&anchor::default_path(path))).unwrap();
        let refused = |path: &Path| match AuditLog::open(path, Arc::new(SystemClock)) {
            Err(e @ AuditError::Tampered { .. }) => e.to_string(),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a tampered log"),
        };

        // Cut the last two records cleanly: the chain verifies, the anchor not.
        let (_dir, path) = log_of(10).await;
        let orig = lines(&path);
        write_lines(&path, &orig[..8]);
        assert_eq!(verify_file(&path, None).unwrap().first_problem, None);
        let v = anchored(&path);
        assert_eq!(
            v.anchor,
            Some(AnchorState::Truncated {
                anchored: 10,
                last: 8
            })
        );
        assert_eq!(v.first_problem.unwrap().kind, ProblemKind::Truncated);
        assert!(refused(&path).contains("record 10 was acknowledged"));

        // Overwrite the last acknowledged record with garbage: not a crash.
        let mut ls = orig.clone();
        ls[9] = "{\"seq\":10,\"ts\":\"x".into();
        write_lines(&path, &ls);
        assert_eq!(
            verify_file(&path, None)
                .unwrap()
                .first_problem
                .unwrap()
                .kind,
            ProblemKind::TornTail
        );
        assert_eq!(
            anchored(&path).anchor,
            Some(AnchorState::Truncated {
                anchored: 10,
                last: 9
            })
        );
        refused(&path);

        // Rewrite record 6 onwards with every hash recomputed, and append a
        // forged record: the chain verifies, the anchor not.
        let mut head = GENESIS_PREV.to_owned();
        let mut forged = Vec::new();
        for (i, line) in orig.iter().enumerate() {
            let mut v: Map<String, Value> = serde_json::from_str(line).unwrap();
            if i >= 5 {
                v.insert("decision".into(), "deny".into());
            }
            let members: Map<String, Value> = v
                .into_iter()
                .filter(|(k, _)| !RESERVED_FIELDS.contains(&k.as_str()))
                .collect();
            let (l, _) = build_line(
                i as u64 + 1,
                "2025-01-01T00:00:00.000Z",
                &head,
                &serialize_members(&members).unwrap(),
            );
            head = sha256_hex(l.as_bytes());
            forged.push(l);
        }
        write_lines(&path, &forged);
        assert_eq!(verify_file(&path, None).unwrap().first_problem, None);
        assert_eq!(
            anchored(&path).anchor,
            Some(AnchorState::Rewritten { seq: 10 })
        );
        assert!(refused(&path).contains("rewritten"));

        // Records appended after the anchor are named when the log reopens.
        write_lines(&path, &orig);
        let mut extra = orig.clone();
        let (l, _) = build_line(
            11,
            "2025-01-01T00:00:00.000Z",
            &sha256_hex(orig[9].as_bytes()),
            &serialize_members(&fields(11)).unwrap(),
        );
        extra.push(l);
        write_lines(&path, &extra);
        assert_eq!(
            anchored(&path).anchor,
            Some(AnchorState::Holds { seq: 10, after: 1 })
        );
        let (log, _) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        drop(log);
        let rec: Value = serde_json::from_str(&lines(&path)[11]).unwrap();
        assert_eq!(
            (
                rec["event"].as_str(),
                rec["first_seq"].as_u64(),
                rec["last_seq"].as_u64()
            ),
            (Some(UNANCHORED_EVENT), Some(11), Some(11))
        );
        assert_eq!(
            anchored(&path).anchor,
            Some(AnchorState::Holds { seq: 12, after: 0 })
        );
    }

    /// A kill between the log write and the anchor write, then a power
    /// loss mid-write: a record after the anchor and a torn line after it.
    /// The recovery record must follow the torn line, the unanchored one
    /// comes after (the order was the other way round, and verify failed).
    #[tokio::test]
    async fn unanchored_records_and_a_torn_tail_recover_together() {
        let (_dir, path) = log_of(10).await;
        let mut ls = lines(&path);
        let (l, _) = build_line(
            11,
            "2025-01-01T00:00:00.000Z",
            &sha256_hex(ls[9].as_bytes()),
            &serialize_members(&fields(11)).unwrap(),
        );
        ls.push(l);
        write_lines(&path, &ls);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"seq\":12,\"ts\":\"20").unwrap();
        drop(f);
        let (log, report) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        assert_eq!(report.torn_tail.unwrap().lines[0].line, 12);
        drop(log);
        let v = verify_file(&path, Some(&anchor::default_path(&path))).unwrap();
        assert_eq!(v.first_problem, None, "{:?}", v.first_problem);
        assert_eq!(v.recovered_torn_lines, vec![12]);
        let last: Value = serde_json::from_str(lines(&path).last().unwrap()).unwrap();
        assert_eq!(
            (
                last["event"].as_str(),
                last["first_seq"].as_u64(),
                last["last_seq"].as_u64()
            ),
            (Some(UNANCHORED_EVENT), Some(11), Some(11))
        );
    }

    #[derive(serde::Serialize)]
    struct Typed {
        event: &'static str,
        i: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<&'static str>,
    }

    /// With a commit delay the writer holds a batch open while announced
    /// records are on their way, acknowledges none of it before the one
    /// sync, and stops waiting as soon as the last announced record is in
    /// (the delay here is an hour: a writer that waited it out would hang
    /// the test). A failed sync acknowledges none of the batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_delay_gathers_announced_records_and_acknowledges_only_durable_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let faults = Arc::new(faults::Faults::default());
        let (log, _) = AuditLog::open_inner(
            &path,
            &anchor::default_path(&path),
            Arc::new(SystemClock),
            Duration::from_secs(3600),
            faults.clone(),
        )
        .unwrap();
        // Nothing announced: no wait at all.
        assert_eq!(log.append(fields(0)).await.unwrap().seq, 1);
        assert_eq!(faults.batches.load(Ordering::SeqCst), 1);

        let mut announced: Vec<Expected> = (0..8).map(|_| log.expect()).collect();
        let last = announced.pop().unwrap();
        let mut appends = Vec::new();
        for (i, expected) in announced.into_iter().enumerate() {
            let log = log.clone();
            appends.push(tokio::spawn(async move {
                log.append_expected(
                    &Typed {
                        event: "t",
                        i: i as u64,
                        note: None,
                    },
                    expected,
                )
                .await
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            appends.iter().all(|a| !a.is_finished()),
            "nothing is acknowledged while an announced record is on its way"
        );
        assert_eq!(lines(&path).len(), 1, "and nothing of the batch is written");
        let receipt = log
            .append_expected(
                &Typed {
                    event: "t",
                    i: 7,
                    note: Some("last"),
                },
                last,
            )
            .await
            .unwrap();
        let mut receipts = vec![receipt];
        for a in appends {
            receipts.push(a.await.unwrap().unwrap());
        }
        assert_eq!(
            faults.batches.load(Ordering::SeqCst),
            2,
            "one sync for the eight"
        );
        let mut seqs: Vec<u64> = receipts.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (2..=9).collect::<Vec<_>>());
        let written = lines(&path);
        for r in &receipts {
            let line: Value = serde_json::from_str(&written[r.seq as usize - 1]).unwrap();
            assert_eq!(line["hash"], r.hash.as_str());
            assert_eq!(line["event"], "t");
        }
        let last_line: Value =
            serde_json::from_str(&written[receipts[0].seq as usize - 1]).unwrap();
        assert_eq!(
            (&last_line["i"], &last_line["note"]),
            (&Value::from(7), &Value::from("last"))
        );
        assert!(!written[receipts[1].seq as usize - 1].contains("note"));

        // A batch whose write fails: every announced record of it is refused.
        let announced: Vec<Expected> = (0..3).map(|_| log.expect()).collect();
        faults.fail_writes.store(1, Ordering::SeqCst);
        let failed =
            futures_util::future::join_all(announced.into_iter().enumerate().map(|(i, e)| {
                let log = log.clone();
                async move {
                    log.append_expected(
                        &Typed {
                            event: "f",
                            i: i as u64,
                            note: None,
                        },
                        e,
                    )
                    .await
                }
            }))
            .await;
        assert!(failed.iter().all(Result::is_err), "{failed:?}");
        assert_eq!(log.append(fields(10)).await.unwrap().seq, 10);
        drop(log);
        let v = verify_file(&path, Some(&anchor::default_path(&path))).unwrap();
        assert_eq!((v.records, v.first_problem), (10, None));
    }

    #[test]
    fn typed_records_are_objects_without_the_logs_members() {
        assert_eq!(
            typed_members(&Typed {
                event: "e",
                i: 1,
                note: None
            })
            .unwrap(),
            r#","event":"e","i":1"#
        );
        assert_eq!(typed_members(&serde_json::json!({})).unwrap(), "");
        assert!(matches!(typed_members(&5), Err(AuditError::NotAnObject)));
        assert!(matches!(
            typed_members(&serde_json::json!({"a": 1, "seq": 2})),
            Err(AuditError::ReservedField(k)) if k == "seq"
        ));
    }

    #[tokio::test]
    async fn a_failed_anchor_write_acknowledges_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let faults = Arc::new(faults::Faults::default());
        let (log, _) = AuditLog::open_inner(
            &path,
            &anchor::default_path(&path),
            Arc::new(SystemClock),
            Duration::ZERO,
            faults.clone(),
        )
        .unwrap();
        write_n(&log, 0, 3).await;
        faults.fail_anchors.store(1, Ordering::SeqCst);
        assert!(log.append(fields(3)).await.is_err());
        assert_eq!(log.append(fields(4)).await.unwrap().seq, 5);
        drop(log);
        let v = verify_file(&path, Some(&anchor::default_path(&path))).unwrap();
        assert_eq!((v.records, v.first_problem), (5, None));
        assert_eq!(v.anchor, Some(AnchorState::Holds { seq: 5, after: 0 }));
    }

    #[tokio::test]
    async fn unrecovered_torn_line_in_the_middle_is_a_problem() {
        let (_dir, path) = log_of(10).await;
        let mut ls = lines(&path);
        ls[4].truncate(30);
        write_lines(&path, &ls);
        let p = problem(&path);
        assert_eq!((p.line, p.kind), (5, ProblemKind::Malformed));
    }

    #[tokio::test]
    async fn valid_last_line_without_newline_is_kept() {
        let (_dir, path) = log_of(5).await;
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 1).unwrap();
        drop(f);
        assert_eq!(verify_file(&path, None).unwrap().first_problem, None);
        let (log, report) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        assert_eq!(report.torn_tail, None);
        assert_eq!(log.append(fields(9)).await.unwrap().seq, 6);
        let v = verify_file(&path, None).unwrap();
        assert_eq!((v.records, v.first_problem), (6, None));
    }

    #[tokio::test]
    async fn reopen_continues_seq_and_locks() {
        let (_dir, path) = log_of(7).await;
        let (log, report) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        assert_eq!(report.records, 7);
        assert!(matches!(
            AuditLog::open(&path, Arc::new(SystemClock)),
            Err(AuditError::Locked { .. })
        ));
        assert_eq!(log.append(fields(1)).await.unwrap().seq, 8);
        let v = verify_file(&path, None).unwrap();
        assert_eq!((v.records, v.first_problem), (8, None));
    }

    #[tokio::test]
    async fn failed_write_is_cut_off_and_log_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (log, _) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        write_n(&log, 0, 3).await;
        let faults = log.inner.as_ref().unwrap().faults.clone();

        faults.fail_writes.store(1, Ordering::SeqCst);
        let err = log.append(fields(3)).await.unwrap_err();
        assert!(err.to_string().contains("write failed"), "{err}");
        assert_eq!(log.append(fields(4)).await.unwrap().seq, 4);

        // The cut-off itself fails twice: appends fail until it succeeds.
        faults.fail_writes.store(1, Ordering::SeqCst);
        faults.fail_truncates.store(2, Ordering::SeqCst);
        assert!(log.append(fields(5)).await.is_err());
        assert!(log.append(fields(6)).await.is_err());
        assert_eq!(log.append(fields(7)).await.unwrap().seq, 5);
        let v = verify_file(&path, None).unwrap();
        assert_eq!((v.records, v.first_problem), (5, None));
        assert!(v.recovered_torn_lines.is_empty());
    }

    #[tokio::test]
    async fn crash_after_failed_write_recovers_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (log, _) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        write_n(&log, 0, 3).await;
        let faults = log.inner.as_ref().unwrap().faults.clone();
        faults.fail_writes.store(1, Ordering::SeqCst);
        faults.fail_truncates.store(100, Ordering::SeqCst);
        assert!(log.append(fields(3)).await.is_err());
        drop(log); // "crash" with the partial line still there

        assert_eq!(problem(&path).kind, ProblemKind::TornTail);
        let (log, report) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        assert_eq!(report.torn_tail.unwrap().lines[0].line, 4);
        assert_eq!(log.append(fields(4)).await.unwrap().seq, 5);
        let v = verify_file(&path, None).unwrap();
        assert_eq!(v.first_problem, None);
        assert_eq!(v.recovered_torn_lines, vec![4]);
    }

    #[tokio::test]
    async fn garbage_is_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut junk = b"\n\n{\"seq\":18446744073709551615,\"ts\":1}\n[1,2]\n\xff\xfe\n".to_vec();
        junk.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 10));
        std::fs::write(&path, &junk).unwrap();
        let p = problem(&path);
        assert_eq!(p.line, 1);
        let (log, report) = AuditLog::open(&path, Arc::new(SystemClock)).unwrap();
        assert!(report.torn_tail.is_some());
        assert_eq!(log.append(fields(1)).await.unwrap().seq, 7);
    }
}
