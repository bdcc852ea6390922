//! Durable revocation state: revoked token ids (`jti`) and ended tasks.
//!
//! Lookups ([`RevocationStore::is_token_revoked`],
//! [`RevocationStore::is_task_ended`]) are on the introspection hot path: they
//! read an in-memory map under a `RwLock` and never touch the disk.
//!
//! Persistence is an append-only JSONL file, one entry per line:
//! `{"k":"jti"|"task","id":"…","until":<unix seconds>}`. Each revocation is
//! written and `fdatasync`ed before it is acknowledged; revocations are rare,
//! so one fsync each is fine. An entry matters only until `until` (the moment
//! the token, or every token of the task, would have expired anyway); expired
//! entries are dropped on load and by [`RevocationStore::prune`], which also
//! rewrites the file atomically once it holds mostly dead lines.
//!
//! A torn last line (a crash before its fsync returned, so never acknowledged)
//! is skipped with a warning and cut off; any other malformed line is an error
//! naming the line. If a write fails, the revocation still takes effect in
//! memory (fail closed) and the error reports that it is not durable; the
//! partial line is cut off before the next write.
//!
//! In a fleet, the same store also holds what other nodes revoked
//! ([`RevocationStore::apply_remote`]: memory only, the fleet's store keeps
//! them durably) and hands what this node revokes to the fleet
//! ([`RevocationStore::set_outbox`]). Every introspection path (the exchange
//! socket, the HTTPS face, the authority) asks this one store, so a
//! revocation anywhere is seen everywhere. It sits with the foundations so
//! that every service can read it.

use crate::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Longest accepted `jti` or task id, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest line read from the state file.
const MAX_LINE_BYTES: usize = 4096;
/// Compact when at least this many dead lines outnumber the live entries.
const COMPACT_MIN_DEAD: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("revocation state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("revocation state {path} line {line}: {message}")]
    Malformed {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("{kind} is empty")]
    EmptyId { kind: &'static str },
    #[error("{kind} is {len} bytes, more than the {max}-byte limit")]
    IdTooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("revoked in memory but not persisted to {path}: {source}")]
    NotDurable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a revocation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One token, by its `jti`.
    Jti,
    /// Every token of a task, by its key (principal and task id, hashed).
    Task,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Jti => "token id (jti)",
            Kind::Task => "task id",
        }
    }
}

/// One revocation: a line of the state file, and what the fleet shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub k: Kind,
    pub id: String,
    /// Unix seconds; the entry matters only before this.
    pub until: u64,
}

impl Record {
    /// Checks the id as a revocation made here would be checked.
    pub fn validate(&self) -> Result<(), RevocationError> {
        check_id(self.k, &self.id)
    }
}

/// Revocation key of a task: tasks are named by their principal and id, so
/// two workloads using the same task id never touch each other's tokens.
/// Nodes and the authority (an operator ending a task) key them alike.
pub fn task_key(principal: &str, task_id: &str) -> String {
    crate::audit::sha256_hex(format!("{principal}\n{task_id}").as_bytes())
}

type Entry = Record;

#[derive(Default)]
struct State {
    tokens: HashMap<String, u64>,
    tasks: HashMap<String, u64>,
    /// Made on this node (kept in the file), as opposed to learnt from the
    /// fleet: what this node must hand to the fleet again after a restart
    /// or reconnection.
    local: std::collections::HashSet<(Kind, String)>,
}

impl State {
    fn map(&mut self, kind: Kind) -> &mut HashMap<String, u64> {
        match kind {
            Kind::Jti => &mut self.tokens,
            Kind::Task => &mut self.tasks,
        }
    }

    fn insert(&mut self, kind: Kind, id: &str, until: u64) {
        let slot = self.map(kind).entry(id.to_owned()).or_insert(until);
        *slot = (*slot).max(until);
    }

    fn len(&self) -> usize {
        self.tokens.len() + self.tasks.len()
    }

    fn retain_live(&mut self, now: u64) {
        self.tokens.retain(|_, until| *until > now);
        self.tasks.retain(|_, until| *until > now);
        let (tokens, tasks) = (&self.tokens, &self.tasks);
        self.local.retain(|(k, id)| match k {
            Kind::Jti => tokens.contains_key(id),
            Kind::Task => tasks.contains_key(id),
        });
    }

    fn until(&self, kind: Kind, id: &str) -> Option<u64> {
        match kind {
            Kind::Jti => self.tokens.get(id).copied(),
            Kind::Task => self.tasks.get(id).copied(),
        }
    }

