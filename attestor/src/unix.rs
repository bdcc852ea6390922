//! The Unix attestor: user, group and executable facts from /proc.
//!
//! Selectors: `unix:uid`, `unix:user`, `unix:gid`, `unix:group`,
//! `unix:supplementary_gid`, `unix:supplementary_group`, and with path
//! discovery `unix:path` and `unix:sha256`.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{AttestError, AttestFuture, Attestor, ProcRoot, ProcessRef, Selector};

#[derive(Debug, Clone)]
pub struct UnixAttestorConfig {
    /// Emit `unix:path` and `unix:sha256` (reading another user's `exe` needs
    /// CAP_SYS_PTRACE; without it those selectors are simply absent).
    pub discover_workload_path: bool,
    /// Executables larger than this are not hashed (no `unix:sha256`), so a
    /// caller cannot make the agent read gigabytes. 0 disables hashing.
    pub workload_size_limit: u64,
}

impl Default for UnixAttestorConfig {
    fn default() -> Self {
        Self {
            discover_workload_path: true,
            workload_size_limit: 128 * 1024 * 1024,
        }
    }
}

/// Identity of a file's content as far as hashing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    /// The owner can set mtime back after rewriting a file; ctime changes on
    /// every write and cannot be set.
    ctime: i64,
    ctime_nsec: i64,
}

/// Hash cache size bound: executables on a node are few; if this fills up the
/// cache is simply cleared.
const HASH_CACHE_LIMIT: usize = 4096;

/// How long a uid/gid -> name lookup is reused. NSS lookups parse
/// /etc/passwd and /etc/group (or ask a directory service) and would
/// otherwise run for every new connection.
const NAME_CACHE_TTL: Duration = Duration::from_secs(30);

type NameTable = HashMap<u32, (Option<String>, Instant)>;

#[derive(Default)]
struct NameCache {
    users: NameTable,
    groups: NameTable,
}

/// Whether a lookup may do work that can block (NSS, hashing).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lookup {
    CachedOnly,
    Full,
}

/// The executable's hash: known, not cached yet (`Lookup::CachedOnly`), or
/// not to be had (hashing disabled, too large, unreadable).
enum Hash {
    Known(Arc<str>),
    NotCached,
    Unavailable,
}

#[derive(Clone)]
pub struct UnixAttestor {
    config: UnixAttestorConfig,
    hashes: Arc<Mutex<HashMap<FileKey, Arc<str>>>>,
    names: Arc<Mutex<NameCache>>,
}

impl UnixAttestor {
    pub fn new(config: UnixAttestorConfig) -> Self {
        Self {
            config,
            hashes: Arc::default(),
            names: Arc::default(),
        }
    }

    /// The selectors of `process`. With `Lookup::CachedOnly`, Ok(None) as
    /// soon as a name or hash is not cached: the work that may block (NSS
    /// lookups, hashing an executable) is then left to `Lookup::Full`.
    fn collect(
        &self,
        process: &ProcessRef,
        proc_root: &ProcRoot,
        lookup: Lookup,
    ) -> Result<Option<Vec<Selector>>, AttestError> {
        let status = proc_root.status(process.pid)?;
        let mut out = Vec::with_capacity(8);
        out.push(Selector::new("unix:uid", status.effective_uid.to_string()));
        let Some(user) = self.user_name(status.effective_uid, lookup) else {
            return Ok(None);
        };
        if let Some(user) = user {
            out.push(Selector::new("unix:user", user));
        }
        out.push(Selector::new("unix:gid", status.effective_gid.to_string()));
        let Some(group) = self.group_name(status.effective_gid, lookup) else {
            return Ok(None);
        };
        if let Some(name) = group {
            out.push(Selector::new("unix:group", name));
        }
        for gid in &status.supplementary_gids {
            out.push(Selector::new("unix:supplementary_gid", gid.to_string()));
            let Some(group) = self.group_name(*gid, lookup) else {
                return Ok(None);
            };
            if let Some(name) = group {
                out.push(Selector::new("unix:supplementary_group", name));
            }
        }
        if self.config.discover_workload_path {
            match proc_root.exe_path(process.pid) {
                Ok(path) => {
                    if names_the_executable(&path, process.pid, proc_root) {
                        out.push(Selector::new("unix:path", path.to_string_lossy()));
                    } else {
                        tracing::debug!(pid = process.pid, path = %path.display(), "no unix:path selector: in the agent's mount namespace that path is another file (the caller's own mount namespace, a bind mount, or a replaced file)");
                    }
                    match self
                        .exe_sha256(process.pid, proc_root, lookup)
                        .unwrap_or(Hash::Unavailable)
                    {
                        Hash::Known(hash) => {
                            out.push(Selector::new("unix:sha256", hash.to_string()))
                        }
                        Hash::Unavailable => {}
                        Hash::NotCached => return Ok(None),
                    }
                }
                Err(e) => tracing::debug!(pid = process.pid, error = %e, "no unix:path selector"),
            }
        }
        Ok(Some(out))
    }

