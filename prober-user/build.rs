//! Points the daemon at the eBPF object built by `cargo xtask build-ebpf`,
//! which it embeds. The object needs nightly, rust-src and bpf-linker, which a
//! build script should not install behind the user's back, so a missing
//! object stops the build with the command that makes it.

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("..").join("target"));
    let object = target_dir
        .join("bpfel-unknown-none")
        .join("release")
        .join("prober-ebpf");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "\n\nThe eBPF object {} is missing.\n\
             Build it first with:\n\n    cargo xtask build-ebpf\n\n\
             (`cargo xtask test` and `cargo xtask demo` build it too.)\n\n",
            object.display()
        );
    }
    println!("cargo:rustc-env=PROBER_EBPF_OBJECT={}", object.display());
}
