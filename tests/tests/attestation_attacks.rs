//! Attestation attacks: each caller gets no identity it is not entitled to.
//!
//! Covered elsewhere (not repeated): exec after connect and a connection
//! outliving its process (PID reuse), in `tests/tests/attestation.rs`; a
//! forged mountinfo next to a kernel cgroup that names a container, in
//! `tests/tests/kubelet.rs`.
//!
//! Here:
//! * cgroup paths a workload can shape (a sub-cgroup of its own container, a
//!   systemd-delegated subtree under `user.slice`) named like another pod's
//!   container, and a forged mountinfo for a host process — against the k8s
//!   attestor and a fake kubelet (fake /proc tree);
//! * the same mountinfo forgery made for real by an unprivileged process
//!   (`unshare -Urm` + a bind mount of a cgroup directory) — **needs root** to
//!   set up the cgroup directory and drop to uid 65534;
//! * executables reached through symlinks (`unix:path`, `unix:sha256`);
//! * callers in another PID (and user) namespace — **needs root**.
//!
//! Tests that need root FAIL, not skip, without it: CI runs them as root.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tessera_attestor::kubelet::KubeletConfig;
use tessera_attestor::{
    Attestor, K8sAttestor, K8sAttestorConfig, ProcRoot, ProcessRef, Selector, SelectorSet,
};
use tessera_tests::fake_kubelet::{fixture, podlist_kubelet};
use tessera_tests::{TestAgent, as_nobody, connect_from};
use tessera_workload_api as pb;

/// Why the tests that call `require_root` here need root.
const NAMESPACES: &str = "other users and namespaces";

const POD_UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
const POD_UID_: &str = "2c48913c_b29f_11e7_9350_020968147796";
/// The billing pod's `app` container (the identity an attacker wants).
const APP: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
/// The same pod's `sidecar` container.
const SIDECAR: &str = "4444444444444444444444444444444444444444444444444444444444444444";

fn k8s_attestor(dir: &Path, port: u16) -> K8sAttestor {
    K8sAttestor::new(K8sAttestorConfig {
        kubelet: KubeletConfig {
            host: "127.0.0.1".into(),
            port,
            read_only: false,
            token_path: None,
            ca_path: Some(dir.join("ca.pem")),
            skip_verification: false,
            timeout: Duration::from_secs(5),
        },
        poll_attempts: 2,
        poll_interval: Duration::from_millis(20),
        cache_max_age: Duration::from_secs(5),
    })
}

/// A fake /proc/<pid> with the given cgroup and mountinfo files.
fn fake_proc(dir: &Path, pid: i32, cgroup: &str, mountinfo: &str) -> (ProcRoot, ProcessRef) {
    let p = dir.join(format!("proc/{pid}"));
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("cgroup"), cgroup).unwrap();
    std::fs::write(p.join("mountinfo"), mountinfo).unwrap();
    (
        ProcRoot::new(dir.join("proc")),
        ProcessRef {
            pid,
            uid: 1000,
            gid: 1000,
        },
    )
}

fn has(set: &SelectorSet, s: &str) -> bool {
    set.contains(&Selector::parse(s).unwrap())
}