    /// None: not to be had (unreadable, or grew past the limit while read).
    fn exe_sha256(&self, pid: i32, proc_root: &ProcRoot, lookup: Lookup) -> Option<Hash> {
        let limit = self.config.workload_size_limit;
        if limit == 0 {
            return Some(Hash::Unavailable);
        }
        let mut file = proc_root.open_exe(pid).ok()?;
        let meta = file.metadata().ok()?;
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        };
        if let Some(hit) = self.hashes.lock().ok()?.get(&key) {
            return Some(Hash::Known(hit.clone()));
        }
        if lookup == Lookup::CachedOnly {
            return Some(Hash::NotCached);
        }
        if key.size > limit {
            tracing::debug!(pid, size = key.size, limit, "executable too large to hash");
            return None;
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let mut remaining = limit + 1;
        loop {
            let n = file.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            remaining = remaining.checked_sub(n as u64)?; // grew past the limit while reading
            ctx.update(&buf[..n]);
        }
        let hash: Arc<str> = hex::encode(ctx.finish()).into();
        let mut cache = self.hashes.lock().ok()?;
        if cache.len() >= HASH_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, hash.clone());
        Some(Hash::Known(hash))
    }
}

impl UnixAttestor {
    /// None: not cached and `lookup` is `CachedOnly`; Some(None): no such
    /// user.
    fn user_name(&self, uid: u32, lookup: Lookup) -> Option<Option<String>> {
        self.cached_name(
            uid,
            lookup,
            |c| &mut c.users,
            |uid| {
                nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            },
        )
    }

    fn group_name(&self, gid: u32, lookup: Lookup) -> Option<Option<String>> {
        self.cached_name(
            gid,
            lookup,
            |c| &mut c.groups,
            |gid| {
                nix::unistd::Group::from_gid(gid.into())
                    .ok()
                    .flatten()
                    .map(|g| g.name)
            },
        )
    }

    fn cached_name(
        &self,
        id: u32,
        mode: Lookup,
        table: impl Fn(&mut NameCache) -> &mut NameTable,
        lookup: impl Fn(u32) -> Option<String>,
    ) -> Option<Option<String>> {
        if let Ok(mut cache) = self.names.lock()
            && let Some((name, at)) = table(&mut cache).get(&id)
            && at.elapsed() < NAME_CACHE_TTL
        {
            return Some(name.clone());
        }
        if mode == Lookup::CachedOnly {
            return None;
        }
        let name = lookup(id);
        if let Ok(mut cache) = self.names.lock() {
            let t = table(&mut cache);
            if t.len() >= HASH_CACHE_LIMIT {
                t.clear();
            }
            t.insert(id, (name.clone(), Instant::now()));
        }
        Some(name)
    }
}

impl Attestor for UnixAttestor {
    fn name(&self) -> &'static str {
        "unix"
    }

    fn attest<'a>(&'a self, process: &'a ProcessRef, proc_root: &'a ProcRoot) -> AttestFuture<'a> {
        Box::pin(async move {
            // With names and the executable's hash cached (every caller after
            // the first of a program), what is left is a few /proc reads:
            // cheaper inline than the hop to the blocking pool, whose thread
            // wake-ups cost more than the reads.
            if let Some(selectors) = self.collect(process, proc_root, Lookup::CachedOnly)? {
                return Ok(selectors);
            }
            // NSS lookups and hashing an executable can block; not on the runtime.
            let (this, process, proc_root) = (self.clone(), process.clone(), proc_root.clone());
            tokio::task::spawn_blocking(move || this.collect(&process, &proc_root, Lookup::Full))
                .await
                .map_err(|e| AttestError::Attestor {
                    attestor: "unix",
                    message: e.to_string(),
                })?
                .map(|selectors| selectors.unwrap_or_default())
        })
    }
}

