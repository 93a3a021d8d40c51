//! Compiles `kernels-gpu` to PTX (and cubins, where `ptxas` is found) for every arch and kernel
//! family, and writes `$OUT_DIR/kernels.rs`, which `src/ptx.rs` includes.
use pagedattn_layout::{ARCHS, KernelFamily};

fn main() {
    let families = KernelFamily::ALL.map(KernelFamily::name);
    let out = ptx_builder::PtxBuilder::new("../kernels-gpu")
        .archs(ARCHS)
        .families(&families)
        .watch("../crates/layout/src")
        // Register arrays are indexed in loops with compile-time bounds; the default threshold left
        // some of them partly rolled, in local memory.
        .llvm_args(&["-unroll-threshold=2000"])
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    out.write_rust_index(out_dir.join("kernels.rs")).expect("write kernels.rs");
    std::fs::write(out_dir.join("kernel-build-report.txt"), out.report()).expect("write report");
}
