//! Compiles the tracepoint source's BPF program (feature `ebpf`) from `bpf/locks.bpf.c` with
//! clang. The default build needs no clang: without the feature nothing is compiled.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf/locks.bpf.c");
    println!("cargo:rerun-if-env-changed=CLANG");
    // Extra clang flags, for experiments with the BPF program (e.g. -DLOCKMETER_BPF_NOOP).
    println!("cargo:rerun-if-env-changed=LOCKMETER_BPF_CFLAGS");
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let (target_arch, multiarch) = match arch.as_str() {
        "x86_64" => ("x86", "x86_64-linux-gnu"),
        "aarch64" => ("arm64", "aarch64-linux-gnu"),
        other => (other, ""),
    };
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-D__TARGET_ARCH_{target_arch}"));
    if !multiarch.is_empty() {
        // <asm/types.h> lives in the multiarch include directory on Debian and Ubuntu.
        cmd.arg(format!("-I/usr/include/{multiarch}"));
    }
    if let Ok(extra) = std::env::var("LOCKMETER_BPF_CFLAGS") {
        cmd.args(extra.split_whitespace());
    }
    cmd.args(["-c", "bpf/locks.bpf.c", "-o"])
        .arg(out.join("locks.bpf.o"));
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "feature `ebpf` needs clang to compile bpf/locks.bpf.c ({clang}: {e}); \
             install clang and libbpf-dev (apt-get install clang libbpf-dev), or build without --features ebpf"
        )
    });
    assert!(
        status.success(),
        "clang failed to compile bpf/locks.bpf.c ({status}); needs libbpf-dev's <bpf/bpf_helpers.h>"
    );
}
