//! PID-reuse protection: a pin on the process that connected, re-checked after
//! every read of /proc and on every RPC.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::pidfd::{self, Creds};
use crate::procfs::{ProcError, ProcRoot};

#[derive(Debug, thiserror::Error)]
pub enum LivenessError {
    #[error("the calling process {pid} has exited")]
    Exited { pid: i32 },
    #[error("PID {pid} now names a different process than the caller")]
    Replaced { pid: i32 },
    #[error("the calling process {pid} changed its user id since connecting")]
    UidChanged { pid: i32 },
    #[error("the calling process {pid} executed another program since connecting")]
    Executed { pid: i32 },
    #[error(transparent)]
    Proc(#[from] ProcError),
}

/// The identity of one process over time: PID, start time, pidfd, and the
/// executable's inode (an `exec` keeps PID and start time but changes it).
#[derive(Debug)]
pub struct ProcessPin {
    proc_root: ProcRoot,
    pid: i32,
    uid: u32,
    /// Read only without a pidfd: the pidfd itself tells a successor apart.
    start_time: Option<u64>,
    exe_inode: Option<(u64, u64)>,
    pidfd: Option<Arc<OwnedFd>>,
}

impl ProcessPin {
    /// Pins `pid`, whose kernel-reported uid at connect time was `uid`.
    pub fn new(
        proc_root: &ProcRoot,
        pid: i32,
        uid: u32,
        pidfd: Option<Arc<OwnedFd>>,
    ) -> Result<Self, LivenessError> {
        // Callers re-check with `check_alive` after reading /proc, which also
        // compares the uid with `SO_PEERCRED`; checking here too would only
        // repeat the same reads.
        Self::pinned(proc_root, pid, uid, pidfd, exe_inode(proc_root, pid))
    }

    /// Pins `pid` to the executable it ran when its connection was accepted
    /// (`exe_at_accept`, from [`crate::PeerInfo::record_exe`]) instead of
    /// reading it again: the re-check after reading /proc then catches an
    /// `exec` at any time since accept, with one `stat` fewer.
    pub fn since_accept(
        proc_root: &ProcRoot,
        pid: i32,
        uid: u32,
        pidfd: Option<Arc<OwnedFd>>,
        exe_at_accept: (u64, u64),
    ) -> Result<Self, LivenessError> {
        Self::pinned(proc_root, pid, uid, pidfd, Some(exe_at_accept))
    }

