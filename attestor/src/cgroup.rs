//! Container and pod identity from cgroup paths.
//!
//! `/proc/<pid>/cgroup` is written by the kernel, so it is the authoritative
//! source: a container cannot change which cgroup it was placed in. The
//! cgroup *mount* roots in `/proc/<pid>/mountinfo` describe the process's own
//! mount namespace, which a privileged workload can shape, so they are only
//! consulted when the cgroup file names no container at all.
//!
//! Recognised layouts (cgroup v1 and v2, paths possibly relative to a cgroup
//! namespace, e.g. starting with `/../..`):
//! * cgroupfs driver: `/kubepods/<qos>/pod<uid>/<64 hex>`
//! * systemd driver: `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice/<runtime>-<64 hex>.scope`
//!   with runtime prefix `cri-containerd`, `crio` or `docker`
//! * CRI-O and docker without a pod UID: `.../crio-<64 hex>.scope`, `/docker/<64 hex>`

/// What the cgroup path says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    /// Pod UID in canonical dashed form, if the path carries it.
    pub pod_uid: Option<String>,
    /// 64-hex container ID.
    pub container_id: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CgroupError {
    #[error("process is in several containers ({0} and {1})")]
    Ambiguous(String, String),
}

/// Parses the content of `/proc/<pid>/cgroup`. `Ok(None)` means "not in a
/// container".
pub fn parse_cgroup_file(text: &str) -> Result<Option<ContainerRef>, CgroupError> {
    collect(text.lines().filter_map(|line| {
        // hierarchy-ID:controller-list:cgroup-path
        let mut parts = line.splitn(3, ':');
        let (_, _, path) = (parts.next()?, parts.next()?, parts.next()?);
        Some(path)
    }))
}

/// Parses `/proc/<pid>/mountinfo`, looking only at cgroup and cgroup2 mounts'
/// root paths. Lower trust than [`parse_cgroup_file`]; callers must prefer it.
pub fn parse_mountinfo(text: &str) -> Result<Option<ContainerRef>, CgroupError> {
    collect(text.lines().filter_map(|line| {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        let fstype = fields.get(dash + 1)?;
        if *fstype != "cgroup" && *fstype != "cgroup2" {
            return None;
        }
        fields.get(3).copied()
    }))
}

fn collect<'a>(paths: impl Iterator<Item = &'a str>) -> Result<Option<ContainerRef>, CgroupError> {
    let mut found: Option<ContainerRef> = None;
    for path in paths {
        let Some(this) = parse_path(path) else {
            continue;
        };
        match &mut found {
            None => found = Some(this),
            Some(prev) if prev.container_id != this.container_id => {
                return Err(CgroupError::Ambiguous(
                    prev.container_id.clone(),
                    this.container_id,
                ));
            }
            Some(prev) => {
                if prev.pod_uid.is_none() {
                    prev.pod_uid = this.pod_uid;
                }
            }
        }
    }
    Ok(found)
}

/// Finds the container ID and pod UID in one cgroup path.
///
/// Only the layouts container runtimes create are accepted, because anyone
/// who can create cgroups can also *name* them: a pod may create child
/// cgroups below its own container's (cgroup v2 delegation), and a host user
/// may create any path below its systemd user slice. So:
///
/// * a Kubernetes path must start at the top with a `kubepods` segment, and
///   the container is the segment **directly below the pod's** segment;
///   anything deeper (a child cgroup named after another container) is
///   ignored;
/// * without a `kubepods` root, only a lone top-level container segment
///   (`/crio-<id>.scope`, as CRI-O shows it in some namespaced setups) is
///   accepted, never one nested under another slice such as `/user.slice`.
///
/// `..` segments (a path outside the reader's cgroup namespace) are skipped.
pub fn parse_path(path: &str) -> Option<ContainerRef> {
    let segments: Vec<&str> = path
        .split('/')
        .filter(|s| !s.is_empty() && *s != "..")
        .collect();
    match segments.as_slice() {
        [] => None,
        [only] => container_id_of(only).map(|container_id| ContainerRef {
            pod_uid: pod_uid_of(only),
            container_id,
        }),
        [first, ..] if first.starts_with("kubepods") => {
            let pod_at = segments.iter().position(|s| pod_uid_of(s).is_some())?;
            let container_id = container_id_of(segments.get(pod_at + 1)?)?;
            Some(ContainerRef {
                pod_uid: pod_uid_of(segments[pod_at]),
                container_id,
            })
        }
        _ => None,
    }
}

