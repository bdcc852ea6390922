//! `/proc/<pid>/cgroup` and `/proc/<pid>/mountinfo` parsing (Kubernetes
//! attestation). Input: the file's text; it is parsed both as a cgroup file
//! and as a mountinfo file, and each line's last field as one cgroup path.
//!
//! Properties beyond "no panic": any container ID found is 64 lowercase hex
//! characters that occur in the input; any pod UID is a canonical lowercase
//! dashed UUID; the cgroup-file result agrees with parsing each line's path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_attestor::cgroup::{
    CgroupError, ContainerRef, parse_cgroup_file, parse_mountinfo, parse_path,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let from_cgroup = parse_cgroup_file(text);
    check(text, &from_cgroup);
    check(text, &parse_mountinfo(text));

    // Recompute the cgroup-file answer line by line.
    let mut ids = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if let Some(found) = parse_path(path) {
            check_ref(text, &found);
            ids.push(found.container_id);
        }
    }
    ids.dedup();
    match (&from_cgroup, ids.as_slice()) {
        (Ok(None), []) => {}
        (Ok(Some(r)), [id]) => assert_eq!(&r.container_id, id),
        (Err(CgroupError::Ambiguous(..)), [_, _, ..]) => {}
        (got, ids) => panic!("parse_cgroup_file gave {got:?}, lines name {ids:?}"),
    }
});

fn check(text: &str, result: &Result<Option<ContainerRef>, CgroupError>) {
    if let Ok(Some(found)) = result {
        check_ref(text, found);
    }
}

fn check_ref(text: &str, found: &ContainerRef) {
    let id = &found.container_id;
    assert_eq!(id.len(), 64, "{id:?}");
    assert!(
        id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{id:?}"
    );
    assert!(text.contains(id.as_str()));
    if let Some(uid) = &found.pod_uid {
        assert_eq!(uid.len(), 36, "{uid:?}");
        for (i, b) in uid.bytes().enumerate() {
            match i {
                8 | 13 | 18 | 23 => assert_eq!(b, b'-', "{uid:?}"),
                _ => assert!(matches!(b, b'0'..=b'9' | b'a'..=b'f'), "{uid:?}"),
            }
        }
    }
}
