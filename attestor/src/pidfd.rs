//! The one place the attestor talks to the kernel without a safe wrapper:
//! `PIDFD_GET_INFO` (Linux 6.13+), which reads a process's credentials
//! through its pidfd. The per-call liveness re-check needs the caller's
//! effective uid; `/proc/<pid>/status` gives it too, but the kernel formats
//! the whole file (signal masks, memory figures, capabilities) for every
//! read, which made that read the largest single cost of a cached Workload
//! API call. The ioctl copies 64 bytes.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::Errno;
use rustix::ioctl::{Opcode, Updater, ioctl, opcode};

/// `struct pidfd_info` as of Linux 6.13 (`PIDFD_INFO_SIZE_VER0`, 64 bytes):
/// the kernel fills what the size encoded in the request asks for, so this
/// first version keeps working on later kernels that extended it.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

const _: () = assert!(std::mem::size_of::<PidfdInfo>() == 64);

/// `_IOWR(PIDFS_IOCTL_MAGIC = 0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: Opcode = opcode::read_write::<PidfdInfo>(0xFF, 11);
/// Ask for the credentials.
const PIDFD_INFO_CREDS: u64 = 1 << 1;

/// Cleared once the kernel says it has no `PIDFD_GET_INFO`; from then on
/// callers read `/proc` without trying the ioctl first.
static SUPPORTED: AtomicBool = AtomicBool::new(true);

/// What the kernel said about the process behind a pidfd.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Creds {
    /// Its effective uid (in the agent's user namespace, as `/proc` shows it).
    EffectiveUid(u32),
    /// It is gone (reaped), so it has no credentials to read.
    Gone,
    /// This kernel cannot say: read `/proc` instead.
    Unsupported,
}

/// The effective uid of the process `pidfd` refers to.
pub(crate) fn credentials(pidfd: &OwnedFd) -> Creds {
    if !SUPPORTED.load(Ordering::Relaxed) {
        return Creds::Unsupported;
    }
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_CREDS,
        ..PidfdInfo::default()
    };
    // SAFETY: PIDFD_GET_INFO is `_IOWR(0xFF, 11, struct pidfd_info)` and
    // `PidfdInfo` has that struct's first-version layout (checked by size
    // above, field order as in <linux/pidfd.h>); the kernel writes at most
    // `size_of::<PidfdInfo>()` bytes into it, the size the opcode encodes.
    // `info` outlives the call. Any other fd gets ENOTTY and is untouched.
    let result = unsafe { ioctl(pidfd, Updater::<PIDFD_GET_INFO, PidfdInfo>::new(&mut info)) };
    match result {
        Ok(()) if info.mask & PIDFD_INFO_CREDS != 0 => Creds::EffectiveUid(info.euid),
        Ok(()) => Creds::Unsupported,
        Err(Errno::SRCH) => Creds::Gone,
        Err(_) => {
            // ENOTTY (no such ioctl before 6.13) or EINVAL: not coming back.
            SUPPORTED.store(false, Ordering::Relaxed);
            Creds::Unsupported
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pidfd_of(pid: i32) -> OwnedFd {
        rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap()
    }

    #[test]
    fn reads_the_effective_uid_of_a_live_process_and_sees_a_reaped_one_gone() {
        use std::os::unix::process::CommandExt;
        let me = rustix::process::geteuid().as_raw();
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        // As root, a child with another uid shows the ioctl reads the
        // child's credentials, not ours.
        let expected = if me == 0 {
            command.uid(65534);
            65534
        } else {
            me
        };
        let mut child = command.spawn().expect("sleep(1) is available");
        let pidfd = pidfd_of(child.id() as i32);
        let live = credentials(&pidfd);
        child.kill().unwrap();
        child.wait().unwrap();
        let reaped = credentials(&pidfd);
        match live {
            Creds::Unsupported => {
                eprintln!(
                    "NOTE: this kernel has no PIDFD_GET_INFO (Linux < 6.13); the /proc fallback is what runs here"
                );
                assert_eq!(reaped, Creds::Unsupported);
            }
            live => {
                assert_eq!(live, Creds::EffectiveUid(expected));
                assert_eq!(reaped, Creds::Gone);
            }
        }
    }
}