    /// The file's content: the entries made here (the fleet's are not kept
    /// in the file).
    fn serialize(&self) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        let mut lines = 0;
        for (kind, id) in &self.local {
            if let Some(until) = self.until(*kind, id) {
                out.extend(entry_line(*kind, id, until));
                lines += 1;
            }
        }
        (out, lines)
    }
}

fn entry_line(kind: Kind, id: &str, until: u64) -> Vec<u8> {
    let entry = Entry {
        k: kind,
        id: id.to_owned(),
        until,
    };
    // Serialising a struct of strings and integers cannot fail.
    let mut line = serde_json::to_vec(&entry).unwrap_or_default();
    line.push(b'\n');
    line
}

struct Persist {
    path: PathBuf,
    /// `None` after a compaction whose reopen failed: reopened before the next write.
    file: Option<File>,
    /// File length after the last durable write.
    good_len: u64,
    /// A failed write may have left bytes past `good_len`.
    dirty: bool,
    /// Entry lines in the file (live and dead).
    lines: u64,
}

impl Persist {
    fn io_err(&self, source: io::Error) -> RevocationError {
        RevocationError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn append(&mut self, line: &[u8]) -> io::Result<()> {
        let file = match self.file.take() {
            Some(f) => f,
            None => open_append(&self.path)?,
        };
        let file = self.file.insert(file);
        if self.dirty {
            file.set_len(self.good_len)?;
            file.sync_data()?;
            self.dirty = false;
        }
        self.dirty = true;
        file.write_all(line)?;
        file.sync_data()?;
        self.dirty = false;
        self.good_len += line.len() as u64;
        self.lines += 1;
        Ok(())
    }

    /// Replaces the file with `data` (`lines` entries), atomically.
    fn rewrite(&mut self, data: &[u8], lines: u64) -> io::Result<()> {
        crate::fsutil::write_private_atomic(&self.path, data)?;
        self.good_len = data.len() as u64;
        self.lines = lines;
        self.dirty = false;
        // The old handle points at the replaced file.
        self.file = None;
        self.file = Some(open_append(&self.path)?);
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.permissions().mode() & 0o777 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Revoked tokens and ended tasks; `Send + Sync`, share it with an `Arc`.
pub struct RevocationStore {
    state: RwLock<State>,
    /// Lock order: `persist` before `state`.
    persist: Option<Mutex<Persist>>,
    /// Where revocations made here are handed to the fleet.
    outbox: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Record>>>,
}

impl std::fmt::Debug for RevocationStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationStore")
            .field("entries", &self.len())
            .field("persistent", &self.persist.is_some())
            .finish()
    }
}

fn unix_floor(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_ceil(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| {
        d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
    })
}

fn check_id(kind: Kind, id: &str) -> Result<(), RevocationError> {
    if id.is_empty() {
        return Err(RevocationError::EmptyId { kind: kind.name() });
    }
    if id.len() > MAX_ID_BYTES {
        return Err(RevocationError::IdTooLong {
            kind: kind.name(),
            len: id.len(),
            max: MAX_ID_BYTES,
        });
    }
    Ok(())
}

impl RevocationStore {
    /// Memory only (what an authority replica keeps of the fleet's).
    pub fn memory() -> Self {
        RevocationStore {
            state: RwLock::default(),
            persist: None,
            outbox: Mutex::default(),
        }
    }