/// Whether `path`, as the agent resolves it, is the file process `pid`
/// runs. `readlink /proc/<pid>/exe` is resolved in the *caller's* mount
/// namespace: a user with its own mount namespace (unprivileged user
/// namespaces allow one) can bind-mount any program over a registered path
/// and exec it, and every container reports paths in its own namespace. A
/// `unix:path` selector is therefore emitted only when the agent, looking
/// up the same path, finds the very file (device and inode) the caller runs.
fn names_the_executable(path: &std::path::Path, pid: i32, proc_root: &ProcRoot) -> bool {
    let (Ok(seen), Ok(running)) = (
        std::fs::metadata(path),
        std::fs::metadata(proc_root.pid_path(pid, "exe")),
    ) else {
        return false;
    };
    (seen.dev(), seen.ino()) == (running.dev(), running.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> ProcessRef {
        ProcessRef {
            pid: std::process::id() as i32,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }

    #[tokio::test]
    async fn selectors_for_this_process() {
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let sels = attestor.attest(&me(), &ProcRoot::default()).await.unwrap();
        let set = crate::SelectorSet::new(sels);
        let uid = nix::unistd::geteuid().as_raw().to_string();
        assert!(set.contains(&Selector::new("unix:uid", uid)));
        let exe = std::env::current_exe().unwrap();
        assert!(set.contains(&Selector::new("unix:path", exe.to_string_lossy())));
        // Independent check of the hash: sha256sum(1) from coreutils.
        let out = std::process::Command::new("sha256sum")
            .arg(&exe)
            .output()
            .unwrap();
        let expected = String::from_utf8(out.stdout).unwrap();
        let expected = expected.split_whitespace().next().unwrap();
        assert!(set.contains(&Selector::new("unix:sha256", expected)));
    }

    #[tokio::test]
    async fn a_cached_caller_is_attested_inline_with_the_same_selectors() {
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let root = ProcRoot::default();
        // Nothing cached yet: the inline pass must defer to the full one.
        assert!(
            attestor
                .collect(&me(), &root, Lookup::CachedOnly)
                .unwrap()
                .is_none()
        );
        let first = attestor.attest(&me(), &root).await.unwrap();
        let inline = attestor
            .collect(&me(), &root, Lookup::CachedOnly)
            .unwrap()
            .expect("names and hash cached by the first attestation");
        assert_eq!(first, inline);
        assert!(inline.iter().any(|s| s.kind() == "unix:sha256"));
        assert_eq!(attestor.attest(&me(), &root).await.unwrap(), first);
    }

    #[tokio::test]
    async fn hashing_respects_the_size_limit() {
        let attestor = UnixAttestor::new(UnixAttestorConfig {
            discover_workload_path: true,
            workload_size_limit: 1024,
        });
        let sels = attestor.attest(&me(), &ProcRoot::default()).await.unwrap();
        assert!(sels.iter().all(|s| s.kind() != "unix:sha256"));
        assert!(sels.iter().any(|s| s.kind() == "unix:path"));
    }

    #[tokio::test]
    async fn fake_proc_tree() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("4000");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(
            p.join("status"),
            "Uid:\t4321\t4321\t4321\t4321\nGid:\t99\t98\t99\t99\nGroups:\t7\n",
        )
        .unwrap();
        let attestor = UnixAttestor::new(UnixAttestorConfig::default());
        let process = ProcessRef {
            pid: 4000,
            uid: 4321,
            gid: 99,
        };
        let set = crate::SelectorSet::new(
            attestor
                .attest(&process, &ProcRoot::new(dir.path()))
                .await
                .unwrap(),
        );
        assert!(set.contains(&Selector::new("unix:uid", "4321")));
        assert!(set.contains(&Selector::new("unix:gid", "98")));
        assert!(set.contains(&Selector::new("unix:supplementary_gid", "7")));
        assert!(
            !set.iter().any(|s| s.kind() == "unix:path"),
            "no exe link in the fake tree"
        );
    }
}