fn container_id_of(segment: &str) -> Option<String> {
    let core = segment.strip_suffix(".scope").unwrap_or(segment);
    // Runtime prefixes; `crio-conmon-<id>` is the monitor, not the container.
    let id = [
        "cri-containerd-",
        "crio-",
        "docker-",
        "containerd-",
        "libpod-",
    ]
    .iter()
    .find_map(|p| core.strip_prefix(p))
    .unwrap_or(core);
    (id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| id.to_string())
}

fn pod_uid_of(segment: &str) -> Option<String> {
    // `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_underscored>.slice` (systemd).
    let at = segment.rfind("pod")?;
    let rest = &segment[at + 3..];
    let rest = rest.strip_suffix(".slice").unwrap_or(rest);
    if rest.len() != 36 {
        return None;
    }
    let uid: String = rest
        .chars()
        .map(|c| if c == '_' { '-' } else { c })
        .collect();
    let ok = uid.char_indices().all(|(i, c)| match i {
        8 | 13 | 18 | 23 => c == '-',
        _ => c.is_ascii_hexdigit(),
    });
    ok.then(|| uid.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const ID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/tests/fixtures/cgroup/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    fn expect(name: &str, pod_uid: Option<&str>) {
        let got = parse_cgroup_file(&fixture(name))
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: no container"));
        assert_eq!(got.container_id, ID, "{name}");
        assert_eq!(got.pod_uid.as_deref(), pod_uid, "{name}");
    }

    #[test]
    fn every_runtime_and_driver() {
        expect("v1-cgroupfs-containerd.txt", Some(UID));
        expect("v1-cgroupfs-besteffort-docker.txt", Some(UID));
        expect("v1-systemd-docker.txt", Some(UID));
        expect("v2-systemd-containerd.txt", Some(UID));
        expect("v2-systemd-crio.txt", Some(UID));
        expect("v2-cgroupfs-containerd.txt", Some(UID));
        expect("v2-namespaced-containerd.txt", Some(UID));
        expect("v1-crio-no-pod-uid.txt", None);
    }

    #[test]
    fn not_in_a_container() {
        assert_eq!(
            parse_cgroup_file(&fixture("v2-host-process.txt")).unwrap(),
            None
        );
        assert_eq!(parse_cgroup_file("").unwrap(), None);
        assert_eq!(parse_cgroup_file("garbage\n::\n1:x").unwrap(), None);
    }

    #[test]
    fn two_containers_is_an_error() {
        let other = "a".repeat(64);
        let text = format!("0::/kubepods/pod{UID}/{ID}\n1:cpu:/kubepods/pod{UID}/{other}\n");
        assert!(matches!(
            parse_cgroup_file(&text),
            Err(CgroupError::Ambiguous(..))
        ));
    }

    #[test]
    fn conmon_and_near_misses_are_not_containers() {
        assert_eq!(
            parse_path(&format!("/machine.slice/crio-conmon-{ID}.scope")),
            None
        );
        assert_eq!(
            parse_path(&format!("/kubepods/pod{UID}/{}", &ID[..63])),
            None
        );
        assert_eq!(
            parse_path(&format!("/kubepods/pod{UID}/{}", ID.to_uppercase())),
            None
        );
    }

    #[test]
    fn forged_paths_do_not_name_a_container() {
        let other = "b".repeat(64);
        // A child cgroup below a real container, named after another one:
        // the real (outer) container is reported.
        let nested = format!("/kubepods/burstable/pod{UID}/{ID}/cri-containerd-{other}.scope");
        assert_eq!(parse_path(&nested).unwrap().container_id, ID);
        // A host user's delegated cgroups, whatever they are named.
        for forged in [
            format!(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/cri-containerd-{ID}.scope"
            ),
            format!("/user.slice/user-1000.slice/user@1000.service/kubepods/pod{UID}/{ID}"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/kubepods/burstable/{ID}"),
        ] {
            assert_eq!(parse_path(&forged), None, "{forged}");
        }
    }

    #[test]
    fn mountinfo_roots() {
        let got = parse_mountinfo(&fixture("mountinfo-containerd.txt"))
            .unwrap()
            .unwrap();
        assert_eq!(got.container_id, ID);
        assert_eq!(got.pod_uid.as_deref(), Some(UID));
    }
}