    fn pinned(
        proc_root: &ProcRoot,
        pid: i32,
        uid: u32,
        pidfd: Option<Arc<OwnedFd>>,
        exe_inode: Option<(u64, u64)>,
    ) -> Result<Self, LivenessError> {
        Ok(Self {
            proc_root: proc_root.clone(),
            pid,
            uid,
            start_time: match pidfd {
                Some(_) => None,
                None => Some(proc_root.start_time(pid)?),
            },
            exe_inode,
            pidfd,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// (device, inode) of the executable when the pin was taken.
    pub fn exe_inode(&self) -> Option<(u64, u64)> {
        self.exe_inode
    }

    /// Fails closed if the process exited, its PID was reused, it changed its
    /// effective uid, or it executed another binary.
    pub fn check_alive(&self) -> Result<(), LivenessError> {
        let pid = self.pid;
        match &self.pidfd {
            // The pidfd names the very process that connected: while it has
            // not exited, `pid` cannot have been reused, so its start time
            // need not be read. One poll *after* the /proc reads proves they
            // described that process, not a successor: an exit before or
            // during the reads leaves the pidfd readable, and the reads then
            // count for nothing. A failed read or comparison polls again, so
            // a caller that simply exited is reported as such.
            Some(pidfd) => match self.same_uid_and_executable(Some(pidfd)) {
                Ok(()) => exited(pidfd, pid),
                Err(e) => {
                    exited(pidfd, pid)?;
                    Err(e)
                }
            },
            None => {
                let start_time = self
                    .proc_root
                    .start_time(pid)
                    .map_err(|_| LivenessError::Exited { pid })?;
                if Some(start_time) != self.start_time {
                    return Err(LivenessError::Replaced { pid });
                }
                self.same_uid_and_executable(None)
            }
        }
    }

    fn same_uid_and_executable(&self, pidfd: Option<&OwnedFd>) -> Result<(), LivenessError> {
        let pid = self.pid;
        let same_uid = match pidfd.map(pidfd::credentials) {
            // The kernel reads the credentials straight from the pidfd.
            Some(Creds::EffectiveUid(euid)) => euid == self.uid,
            Some(Creds::Gone) => return Err(LivenessError::Exited { pid }),
            None | Some(Creds::Unsupported) => self.effective_uid_is_pinned_from_proc()?,
        };
        if !same_uid {
            return Err(LivenessError::UidChanged { pid });
        }
        if self.exe_inode.is_some() && exe_inode(&self.proc_root, pid) != self.exe_inode {
            return Err(LivenessError::Executed { pid });
        }
        Ok(())
    }

    /// Whether the effective uid is still the pinned one, from `/proc` (no
    /// pidfd, or a kernel before `PIDFD_GET_INFO`).
    fn effective_uid_is_pinned_from_proc(&self) -> Result<bool, LivenessError> {
        let pid = self.pid;
        let effective_uid = || {
            self.proc_root
                .effective_uid(pid)
                .map_err(|_| LivenessError::Exited { pid })
        };
        // Fast path: `/proc/<pid>` owned by a non-root uid proves the process
        // is dumpable and runs with that effective uid. Root-owned means root
        // *or* not dumpable, so then read `status`. For a caller that
        // connected as root the owner is root in both cases that keep it
        // root, so `status` is read straight away: the same answer, one
        // `stat` fewer.
        if self.uid == 0 {
            return Ok(effective_uid()? == 0);
        }
        let owner = self
            .proc_root
            .dir_owner(pid)
            .map_err(|_| LivenessError::Exited { pid })?;
        Ok(if owner != 0 {
            owner == self.uid
        } else {
            effective_uid()? == self.uid
        })
    }
}

/// Err once the process behind `pidfd` has exited (a pidfd polls readable
/// from then on).
fn exited(pidfd: &OwnedFd, pid: i32) -> Result<(), LivenessError> {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&zero)) {
        Ok(0) => Ok(()),
        _ => Err(LivenessError::Exited { pid }),
    }
}

/// (device, inode) of the running executable, when the agent may see it.
pub(crate) fn exe_inode(proc_root: &ProcRoot, pid: i32) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(proc_root.pid_path(pid, "exe")).ok()?;
    Some((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_exits_fails_the_check() {
        let root = ProcRoot::default();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep(1) is available");
        let pid = child.id() as i32;
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let pin = ProcessPin::new(&root, pid, uid, Some(Arc::new(pidfd))).unwrap();
        pin.check_alive().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(
            pin.check_alive(),
            Err(LivenessError::Exited { .. })
        ));
    }

    #[test]
    fn a_pin_from_accept_fails_when_the_executable_differs() {
        let root = ProcRoot::default();
        let pid = std::process::id() as i32;
        let uid = nix::unistd::geteuid().as_raw();
        let running = exe_inode(&root, pid).expect("own executable is visible");
        ProcessPin::since_accept(&root, pid, uid, None, running)
            .unwrap()
            .check_alive()
            .unwrap();
        // As if another program ran when the connection was accepted.
        let other = (running.0, running.1.wrapping_add(1));
        assert!(matches!(
            ProcessPin::since_accept(&root, pid, uid, None, other)
                .unwrap()
                .check_alive(),
            Err(LivenessError::Executed { .. })
        ));
    }

    #[test]
    fn a_non_root_process_is_checked_by_the_owner_of_its_proc_directory() {
        use std::os::unix::process::CommandExt;
        // As root, the child runs as nobody; otherwise as ourselves. Either
        // way it is a dumpable non-root process, the fast path's case.
        let me = rustix::process::geteuid().as_raw();
        let uid = if me == 0 { 65534 } else { me };
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        if me == 0 {
            command.uid(uid);
        }
        let mut child = command.spawn().expect("sleep(1) is available");
        let pid = child.id() as i32;
        let root = ProcRoot::default();
        assert_eq!(root.dir_owner(pid).unwrap(), uid);
        let result = ProcessPin::new(&root, pid, uid, None).and_then(|pin| {
            let same = pin.check_alive();
            let other = ProcessPin::new(&root, pid, uid + 1, None)?.check_alive();
            Ok((same, other))
        });
        child.kill().unwrap();
        child.wait().unwrap();
        let (same, other) = result.unwrap();
        same.unwrap();
        assert!(matches!(other, Err(LivenessError::UidChanged { .. })));
    }

    #[test]
    fn a_caller_that_connected_as_root_and_runs_as_another_uid_fails_the_check() {
        use std::os::unix::process::CommandExt;
        // A process whose effective uid is not root, pinned as if it had
        // connected as root: the re-check reads its status (the owner of
        // /proc/<pid> cannot tell root from a non-dumpable process) and
        // refuses it, with and without a pidfd.
        let me = rustix::process::geteuid().as_raw();
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        if me == 0 {
            command.uid(65534);
        }
        let mut child = command.spawn().expect("sleep(1) is available");
        let pid = child.id() as i32;
        let root = ProcRoot::default();
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        let with_pidfd =
            ProcessPin::new(&root, pid, 0, Some(Arc::new(pidfd))).and_then(|pin| pin.check_alive());
        let without = ProcessPin::new(&root, pid, 0, None).and_then(|pin| pin.check_alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            matches!(with_pidfd, Err(LivenessError::UidChanged { .. })),
            "{with_pidfd:?}"
        );
        assert!(
            matches!(without, Err(LivenessError::UidChanged { .. })),
            "{without:?}"
        );
    }

    #[test]
    fn a_different_start_time_means_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let proc_dir = dir.path().join("77");
        std::fs::create_dir(&proc_dir).unwrap();
        let stat = |t: u64| format!("77 (w) S 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {t} 0 0");
        std::fs::write(proc_dir.join("stat"), stat(100)).unwrap();
        std::fs::write(
            proc_dir.join("status"),
            "Uid:\t5\t5\t5\t5\nGid:\t5\t5\t5\t5\n",
        )
        .unwrap();
        let root = ProcRoot::new(dir.path());
        let pin = ProcessPin::new(&root, 77, 5, None).unwrap();
        std::fs::write(proc_dir.join("stat"), stat(200)).unwrap();
        assert!(matches!(
            pin.check_alive(),
            Err(LivenessError::Replaced { .. })
        ));
        std::fs::write(proc_dir.join("stat"), stat(100)).unwrap();
        std::fs::write(
            proc_dir.join("status"),
            "Uid:\t0\t0\t0\t0\nGid:\t5\t5\t5\t5\n",
        )
        .unwrap();
        assert!(matches!(
            pin.check_alive(),
            Err(LivenessError::UidChanged { .. })
        ));
        // A caller that connected as root is checked by its status alone.
        let as_root = ProcessPin::new(&root, 77, 0, None).unwrap();
        as_root.check_alive().unwrap();
        std::fs::write(
            proc_dir.join("status"),
            "Uid:\t0\t1000\t0\t1000\nGid:\t5\t5\t5\t5\n",
        )
        .unwrap();
        assert!(matches!(
            as_root.check_alive(),
            Err(LivenessError::UidChanged { .. })
        ));
        let other_uid = ProcessPin::new(&root, 77, 5, None).unwrap();
        assert!(
            matches!(
                other_uid.check_alive(),
                Err(LivenessError::UidChanged { .. })
            ),
            "a process whose uid differs from SO_PEERCRED fails the check"
        );
    }
}