    /// `path: None` = memory only. Loads existing state, dropping entries whose
    /// `until` is already past (and compacting the file if it is mostly dead).
    pub fn open(path: Option<&Path>, now: SystemTime) -> Result<Self, RevocationError> {
        let Some(path) = path else {
            return Ok(Self::memory());
        };
        let io_err = |source| RevocationError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let existed = path.symlink_metadata().is_ok();
        let file = open_append(path).map_err(io_err)?;
        if !existed {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        }

        let mut state = State::default();
        let mut reader = BufReader::new(&file);
        let mut buf = Vec::new();
        let mut n = 0u64;
        let mut offset = 0u64;
        let mut good_len = 0u64;
        let mut lines = 0u64;
        let mut ends_with_newline = true;
        // An invalid line is an error unless it is the last one.
        let mut bad: Option<(u64, String)> = None;
        while let Some(info) =
            crate::audit::read_line_capped(&mut reader, &mut buf, MAX_LINE_BYTES).map_err(io_err)?
        {
            n += 1;
            if let Some((line, message)) = bad.take() {
                return Err(RevocationError::Malformed {
                    path: path.to_owned(),
                    line,
                    message,
                });
            }
            offset += info.len + u64::from(info.terminated);
            ends_with_newline = info.terminated;
            let parsed = if info.oversized {
                Err(format!("longer than {MAX_LINE_BYTES} bytes"))
            } else {
                serde_json::from_slice::<Entry>(&buf)
                    .map_err(|e| e.to_string())
                    .and_then(|e| {
                        check_id(e.k, &e.id).map_err(|e| e.to_string())?;
                        Ok(e)
                    })
            };
            match parsed {
                Ok(entry) => {
                    state.insert(entry.k, &entry.id, entry.until);
                    state.local.insert((entry.k, entry.id));
                    lines += 1;
                    good_len = offset;
                }
                Err(message) => bad = Some((n, message)),
            }
        }
        drop(reader);
        if let Some((line, message)) = bad {
            tracing::warn!(path = %path.display(), line, "revocation state: skipping torn last line ({message})");
            file.set_len(good_len)
                .and_then(|()| file.sync_data())
                .map_err(io_err)?;
        } else if !ends_with_newline {
            // A complete last entry missing only its newline: keep it.
            (&file)
                .write_all(b"\n")
                .and_then(|()| file.sync_data())
                .map_err(io_err)?;
            good_len += 1;
        }

        let store = RevocationStore {
            state: RwLock::new(state),
            persist: Some(Mutex::new(Persist {
                path: path.to_owned(),
                file: Some(file),
                good_len,
                dirty: false,
                lines,
            })),
            outbox: Mutex::default(),
        };
        store.prune(now)?;
        tracing::info!(path = %path.display(), entries = store.len(), "revocation state loaded");
        Ok(store)
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read()
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write()
    }

    fn persist(&self) -> Option<MutexGuard<'_, Persist>> {
        self.persist.as_ref().map(|m| m.lock())
    }

    fn revoke(&self, kind: Kind, id: &str, until: SystemTime) -> Result<(), RevocationError> {
        check_id(kind, id)?;
        let until = unix_ceil(until);
        self.to_fleet(kind, id, until);
        let Some(mut persist) = self.persist() else {
            self.insert_local(kind, id, until);
            return Ok(());
        };
        let result = persist.append(&entry_line(kind, id, until));
        // Effective in memory even if the disk failed: fail closed.
        self.insert_local(kind, id, until);
        result.map_err(|source| {
            tracing::error!(path = %persist.path.display(), error = %source, "revocation not persisted");
            RevocationError::NotDurable {
                path: persist.path.clone(),
                source,
            }
        })
    }

    fn insert_local(&self, kind: Kind, id: &str, until: u64) {
        let mut state = self.write();
        state.insert(kind, id, until);
        state.local.insert((kind, id.to_owned()));
    }

    fn to_fleet(&self, k: Kind, id: &str, until: u64) {
        if let Some(tx) = &*self.outbox.lock() {
            let _ = tx.send(Record {
                k,
                id: id.to_owned(),
                until,
            });
        }
    }

    /// From now on, every revocation made here is also sent to `outbox` (the
    /// fleet client publishes it). Returns the live ones made here before,
    /// which the fleet may not have yet (after a restart or an outage).
    pub fn set_outbox(
        &self,
        outbox: tokio::sync::mpsc::UnboundedSender<Record>,
        now: SystemTime,
    ) -> Vec<Record> {
        *self.outbox.lock() = Some(outbox);
        self.local_records(now)
    }

    /// The live revocations made on this node.
    pub fn local_records(&self, now: SystemTime) -> Vec<Record> {
        let now = unix_floor(now);
        let state = self.read();
        state
            .local
            .iter()
            .filter_map(|(k, id)| {
                let until = state.until(*k, id).filter(|u| *u > now)?;
                Some(Record {
                    k: *k,
                    id: id.clone(),
                    until,
                })
            })
            .collect()
    }

    /// Revocations made elsewhere in the fleet: effective at once, kept in
    /// memory only (the fleet's store is their durable home). Invalid or
    /// expired records are skipped; returns how many changed something.
    pub fn apply_remote(&self, records: &[Record], now: SystemTime) -> usize {
        let now = unix_floor(now);
        let mut state = self.write();
        let mut changed = 0;
        for r in records {
            if r.until <= now || r.validate().is_err() {
                continue;
            }
            if state.until(r.k, &r.id).is_none_or(|u| u < r.until) {
                state.insert(r.k, &r.id, r.until);
                changed += 1;
            }
        }
        changed
    }

