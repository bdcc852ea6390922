//! Durable, private file writes.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} belongs to uid {owner}, not to the agent (uid {agent}); refusing to keep keys there", path.display())]
    Owner {
        path: PathBuf,
        owner: u32,
        agent: u32,
    },
    #[error("{} {why}: whoever can write there can replace the agent's socket with their own; refusing to serve under it (give it to root or the agent's user, mode 0755)", path.display())]
    UnsafeSocketDir { path: PathBuf, why: String },
}

impl FsError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Checks the directory a socket is bound in, and every directory above it:
/// each must belong to root or the agent's user and be writable by no one
/// else, unless it is sticky (like `/tmp`, where others cannot rename what
/// is ours). Otherwise another user could rename the socket away and bind
/// their own in its place. The socket's own directory, if it is the agent's
/// and others may write it, is tightened (with a warning) instead.
pub fn check_socket_dir(dir: &Path) -> Result<(), FsError> {
    let dir = std::fs::canonicalize(dir).map_err(|e| FsError::io(dir, e))?;
    let me = nix::unistd::geteuid().as_raw();
    for (level, d) in dir.ancestors().enumerate() {
        let meta = std::fs::metadata(d).map_err(|e| FsError::io(d, e))?;
        let unsafe_dir = |why: String| FsError::UnsafeSocketDir {
            path: d.to_path_buf(),
            why,
        };
        if meta.uid() != 0 && meta.uid() != me {
            return Err(unsafe_dir(format!(
                "belongs to uid {}, not to root or the agent (uid {me})",
                meta.uid()
            )));
        }
        let writable_by_others = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        if writable_by_others && !sticky {
            if level == 0 && meta.uid() == me {
                let mode = meta.mode() & 0o7777 & !0o022;
                tracing::warn!(dir = %d.display(), mode = format!("{:o}", meta.mode() & 0o777), "the socket directory was writable by others; removing group and other write");
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| FsError::io(d, e))?;
            } else {
                return Err(unsafe_dir(format!(
                    "is writable by group or others (mode {:o})",
                    meta.mode() & 0o777
                )));
            }
        }
    }
    Ok(())
}

/// A directory for keys, revocations and the audit log: 0700. An existing
/// directory that others can reach is tightened if it is ours; one owned by
/// someone else is refused (they could swap files under us).
pub fn create_private_dir(dir: &Path) -> Result<(), FsError> {
    let io = |e| FsError::io(dir, e);
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        return Ok(());
    }
    let meta = std::fs::metadata(dir).map_err(io)?;
    if !meta.is_dir() {
        return Err(FsError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(FsError::Owner {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            agent: me,
        });
    }
    if meta.mode() & 0o077 != 0 && meta.uid() == me {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", meta.mode() & 0o777), "directory was accessible to others; setting it to 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// Writes `data` to `path` with mode 0600 so that a crash leaves either the old
/// or the new content: write a temporary file, fsync it, rename it over the
/// target, fsync the directory.
pub fn write_private_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // The mode above is filtered by the umask; make it exact.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(data)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_directory_others_can_write_is_tightened_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("sock");
        std::fs::create_dir(&own).unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o777)).unwrap();
        check_socket_dir(&own).unwrap();
        let mode = std::fs::metadata(&own).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "the agent's own directory is repaired");

        // A writable directory above it cannot be repaired here: refused.
        let inner = own.join("inner");
        std::fs::create_dir(&inner).unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_socket_dir(&inner).unwrap_err();
        assert!(
            matches!(err, FsError::UnsafeSocketDir { ref path, .. } if *path == own),
            "{err}"
        );

        // Sticky and world-writable (like /tmp) is fine.
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_socket_dir(&inner).unwrap();
    }

    #[test]
    fn writes_0600_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/state.json");
        write_private_atomic(&p, b"one").unwrap();
        write_private_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_dir(p.parent().unwrap()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
