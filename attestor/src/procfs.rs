//! Readers for `/proc/<pid>`. The root is configurable so tests (and agents
//! that see the host's /proc at another path) can point it elsewhere.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ProcRoot {
    root: PathBuf,
}

impl Default for ProcRoot {
    fn default() -> Self {
        Self::new("/proc")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("process {pid} is gone or unreadable ({path}): {source}")]
    Io {
        pid: i32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: unexpected format: {detail}")]
    Format { path: PathBuf, detail: &'static str },
}

/// The parts of `/proc/<pid>/status` attestation uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStatus {
    pub effective_uid: u32,
    pub effective_gid: u32,
    pub supplementary_gids: Vec<u32>,
}

impl ProcRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn pid_path(&self, pid: i32, file: &str) -> PathBuf {
        let mut path = self.root.join(pid.to_string());
        path.push(file);
        path
    }

    fn read(&self, pid: i32, file: &str) -> Result<(PathBuf, String), ProcError> {
        let path = self.pid_path(pid, file);
        match read_small(&path) {
            Ok(text) => Ok((path, text)),
            Err(source) => Err(ProcError::Io { pid, path, source }),
        }
    }

    /// Start time in clock ticks since boot (field 22 of `stat`). Together with
    /// the PID it names one process for the life of the machine.
    pub fn start_time(&self, pid: i32) -> Result<u64, ProcError> {
        let (path, text) = self.read(pid, "stat")?;
        parse_start_time(&text).ok_or(ProcError::Format {
            path,
            detail: "no start time in stat",
        })
    }

    pub fn status(&self, pid: i32) -> Result<ProcStatus, ProcError> {
        let (path, text) = self.read(pid, "status")?;
        parse_status(&text).ok_or(ProcError::Format {
            path,
            detail: "missing Uid/Gid lines in status",
        })
    }

    /// The effective uid from `status` alone (what the per-call liveness
    /// re-check needs), without collecting the groups.
    pub fn effective_uid(&self, pid: i32) -> Result<u32, ProcError> {
        let (path, text) = self.read(pid, "status")?;
        parse_effective_uid(&text).ok_or(ProcError::Format {
            path,
            detail: "missing Uid line in status",
        })
    }

    /// The owner of `/proc/<pid>`: the process's effective uid while it is
    /// dumpable, root otherwise (proc(5)). Revalidated by the kernel on every
    /// lookup, and far cheaper than formatting `status`.
    pub fn dir_owner(&self, pid: i32) -> Result<u32, ProcError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.root.join(pid.to_string());
        match std::fs::metadata(&path) {
            Ok(meta) => Ok(meta.uid()),
            Err(source) => Err(ProcError::Io { pid, path, source }),
        }
    }

    /// The executable's path as the kernel resolved it (never a symlink).
    pub fn exe_path(&self, pid: i32) -> Result<PathBuf, ProcError> {
        let path = self.pid_path(pid, "exe");
        std::fs::read_link(&path).map_err(|source| ProcError::Io { pid, path, source })
    }

    /// Opens the executable itself through the `exe` magic link, so a file
    /// replaced at the same path after exec cannot be hashed instead.
    pub fn open_exe(&self, pid: i32) -> Result<File, ProcError> {
        let path = self.pid_path(pid, "exe");
        File::open(&path).map_err(|source| ProcError::Io { pid, path, source })
    }
}

/// Reads a small `/proc` file in as few system calls as the kernel allows:
/// open, reads into a page-sized buffer until end of file, close. (std's
/// `read_to_string` also stats the file for a size hint, which `/proc`
/// files do not give, and probes with a 32-byte read first.) The liveness
/// re-check on every call of a root caller reads `status` this way.
fn read_small(path: &Path) -> io::Result<String> {
    use std::io::Read as _;
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // `comm` (field 2) is in parentheses and may itself contain ") ", so split
    // after the last ')'. Field 3 (state) is then index 0; field 22 is index 19.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

fn parse_effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    // real, effective, saved, filesystem
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

fn parse_status(status: &str) -> Option<ProcStatus> {
    let mut uid = None;
    let mut gid = None;
    let mut groups = Vec::new();
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            // real, effective, saved, filesystem
            uid = v.split_ascii_whitespace().nth(1)?.parse().ok();
        } else if let Some(v) = line.strip_prefix("Gid:") {
            gid = v.split_ascii_whitespace().nth(1)?.parse().ok();
        } else if let Some(v) = line.strip_prefix("Groups:") {
            groups = v
                .split_ascii_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect();
        }
    }
    Some(ProcStatus {
        effective_uid: uid?,
        effective_gid: gid?,
        supplementary_gids: groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_hostile_comm() {
        let stat = "4242 (evil) 1 2 3) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(parse_start_time("1 (x) S 1"), None);
    }

    #[test]
    fn status_effective_ids_and_groups() {
        let status = "Name:\tcat\nUid:\t1000\t1001\t1000\t1000\nGid:\t100\t101\t100\t100\nGroups:\t4 27 1000 \n";
        let s = parse_status(status).unwrap();
        assert_eq!(s.effective_uid, 1001);
        assert_eq!(s.effective_gid, 101);
        assert_eq!(s.supplementary_gids, vec![4, 27, 1000]);
        assert_eq!(parse_effective_uid(status), Some(1001));
        assert!(parse_status("Name: x\n").is_none());
        assert!(parse_effective_uid("Name: x\nUid:\t1\n").is_none());
    }

    #[test]
    fn reads_the_real_proc_for_this_process() {
        let root = ProcRoot::default();
        let pid = std::process::id() as i32;
        assert!(root.start_time(pid).unwrap() > 0);
        assert_eq!(
            root.status(pid).unwrap().effective_uid,
            nix::unistd::geteuid().as_raw()
        );
        assert_eq!(
            root.effective_uid(pid).unwrap(),
            nix::unistd::geteuid().as_raw()
        );
        assert_eq!(
            root.pid_path(pid, "status"),
            Path::new("/proc").join(pid.to_string()).join("status")
        );
        assert_eq!(root.pid_path(-12, "x"), Path::new("/proc/-12/x"));
        // The same bytes as std's reader, for a file larger than the first buffer.
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        let text: String = (0..3000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&big, &text).unwrap();
        assert_eq!(read_small(&big).unwrap(), text);
        assert_eq!(
            root.exe_path(pid).unwrap(),
            std::env::current_exe().unwrap()
        );
    }
}