    /// Whether `record` is already in force (as long or longer).
    pub fn covers(&self, record: &Record) -> bool {
        self.read()
            .until(record.k, &record.id)
            .is_some_and(|u| u >= record.until)
    }

    /// Revokes one token until `until` (when it would have expired anyway).
    /// Durable (fsync) before returning `Ok`.
    pub fn revoke_token(&self, jti: &str, until: SystemTime) -> Result<(), RevocationError> {
        self.revoke(Kind::Jti, jti, until)
    }

    /// A whole task ended: every token carrying this task id is revoked until
    /// `until`. Durable (fsync) before returning `Ok`.
    pub fn end_task(&self, task_id: &str, until: SystemTime) -> Result<(), RevocationError> {
        self.revoke(Kind::Task, task_id, until)
    }

    pub fn is_token_revoked(&self, jti: &str, now: SystemTime) -> bool {
        let now = unix_floor(now);
        self.read().tokens.get(jti).is_some_and(|&u| now < u)
    }

    pub fn is_task_ended(&self, task_id: &str, now: SystemTime) -> bool {
        let now = unix_floor(now);
        self.read().tasks.get(task_id).is_some_and(|&u| now < u)
    }

    /// Drops expired entries from memory and compacts the file (atomic
    /// rewrite) when it holds mostly dead lines.
    pub fn prune(&self, now: SystemTime) -> Result<(), RevocationError> {
        let now = unix_floor(now);
        let persist = self.persist();
        let mut state = self.write();
        state.retain_live(now);
        let Some(mut persist) = persist else {
            return Ok(());
        };
        let live = state.local.len() as u64;
        let dead = persist.lines.saturating_sub(live);
        if dead < COMPACT_MIN_DEAD || dead <= live {
            return Ok(());
        }
        let (data, live) = state.serialize();
        // Revocations wait on `persist`; lookups only need `state`.
        drop(state);
        persist
            .rewrite(&data, live)
            .map_err(|e| persist.io_err(e))?;
        tracing::info!(path = %persist.path.display(), live, dead, "revocation state compacted");
        Ok(())
    }

