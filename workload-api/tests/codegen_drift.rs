//! The generated gRPC code is committed (no `protoc` or build script needed to
//! build Tessera). This test regenerates it from `proto/workload.proto` with
//! protox and fails if the committed copy differs.
//!
//! To refresh the committed code after editing the proto:
//! `TESSERA_REGEN=1 cargo test -p tessera-workload-api --test codegen_drift`

use std::path::{Path, PathBuf};

fn generate(out_dir: &Path) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile([root.join("proto/workload.proto")], [root.join("proto")])
        .expect("workload.proto compiles");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        // `bytes::Bytes` lets one issued certificate be shared by every stream
        // without copying it per response.
        .bytes(".")
        // Small per-stream buffers; see `codec` in lib.rs.
        .codec_path("crate::codec::SmallBufferCodec")
        .out_dir(out_dir)
        .compile_fds(fds.clone())
        .expect("code generation succeeds");
    prost::Message::encode_to_vec(&fds)
}

#[test]
fn committed_code_matches_proto() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let committed_dir = root.join("src/gen");
    let tmp = tempfile::tempdir().unwrap();
    let descriptor = generate(tmp.path());
    let fresh = std::fs::read_to_string(tmp.path().join("_.rs")).unwrap();
    let committed_path = committed_dir.join("_.rs");
    let descriptor_path = committed_dir.join("workload_descriptor.bin");

    if std::env::var_os("TESSERA_REGEN").is_some() {
        std::fs::write(&committed_path, &fresh).unwrap();
        std::fs::write(&descriptor_path, &descriptor).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == fresh,
        "src/gen/_.rs is out of date with proto/workload.proto; \
         rerun with TESSERA_REGEN=1 to refresh it"
    );
    let committed_descriptor = std::fs::read(&descriptor_path).unwrap_or_default();
    assert!(
        committed_descriptor == descriptor,
        "src/gen/workload_descriptor.bin is out of date; rerun with TESSERA_REGEN=1"
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
