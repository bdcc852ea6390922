//! The audit log's high-water mark: the `seq` and line hash of the last
//! acknowledged record, kept in a file of its own.
//!
//! The hash chain alone shows edits *inside* the log, but someone who can
//! write the file can cut its tail, or rewrite records from some point on
//! and recompute every hash, and the chain still verifies. The anchor is
//! written (and synced) after every batch and before any record of it is
//! acknowledged, so every acknowledged record is covered: a log that ends
//! before the anchored record was truncated, and a log whose record at the
//! anchored `seq` hashes differently was rewritten. Keep it apart from the
//! log (`exchange.audit_anchor`: another volume, another owner, a path a log
//! shipper reads) so that changing both takes more than write access to one
//! file.
//!
//! The file holds two fixed-size slots written alternately, each with a
//! check value, so a write torn by a crash leaves the other slot intact;
//! the valid slot with the higher `seq` is the mark. The check is not a
//! secret (it detects torn writes, not forgery): the protection is that
//! the anchor lives where the log's attacker cannot also write.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::sha256_hex;

/// Bytes per slot; a mark is about 120.
const SLOT: usize = 256;

/// One acknowledged position in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub seq: u64,
    /// Hex SHA-256 of the record's whole line (the next record's `prev`).
    pub line_sha256: String,
}

fn check(seq: u64, line_sha256: &str) -> String {
    sha256_hex(format!("tessera-audit-anchor:{seq}:{line_sha256}").as_bytes())[..16].to_owned()
}

fn encode(mark: &Mark) -> [u8; SLOT] {
    let text = format!(
        "{{\"seq\":{},\"line_sha256\":\"{}\",\"check\":\"{}\"}}",
        mark.seq,
        mark.line_sha256,
        check(mark.seq, &mark.line_sha256)
    );
    let mut slot = [b' '; SLOT];
    slot[..text.len()].copy_from_slice(text.as_bytes());
    slot[SLOT - 1] = b'\n';
    slot
}

fn decode(slot: &[u8]) -> Option<Mark> {
    let v: serde_json::Value = serde_json::from_slice(slot.trim_ascii()).ok()?;
    let seq = v.get("seq")?.as_u64()?;
    let line_sha256 = v.get("line_sha256")?.as_str()?.to_owned();
    (v.get("check")?.as_str()? == check(seq, &line_sha256)).then_some(Mark { seq, line_sha256 })
}

/// Where the anchor of the log at `log` lives unless configured.
pub fn default_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".anchor");
    PathBuf::from(name)
}

/// Reads the mark of the anchor at `path`; `None` if there is no file or
/// neither slot is valid.
pub fn read(path: &Path) -> io::Result<Option<Mark>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(best(&bytes).map(|(m, _)| m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The valid mark with the higher `seq`, and its slot. A blank file (as
/// created beside a new log, before its first batch) is the mark of `seq` 0:
/// nothing acknowledged yet. Anything else without a valid slot is no mark.
fn best(bytes: &[u8]) -> Option<(Mark, u64)> {
    let found = bytes
        .chunks(SLOT)
        .take(2)
        .enumerate()
        .filter_map(|(i, s)| decode(s).map(|m| (m, i as u64)))
        .max_by_key(|(m, _)| m.seq);
    found.or_else(|| {
        bytes.iter().all(u8::is_ascii_whitespace).then(|| {
            (
                Mark {
                    seq: 0,
                    line_sha256: String::new(),
                },
                1,
            )
        })
    })
}

/// Creates an empty anchor at `path` (mode 0600) if there is none, durably.
/// Called before a new log is created, so that a log on disk always has an
/// anchor beside it: a crash between the two creations then leaves an anchor
/// without a log (harmless; the next open uses it), never a log without an
/// anchor, which verification must refuse because it cannot tell it from a
/// log whose anchor was removed.
pub fn create_if_missing(path: &Path) -> io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => {
            file.sync_all()?;
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The anchor file, open for writing by the log's one writer.
pub struct Anchor {
    path: PathBuf,
    file: File,
    /// The slot the next mark goes to (not the one holding the current mark).
    next_slot: u64,
}

impl Anchor {
    /// Opens (creating with mode 0600) the anchor at `path`; returns it and
    /// its current mark.
    pub fn open(path: &Path) -> io::Result<(Self, Option<Mark>)> {
        let existed = path.symlink_metadata().is_ok();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        if !existed && let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        let mut bytes = vec![0; 2 * SLOT];
        let n = file.read_at(&mut bytes, 0)?;
        let current = best(&bytes[..n]);
        if n < 2 * SLOT {
            // Both slots written once now, so later marks overwrite blocks
            // the file already has: anchoring keeps working on a full disk,
            // as the log's own recovery needs it to.
            file.write_all_at(&vec![b' '; 2 * SLOT - n], n as u64)?;
            file.sync_data()?;
        }
        let next_slot = current.as_ref().map_or(0, |(_, slot)| 1 - slot);
        Ok((
            Self {
                path: path.to_owned(),
                file,
                next_slot,
            },
            current.map(|(m, _)| m),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `mark` the anchor: written at once (so it holds against any
    /// reader, and survives the process), and synced to the device when
    /// `sync` (see [`super`] on how often).
    pub fn record(&mut self, mark: &Mark, sync: bool) -> io::Result<()> {
        self.file
            .write_all_at(&encode(mark), self.next_slot * SLOT as u64)?;
        if sync {
            self.file.sync_data()?;
        }
        self.next_slot = 1 - self.next_slot;
        Ok(())
    }

    /// Syncs the last mark written.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(seq: u64) -> Mark {
        Mark {
            seq,
            line_sha256: sha256_hex(&seq.to_be_bytes()),
        }
    }

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_slot_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.anchor");
        let (mut a, current) = Anchor::open(&path).unwrap();
        // A new (blank) anchor: nothing acknowledged yet.
        assert_eq!(
            current,
            Some(Mark {
                seq: 0,
                line_sha256: String::new()
            })
        );
        for seq in 1..=5 {
            a.record(&mark(seq), seq % 2 == 0).unwrap();
        }
        drop(a);
        assert_eq!(read(&path).unwrap(), Some(mark(5)));
        // Marks alternate slots (1, 3, 5 in slot 0), so 6 goes to slot 1:
        // tear that write.
        let (a, current) = Anchor::open(&path).unwrap();
        assert_eq!((current, a.next_slot), (Some(mark(5)), 1));
        let torn = &encode(&mark(6))[..40];
        a.file.write_all_at(torn, SLOT as u64).unwrap();
        assert_eq!(read(&path).unwrap(), Some(mark(5)));
        // An edited mark fails its check.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[7] = b'9';
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&path).unwrap(), None);
    }
}
