fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from a registry crate so a fresh machine needs no system protoc.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        // Block payloads and hash lists decode into `Bytes` without a copy.
        .bytes(["."])
        .compile_protos(&["proto/blocksync.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/blocksync.proto");
    // The agent control protocol (control.rs, runtime.rs; the node's scheduler serves it).
    // No transport constructor on the client: its `connect` would clash with the `Connect`
    // RPC (callers build a `Channel` and use `AgentControlClient::new`).
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .bytes(["."])
        .compile_protos(&["proto/control.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/control.proto");
    Ok(())
}
