//! Compiles `kernels-gpu` to PTX (and cubins, where `ptxas` is found) for every arch and kernel
//! family, and writes `$OUT_DIR/kernels.rs`, which `src/ptx.rs` includes.
use pagedattn_layout::{ARCHS, KernelFamily};

fn main() {
    // rustc runs this executable as the nvptx linker during the kernel build: link and exit first.
    ptx_builder::link_if_invoked_as_linker();
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    // Without the `kernels` feature (CPU-only builds, e.g. the fuzz target): no GPU images, every
    // GPU op then fails with `Error::NoImage`.
    if std::env::var_os("CARGO_FEATURE_KERNELS").is_none() {
        let index = "/// No kernel images: built without the `kernels` feature.\npub static KERNEL_IMAGES: &[KernelImage] = &[];\n\
                     /// The archs this build compiled (none).\npub static BUILT_ARCHS: &[&str] = &[];\n";
        std::fs::write(out_dir.join("kernels.rs"), index).expect("write kernels.rs");
        std::fs::write(out_dir.join("kernel-build-report.txt"), "kernel build: skipped (no `kernels` feature)\n").expect("write report");
        return;
    }
    let families = KernelFamily::ALL.map(KernelFamily::name);
    // `PAGEDATTN_ARCHS=sm_90` builds a subset of the archs (a smaller, faster build for one GPU,
    // e.g. the test pack carried to an H100); unset, every arch of `ARCHS`.
    println!("cargo:rerun-if-env-changed=PAGEDATTN_ARCHS");
    let archs: Vec<&str> = match std::env::var("PAGEDATTN_ARCHS") {
        Ok(list) if !list.trim().is_empty() => {
            let want: Vec<String> = list.split(',').map(|a| a.trim().to_string()).collect();
            for a in &want {
                assert!(ARCHS.contains(&a.as_str()), "PAGEDATTN_ARCHS: {a} is not one of {ARCHS:?}");
            }
            ARCHS.iter().copied().filter(|a| want.iter().any(|w| w == a)).collect()
        }
        _ => ARCHS.to_vec(),
    };
    println!("cargo:rustc-env=PAGEDATTN_ARCHS_SUBSET={}", (archs.len() < ARCHS.len()) as u8);
    let mut builder = ptx_builder::PtxBuilder::new("../kernels-gpu").archs(&archs).families(&families);
    for f in KernelFamily::ALL {
        if f.archs() != ARCHS {
            // An arch-specific target (sm_90a) is built when its base arch (sm_90) is.
            let own: Vec<&str> = f.archs().iter().copied().filter(|a| archs.iter().any(|b| a.trim_end_matches('a') == *b)).collect();
            builder = builder.family_archs(f.name(), &own);
        }
        if let Some((prefix, threads, ctas)) = f.launch_bounds() {
            builder = builder.launch_bounds(prefix, threads, ctas);
        }
    }
    let out = builder
        .watch("../crates/layout/src")
        // Register arrays are indexed in loops with compile-time bounds; the default threshold left
        // some of them partly rolled, in local memory.
        .llvm_args(&["-unroll-threshold=2000"])
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    out.write_rust_index(out_dir.join("kernels.rs")).expect("write kernels.rs");
    std::fs::write(out_dir.join("kernel-build-report.txt"), out.report()).expect("write report");
}