#[tokio::test]
async fn cgroup_paths_a_workload_can_shape_do_not_name_another_container() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = podlist_kubelet(dir.path()).await;
    let a = k8s_attestor(dir.path(), kubelet.port);
    let forged_mount = format!(
        "22 1 0:20 / / rw - overlay overlay rw\n\
         40 22 0:26 /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_}.slice/cri-containerd-{APP}.scope /mnt/cg rw - cgroup2 cgroup2 rw\n"
    );
    // (name, /proc/<pid>/cgroup, mountinfo, container-name it is entitled to)
    let cases: Vec<(&str, String, String, Option<&str>)> = vec![
        (
            "control: the app container itself",
            fixture("cgroup/v2-systemd-containerd.txt"),
            String::new(),
            Some("app"),
        ),
        (
            "control: agent in a cgroup namespace (relative path)",
            fixture("cgroup/v2-namespaced-containerd.txt"),
            String::new(),
            Some("app"),
        ),
        (
            // A container with a writable cgroupfs creates a sub-cgroup of its
            // own, named like the app container, and moves into it.
            "sidecar nests a cgroup named like the app container",
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_}.slice/cri-containerd-{SIDECAR}.scope/kubepods-burstable-pod{POD_UID_}.slice/cri-containerd-{APP}.scope\n"
            ),
            String::new(),
            Some("sidecar"),
        ),
        (
            "sidecar nests a cgroupfs-style path (v1 and v2 lines)",
            format!(
                "1:name=systemd:/kubepods/burstable/pod{POD_UID}/{SIDECAR}/kubepods/burstable/pod{POD_UID}/{APP}\n\
                 0::/kubepods/burstable/pod{POD_UID}/{SIDECAR}/kubepods/burstable/pod{POD_UID}/{APP}\n"
            ),
            String::new(),
            Some("sidecar"),
        ),
        (
            // systemd delegates user@.service subtrees to the user: an
            // ordinary host user can mkdir any name there and move into it.
            "host user in a delegated subtree named like the app container",
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods-burstable-pod{POD_UID_}.slice/cri-containerd-{APP}.scope\n"
            ),
            String::new(),
            None,
        ),
        (
            "host user in a delegated subtree, cgroupfs-style names",
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/kubepods/burstable/pod{POD_UID}/{APP}\n"
            ),
            String::new(),
            None,
        ),
        (
            "host user in a delegated subtree, crio name without pod UID",
            format!("0::/user.slice/user-1000.slice/user@1000.service/crio-{APP}.scope\n"),
            String::new(),
            None,
        ),
        (
            // An unprivileged user namespace may bind-mount any cgroup
            // directory it can read: mountinfo then names that cgroup.
            "host process with a forged mountinfo (bind-mounted cgroup dir)",
            "0::/user.slice/user-1000.slice/session-3.scope\n".to_string(),
            forged_mount.clone(),
            None,
        ),
        (
            "sidecar with a forged mountinfo",
            format!("0::/kubepods/burstable/pod{POD_UID}/{SIDECAR}\n"),
            forged_mount,
            Some("sidecar"),
        ),
    ];
    for (pid, (name, cgroup, mountinfo, entitled)) in cases.into_iter().enumerate() {
        let (root, process) = fake_proc(dir.path(), 5000 + pid as i32, &cgroup, &mountinfo);
        let before = kubelet.state.lock().unwrap().requests;
        let set = SelectorSet::new(
            a.attest(&process, &root)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}")),
        );
        assert!(
            !has(&set, "k8s:container-name:app") || entitled == Some("app"),
            "{name}: got the app container's identity: {set:?}"
        );
        match entitled {
            Some(c) => assert!(
                has(&set, &format!("k8s:container-name:{c}")),
                "{name}: {set:?}"
            ),
            None => {
                assert!(set.is_empty(), "{name}: no k8s selectors: {set:?}");
                assert_eq!(
                    kubelet.state.lock().unwrap().requests,
                    before,
                    "{name}: a host process costs no kubelet request"
                );
            }
        }
    }
}

/// A cgroup2 hierarchy mounted at a private path, with one directory made
/// (as the kubelet would) for the app container; removed on drop.
struct CgroupDir {
    mount: PathBuf,
    top: PathBuf,
    leaf: PathBuf,
}

