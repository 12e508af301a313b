fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from a registry crate so a fresh machine needs no system protoc.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/raft.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/raft.proto");
    Ok(())
}
