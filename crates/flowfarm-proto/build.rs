//! Generates the gRPC code from proto/flowfarm/v1 with a vendored protoc, so
//! nothing has to be installed by hand.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    // Read when the script runs, not baked in when it is compiled: two
    // checkouts sharing a target folder share this script's binary.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = ["common", "render", "admin", "worker"].map(|name| root.join(format!("flowfarm/v1/{name}.proto")));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptor = PathBuf::from(std::env::var("OUT_DIR")?).join("flowfarm_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        // Ordered maps make encodings deterministic, so equal requests hash equally (idempotency).
        .btree_map(".")
        // Undecodable requests are the sender's fault: INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::codec::FlowfarmCodec")
        .compile_protos(&files, &[root])?;
    Ok(())
}