    /// Entries in memory (expired ones included until the next prune).
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revocations.jsonl");
        (dir, path)
    }

    #[test]
    fn revoke_survives_reopen() {
        let (_d, path) = setup();
        let s = RevocationStore::open(Some(&path), at(1000)).unwrap();
        s.revoke_token("jti-1", at(2000)).unwrap();
        assert!(s.is_token_revoked("jti-1", at(1500)));
        assert!(!s.is_token_revoked("jti-1", at(2000)));
        assert!(!s.is_token_revoked("jti-2", at(1500)));
        drop(s);
        let s = RevocationStore::open(Some(&path), at(1001)).unwrap();
        assert!(s.is_token_revoked("jti-1", at(1500)));
        assert_eq!(s.len(), 1);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn task_end_survives_reopen() {
        let (_d, path) = setup();
        let s = RevocationStore::open(Some(&path), at(1000)).unwrap();
        s.end_task("task-42", at(5000)).unwrap();
        assert!(s.is_task_ended("task-42", at(1000)));
        assert!(!s.is_token_revoked("task-42", at(1000)));
        drop(s);
        let s = RevocationStore::open(Some(&path), at(1000)).unwrap();
        assert!(s.is_task_ended("task-42", at(4999)));
        assert!(!s.is_task_ended("task-43", at(1000)));
    }

    #[test]
    fn expired_entries_dropped_on_reopen() {
        let (_d, path) = setup();
        let s = RevocationStore::open(Some(&path), at(1000)).unwrap();
        s.revoke_token("old", at(1100)).unwrap();
        s.revoke_token("new", at(3000)).unwrap();
        s.end_task("old-task", at(1100)).unwrap();
        drop(s);
        let s = RevocationStore::open(Some(&path), at(2000)).unwrap();
        assert_eq!(s.len(), 1);
        assert!(s.is_token_revoked("new", at(2000)));
        assert!(!s.is_token_revoked("old", at(1050)));
    }

    #[test]
    fn compaction_keeps_live_entries() {
        let (_d, path) = setup();
        let s = RevocationStore::open(Some(&path), at(1000)).unwrap();
        for i in 0..100 {
            s.revoke_token(&format!("dead-{i}"), at(1500)).unwrap();
        }
        s.revoke_token("live", at(9000)).unwrap();
        s.end_task("live-task", at(9000)).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        s.prune(at(2000)).unwrap();
        assert_eq!(s.len(), 2);
        let after = std::fs::metadata(&path).unwrap().len();
        assert!(after < before / 10, "{after} vs {before}");
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        // Appends after compaction go to the new file.
        s.revoke_token("later", at(9000)).unwrap();
        drop(s);
        let s = RevocationStore::open(Some(&path), at(2000)).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.is_token_revoked("live", at(2000)));
        assert!(s.is_token_revoked("later", at(2000)));
        assert!(s.is_task_ended("live-task", at(2000)));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn torn_last_line_tolerated() {
        let (_d, path) = setup();
        let s = RevocationStore::open(Some(&path), at(1000)).unwrap();
        s.revoke_token("a", at(9000)).unwrap();
        drop(s);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"k\":\"jti\",\"id\":\"b\",\"unt").unwrap();
        drop(f);
        let s = RevocationStore::open(Some(&path), at(1000)).unwrap();
        assert_eq!(s.len(), 1);
        s.revoke_token("c", at(9000)).unwrap();
        drop(s);
        let s = RevocationStore::open(Some(&path), at(1000)).unwrap();
        assert_eq!(s.len(), 2);
        assert!(s.is_token_revoked("c", at(1000)));
    }

    #[test]
    fn malformed_middle_line_is_an_error() {
        let (_d, path) = setup();
        std::fs::write(
            &path,
            "{\"k\":\"jti\",\"id\":\"a\",\"until\":9000}\nnot json\n{\"k\":\"task\",\"id\":\"t\",\"until\":9000}\n",
        )
        .unwrap();
        let err = RevocationStore::open(Some(&path), at(1000)).unwrap_err();
        assert!(
            matches!(err, RevocationError::Malformed { line: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("line 2"));
    }

    #[test]
    fn long_ids_rejected() {
        let s = RevocationStore::open(None, at(1000)).unwrap();
        let long = "x".repeat(MAX_ID_BYTES + 1);
        assert!(matches!(
            s.revoke_token(&long, at(2000)),
            Err(RevocationError::IdTooLong { .. })
        ));
        assert!(matches!(
            s.end_task("", at(2000)),
            Err(RevocationError::EmptyId { .. })
        ));
        s.end_task(&"y".repeat(MAX_ID_BYTES), at(2000)).unwrap();
    }

    #[test]
    fn memory_only() {
        let s = RevocationStore::open(None, at(1000)).unwrap();
        assert!(s.is_empty());
        s.revoke_token("j", at(1500)).unwrap();
        s.end_task("t", at(3000)).unwrap();
        assert!(s.is_token_revoked("j", at(1200)));
        assert!(s.is_task_ended("t", at(1200)));
        s.prune(at(2000)).unwrap();
        assert_eq!(s.len(), 1);
        assert!(!s.is_token_revoked("j", at(1200)));
    }

    #[test]
    fn the_fleets_revocations_count_but_stay_out_of_the_file() {
        let (_d, path) = setup();
        let s = RevocationStore::open(Some(&path), at(1000)).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        s.revoke_token("before", at(9000)).unwrap();
        assert_eq!(
            s.set_outbox(tx, at(1000)),
            vec![Record {
                k: Kind::Jti,
                id: "before".into(),
                until: 9000
            }],
            "made here before the fleet listened: handed over again"
        );
        s.end_task("mine", at(9000)).unwrap();
        assert_eq!(rx.try_recv().unwrap().id, "mine");
        let remote = [
            Record {
                k: Kind::Jti,
                id: "theirs".into(),
                until: 9000,
            },
            Record {
                k: Kind::Task,
                id: "expired".into(),
                until: 900,
            },
            Record {
                k: Kind::Jti,
                id: String::new(),
                until: 9000,
            },
        ];
        assert_eq!(s.apply_remote(&remote, at(1000)), 1);
        assert!(s.is_token_revoked("theirs", at(1000)));
        assert!(s.covers(&remote[0]));
        assert!(rx.try_recv().is_err(), "the fleet's own are not sent back");
        assert_eq!(s.local_records(at(1000)).len(), 2);
        drop(s);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("theirs"), "{text}");
        let s = RevocationStore::open(Some(&path), at(1000)).unwrap();
        assert!(s.is_task_ended("mine", at(1000)));
        assert!(!s.is_token_revoked("theirs", at(1000)));
    }

    #[test]
    fn later_until_wins() {
        let s = RevocationStore::open(None, at(1000)).unwrap();
        s.revoke_token("j", at(3000)).unwrap();
        s.revoke_token("j", at(2000)).unwrap();
        assert!(s.is_token_revoked("j", at(2500)));
    }
}
