//! The generated gRPC code is committed (no `protoc` or build script needed to
//! build Tessera). This test regenerates it with protox and fails if the
//! committed copy differs:
//! * `proto/workload.proto` (no package) into `src/gen/_.rs`;
//! * the Envoy SDS subset under `proto/envoy` and `proto/google` into
//!   `src/gen/envoy/`, one file per protobuf package plus `mod.rs`-style
//!   include file `_includes.rs`.
//!
//! To refresh the committed code after editing a proto:
//! `TESSERA_REGEN=1 cargo test -p tessera-workload-api --test codegen_drift`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles `files` (relative to `proto/`) into `out_dir`; returns the
/// encoded `FileDescriptorSet` (for gRPC reflection).
fn generate(files: &[&str], include_file: Option<&str>, out_dir: &Path) -> Vec<u8> {
    let proto = root().join("proto");
    let fds =
        protox::compile(files.iter().map(|f| proto.join(f)), [&proto]).expect("the protos compile");
    let mut builder = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        // `bytes::Bytes` lets one issued certificate be shared by every stream
        // without copying it per response.
        .bytes(".")
        // Small per-stream buffers; see `codec` in lib.rs.
        .codec_path("crate::codec::SmallBufferCodec")
        .out_dir(out_dir);
    if let Some(name) = include_file {
        builder = builder.include_file(name);
    }
    builder
        .compile_fds(fds.clone())
        .expect("code generation succeeds");
    prost::Message::encode_to_vec(&fds)
}

/// Every file directly in `dir`, by name.
fn files_in(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// Regenerates one set into a temporary directory and compares it, file by
/// file, with the committed directory `committed` (or rewrites it).
fn check(files: &[&str], include_file: Option<&str>, committed: &Path, descriptor: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let fds = generate(files, include_file, tmp.path());
    std::fs::write(tmp.path().join(descriptor), &fds).unwrap();
    let fresh = files_in(tmp.path());
    let mut current = files_in(committed);
    // The workload set shares `src/gen` with the envoy folder and the other
    // descriptor: compare only the names this set produces there.
    if include_file.is_none() {
        current.retain(|name, _| fresh.contains_key(name));
    }

    if std::env::var_os("TESSERA_REGEN").is_some() {
        std::fs::create_dir_all(committed).unwrap();
        for name in current.keys().filter(|n| !fresh.contains_key(*n)) {
            std::fs::remove_file(committed.join(name)).unwrap();
        }
        for (name, bytes) in &fresh {
            std::fs::write(committed.join(name), bytes).unwrap();
        }
        return;
    }
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&current),
        names(&fresh),
        "{} holds other files than the protos generate; rerun with TESSERA_REGEN=1",
        committed.display()
    );
    for (name, bytes) in &fresh {
        assert!(
            current[name] == *bytes,
            "{}/{name} is out of date with the protos; rerun with TESSERA_REGEN=1 to refresh it",
            committed.display()
        );
    }
}

#[test]
fn committed_code_matches_proto() {
    check(
        &["workload.proto"],
        None,
        &root().join("src/gen"),
        "workload_descriptor.bin",
    );
}

#[test]
fn committed_envoy_code_matches_protos() {
    check(
        &[
            "envoy/service/secret/v3/sds.proto",
            "envoy/extensions/transport_sockets/tls/v3/secret.proto",
            "envoy/extensions/transport_sockets/tls/v3/tls_spiffe_validator_config.proto",
        ],
        Some("_includes.rs"),
        &root().join("src/gen/envoy"),
        "descriptor.bin",
    );
}

#[test]
fn proto_has_no_package_line() {
    // A package would move every RPC off `/SpiffeWorkloadAPI/...` and break all clients.
    let proto = include_str!("../proto/workload.proto");
    assert!(
        !proto
            .lines()
            .any(|l| l.trim_start().starts_with("package ")),
        "workload.proto must not declare a package"
    );
    let generated =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/gen/_.rs")).unwrap();
    assert!(generated.contains("\"/SpiffeWorkloadAPI/FetchX509SVID\""));
}

#[test]
fn sds_keeps_envoys_method_paths() {
    // Envoy calls these exact paths; the package lines make them.
    let generated = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/gen/envoy/envoy.service.secret.v3.rs"
    ))
    .unwrap();
    for method in ["StreamSecrets", "FetchSecrets", "DeltaSecrets"] {
        let path = format!("\"/envoy.service.secret.v3.SecretDiscoveryService/{method}\"");
        assert!(generated.contains(&path), "{path} missing");
    }
}