impl CgroupDir {
    fn create(base: &Path) -> Self {
        let mount = base.join("cg");
        std::fs::create_dir_all(&mount).unwrap();
        let out = Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&mount)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t cgroup2: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let top = mount.join(format!("tessera-attack-{}", std::process::id()));
        let leaf = top.join(format!("kubepods/burstable/pod{POD_UID}/{APP}"));
        std::fs::create_dir_all(&leaf).unwrap();
        Self { mount, top, leaf }
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        // Leaf first: cgroup directories are removed with rmdir only.
        let mut dir = self.leaf.clone();
        while dir.starts_with(&self.top) {
            let _ = std::fs::remove_dir(&dir);
            if !dir.pop() {
                break;
            }
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// `program` run as uid/gid 65534 with no supplementary groups.
#[tokio::test]
async fn an_unprivileged_process_forging_mountinfo_for_real_gets_nothing() {
    tessera_tests::require_root(
        "an_unprivileged_process_forging_mountinfo_for_real_gets_nothing",
        NAMESPACES,
    );
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cg = CgroupDir::create(base.path());
    let target = base.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The attacker: uid 65534, its own user and mount namespace, a bind
    // mount of the app container's cgroup directory, then it waits.
    let script = format!(
        "mount --bind '{}' '{}' && echo ready && exec sleep 30",
        cg.leaf.display(),
        target.display()
    );
    let mut child = as_nobody("unshare")
        .args(["-Urm", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.trim() != "ready" {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "attacker setup failed (unprivileged user namespaces off?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // `sh` exec'd `sleep`: the same PID, inside the namespaces.
    let pid = child.id() as i32;
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let forged = mountinfo
        .lines()
        .find(|l| l.contains(APP) && l.contains(" - cgroup2 "))
        .unwrap_or_else(|| panic!("no forged cgroup2 line in:\n{mountinfo}"));

    let kubelet_dir = tempfile::tempdir().unwrap();
    let kubelet = podlist_kubelet(kubelet_dir.path()).await;
    let a = k8s_attestor(kubelet_dir.path(), kubelet.port);
    let process = ProcessRef {
        pid,
        uid: 65534,
        gid: 65534,
    };
    let result = a.attest(&process, &ProcRoot::default()).await;
    let _ = child.kill();
    let _ = child.wait();
    let set = SelectorSet::new(result.unwrap());
    assert!(
        set.is_empty(),
        "a process that forged its mountinfo ({forged}) got k8s selectors: {set:?}"
    );
    assert_eq!(kubelet.state.lock().unwrap().requests, 0);
}

// ------------------------------------------------------- socket helpers

/// The SPIFFE IDs the agent gives the caller behind `stream` (JWT-SVIDs for
/// every identity), or the gRPC error.
async fn identities_over(stream: UnixStream) -> Result<Vec<String>, tonic::Status> {
    stream.set_nonblocking(true).unwrap();
    let channel =
        tessera_agent::cli::client::channel_over(tokio::net::UnixStream::from_std(stream).unwrap())
            .await
            .unwrap();
    let mut c = pb::client::SpiffeWorkloadApiClient::new(channel);
    let r = c
        .fetch_jwtsvid(pb::with_security_header(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await?;
    let mut ids: Vec<String> = r
        .into_inner()
        .svids
        .into_iter()
        .map(|s| s.spiffe_id)
        .collect();
    ids.sort();
    Ok(ids)
}

/// The real Python interpreter behind `python3` (not a shim or symlink).
fn python_binary() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("python3 is required for this test");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn sha256_file(path: &Path) -> String {
    tessera_agent::audit::sha256_hex(&std::fs::read(path).unwrap())
}

fn entry(id: &str, selector: &str) -> String {
    format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/{id}\"\nselectors = [\"{selector}\"]\n"
    )
}

// ------------------------------------------------------------ symlinks

#[tokio::test]
async fn symlinked_executables_are_judged_by_what_the_kernel_runs() {
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("opt/app");
    std::fs::create_dir_all(&app).unwrap();
    let real = app.join("real");
    std::fs::copy(python_binary(), &real).unwrap();
    // Same program, different bytes: an attacker's build of "the app".
    let evil = work.path().join("attacker/evil");
    std::fs::create_dir_all(evil.parent().unwrap()).unwrap();
    let mut bytes = std::fs::read(&real).unwrap();
    bytes.extend_from_slice(b"\0trailing bytes change the hash, not the program");
    std::fs::write(&evil, bytes).unwrap();
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A symlink TO the real binary, and a symlink named like it pointing elsewhere.
    std::os::unix::fs::symlink(&real, app.join("real-link")).unwrap();
    let fake_dir = work.path().join("attacker/opt/app");
    std::fs::create_dir_all(&fake_dir).unwrap();
    std::os::unix::fs::symlink(&evil, fake_dir.join("real")).unwrap();
    // A hard link: another name for the very same bytes.
    let hard = work.path().join("attacker/hardlink");
    std::fs::hard_link(&real, &hard).unwrap();

    let body = format!(
        "{}{}",
        entry("app", &format!("unix:path:{}", real.display())),
        entry(
            "app-by-hash",
            &format!("unix:sha256:{}", sha256_file(&real))
        )
    );
    let mut agent = TestAgent::start(&body).await;
    let cases: [(&str, PathBuf, &[&str]); 5] = [
        ("the real binary", real.clone(), &["app", "app-by-hash"]),
        (
            "a symlink pointing at the real binary (kernel resolves it: it IS the app)",
            app.join("real-link"),
            &["app", "app-by-hash"],
        ),
        (
            "another binary through a symlink named like the real one",
            fake_dir.join("real"),
            &[],
        ),
        ("the other binary directly", evil.clone(), &[]),
        (
            "a hard link to the real binary (same bytes, other path)",
            hard.clone(),
            &["app-by-hash"],
        ),
    ];
    for (name, program, expected) in cases {
        let h = connect_from(Command::new(&program), &agent.socket(), work.path());
        let exe = std::fs::read_link(format!("/proc/{}/exe", h.child.id())).unwrap();
        let got = identities_over(h.stream.try_clone().unwrap()).await;
        let expected: Vec<String> = expected
            .iter()
            .map(|i| format!("spiffe://example.org/{i}"))
            .collect();
        match got {
            Ok(ids) => assert_eq!(ids, expected, "{name} (exe {})", exe.display()),
            Err(status) => {
                assert!(expected.is_empty(), "{name}: {status:?}");
                assert_eq!(status.code(), tonic::Code::PermissionDenied, "{name}");
            }
        }
        drop(h);
    }
    agent.stop().await;
}

// ------------------------------------------------------- PID namespaces

/// A Python interpreter an unprivileged user may run.
fn python_for_everyone() -> PathBuf {
    ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("a system python3 (/usr/bin/python3) is required for this test")
}

/// A directory anyone may enter (0755), for helpers run as other users.
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn callers_in_other_pid_namespaces_get_exactly_their_own_identity() {
    tessera_tests::require_root(
        "callers_in_other_pid_namespaces_get_exactly_their_own_identity",
        NAMESPACES,
    );
    let python = std::fs::canonicalize(python_for_everyone()).unwrap();
    let work = open_dir();
    let body = format!(
        "{}{}{}",
        entry("root", "unix:uid:0"),
        entry("nobody", "unix:uid:65534"),
        entry("python", &format!("unix:path:{}", python.display()))
    );
    let mut agent = TestAgent::start_in(open_dir(), &body).await;

    // Root in a new PID namespace: PID 1 there, some other PID here. The
    // kernel translates SO_PEERCRED into the agent's namespace, so the agent
    // reads the caller's own /proc entry: uid 0 *and* the python path. Had
    // it used the namespace-local PID 1 it would have read init's entry
    // (another executable), and the path entry would not match.
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork"]).arg(&python);
    let h = connect_from(cmd, &agent.socket(), work.path());
    assert_eq!(
        h.inner_pid.trim(),
        "1",
        "the helper is PID 1 in its namespace"
    );
    let ids = identities_over(h.stream.try_clone().unwrap())
        .await
        .unwrap();
    assert_eq!(
        ids,
        ["spiffe://example.org/python", "spiffe://example.org/root"]
    );
    drop(h);

    // An unprivileged user in its own user + PID namespace: root and PID 1
    // in there, uid 65534 to the kernel and the agent. It gets the nobody
    // identity (and the path one), never root's.
    let mut cmd = as_nobody("unshare");
    cmd.args(["--user", "--map-root-user", "--pid", "--fork"])
        .arg(&python);
    let h = connect_from(cmd, &agent.socket(), work.path());
    assert_eq!(h.inner_pid.trim(), "1");
    let ids = identities_over(h.stream.try_clone().unwrap())
        .await
        .unwrap();
    assert_eq!(
        ids,
        ["spiffe://example.org/nobody", "spiffe://example.org/python"],
        "uid 0 inside a user namespace is not root to the agent"
    );
    drop(h);
    agent.stop().await;
}

/// `readlink /proc/<pid>/exe` is resolved in the caller's mount namespace.
/// An unprivileged user makes its own (user + mount namespace), bind-mounts
/// Python over a registered binary's path, execs it, and asks for SVIDs: it
/// must not get the `unix:path` entry's identity, although its `exe` link
/// shows the registered path. Before the fix it did. The genuine binary at
/// that path, run without namespaces, still gets it.
#[tokio::test]
async fn a_bind_mount_in_a_private_mount_namespace_does_not_fake_unix_path() {
    tessera_tests::require_root(
        "a_bind_mount_in_a_private_mount_namespace_does_not_fake_unix_path",
        NAMESPACES,
    );
    let python = std::fs::canonicalize(python_for_everyone()).unwrap();
    let work = open_dir();
    // The registered program: a Python copy, so the genuine one can run the
    // helper too; the attacker mounts the system Python over it, a
    // different file with the same behaviour.
    let registered = work.path().join("registered-tool");
    std::fs::copy(&python, &registered).unwrap();
    std::fs::set_permissions(&registered, std::fs::Permissions::from_mode(0o755)).unwrap();
    let body = format!(
        "{}{}",
        entry("nobody", "unix:uid:65534"),
        entry("tool", &format!("unix:path:{}", registered.display()))
    );
    let mut agent = TestAgent::start_in(open_dir(), &body).await;

    let script = format!(
        "mount --bind '{}' '{}' && exec '{}' \"$@\"",
        python.display(),
        registered.display(),
        registered.display()
    );
    let mut cmd = as_nobody("unshare");
    cmd.args([
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        &script,
        "sh",
    ]);
    let h = connect_from(cmd, &agent.socket(), work.path());
    let exe = std::fs::read_link(format!("/proc/{}/exe", h.child.id())).unwrap();
    assert_eq!(
        exe, registered,
        "the attacker's exe link shows the registered path"
    );
    let ids = identities_over(h.stream.try_clone().unwrap())
        .await
        .unwrap();
    assert_eq!(
        ids,
        ["spiffe://example.org/nobody"],
        "a bind mount in the caller's own mount namespace passed as the registered binary"
    );
    drop(h);

    // The genuine binary, as the same user, in the agent's namespace.
    let h = connect_from(
        as_nobody(registered.to_str().unwrap()),
        &agent.socket(),
        work.path(),
    );
    let ids = identities_over(h.stream.try_clone().unwrap())
        .await
        .unwrap();
    assert_eq!(
        ids,
        ["spiffe://example.org/nobody", "spiffe://example.org/tool"]
    );
    drop(h);
    agent.stop().await;
}

/// An unprivileged user who owns the directory a socket is bound in can
/// rename the agent's socket away and bind their own in its place, then
/// answer every workload that connects. Such a directory (here made by
/// `nobody` in a sticky, world-writable parent, as under `/tmp`) must make
/// the agent refuse to start, for the Workload API and the exchange socket
/// alike; before the fix it started silently.
#[tokio::test]
async fn a_socket_directory_owned_by_another_user_is_refused() {
    tessera_tests::require_root(
        "a_socket_directory_owned_by_another_user_is_refused",
        "another user creates the directory",
    );
    for (socket_key, socket_dir) in [("socket_path", "wl"), ("exchange", "ex")] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let attacker_dir = dir.path().join(socket_dir);
        let made = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "mkdir"])
            .arg(&attacker_dir)
            .status()
            .expect("setpriv (util-linux) is required");
        assert!(
            made.success(),
            "nobody could not create {}",
            attacker_dir.display()
        );
        let d = dir.path().display();
        let text = match socket_key {
            "socket_path" => format!(
                "trust_domain = \"example.org\"\nsocket_path = \"{d}/wl/agent.sock\"\ndata_dir = \"{d}/data\"\n"
            ),
            _ => format!(
                "trust_domain = \"example.org\"\nsocket_path = \"{d}/sock/agent.sock\"\ndata_dir = \"{d}/data\"\n\
                 [exchange]\nsocket_path = \"{d}/ex/exchange.sock\"\n"
            ),
        };
        let config = tessera_agent::config::Config::parse(&text, "t.toml").unwrap();
        let started = tessera_agent::app::start(
            config,
            std::sync::Arc::new(tessera_agent::clock::SystemClock),
        )
        .await;
        let err = match started {
            Ok(agent) => {
                agent.stop().await.unwrap();
                panic!(
                    "the agent served from {}, which uid 65534 owns",
                    attacker_dir.display()
                );
            }
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&attacker_dir.display().to_string()) && err.contains("uid 65534"),
            "{err}"
        );
    }
}
