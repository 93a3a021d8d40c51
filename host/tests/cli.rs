//! The `pagedattn` binary end to end on the CPU backend: every op's `run` writes its file and exits
//! 0, `info` lists every variant, bad arguments exit 2, and without a GPU `verify` and `bench` exit 3.

use std::path::PathBuf;
use std::process::{Command, Output};

use pagedattn::{Error, Gpu};

fn pagedattn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pagedattn")).args(args).output().expect("the pagedattn binary runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn out_file(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    dir.join(format!("cli-{name}-{}.safetensors", std::process::id()))
}

#[test]
fn run_every_op_on_the_cpu_backend() {
    let small = ["--cpu", "--head-size", "64", "--num-kv-heads", "2", "--seq-lens", "3,20"];
    let cases: &[(&str, &[&str], &str)] = &[
        ("paged-attention", &["--num-heads", "4", "--version", "v2", "--partition-size", "32"], "paged_attention (v2"),
        ("paged-attention", &["--num-heads", "4"], "paged_attention (auto: v1)"),
        ("reshape-and-cache", &[], "23 slots written"),
        ("reshape-and-cache-flash", &["--layout", "hnd"], "23 slots written"),
        ("reshape-and-cache-flash", &["--layout", "combined", "--dtype", "bf16"], "kv_cache [2,"),
        ("reshape-and-cache-flash", &["--layout", "combined-inner"], "23 slots written"),
        ("copy-blocks", &["--num-layers", "2", "--pairs", "3", "--layout", "combined-inner"], "6 of 6 destination key blocks changed"),
        ("swap-blocks", &["--direction", "h2d", "--pairs", "4"], "swap_blocks h2d"),
        ("swap-blocks", &["--direction", "d2d", "--layout", "hnd"], "swap_blocks d2d hnd"),
    ];
    for (i, (op, extra, needle)) in cases.iter().enumerate() {
        let file = out_file(&format!("{op}-{i}"));
        let mut args = vec!["run", "--op", op, "-o", file.to_str().unwrap()];
        args.extend(small);
        args.extend(*extra);
        let o = pagedattn(&args);
        let t = text(&o);
        assert!(o.status.success(), "{args:?}: {t}");
        assert!(t.contains(needle), "{args:?}: no {needle:?} in {t}");
        assert!(std::fs::metadata(&file).is_ok_and(|m| m.len() > 0), "{args:?}: no file");
        let _ = std::fs::remove_file(&file);
    }
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["run", "--op", "reshape-and-cache", "--layout", "hnd", "--cpu"][..],
        &["run", "--op", "reshape-and-cache-flash", "--layout", "vllm", "--cpu"],
        &["run", "--op", "copy-blocks", "--block-size", "0", "--cpu"],
        &["run", "--op", "copy-blocks", "--input", "x.safetensors", "--cpu"],
        &["run", "--version", "v2", "--partition-size", "33", "--cpu"],
        &["run", "--op", "reshape-and-cache", "--head-size", "12", "--cpu"],
    ] {
        let o = pagedattn(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
    }
}

#[test]
fn info_lists_every_variant() {
    let o = pagedattn(&["info", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let kernels = v["kernels"].as_array().expect("kernels");
    assert_eq!(kernels.len(), pagedattn::dispatch::kernel_variants().len());
    for kernel in ["paged_attention", "paged_attention_v2_reduce", "reshape_and_cache", "reshape_and_cache_flash", "copy_blocks"] {
        assert!(kernels.iter().any(|k| k["kernel"] == kernel), "{kernel}");
    }
    assert!(v["paged_attention_versions"]["auto"].is_string());
    let o = pagedattn(&["info"]);
    assert!(o.status.success() && text(&o).contains("reshape_and_cache_flash_<dtype>"), "{}", text(&o));
}

/// Without a GPU, `verify` and `bench` exit 3 (with one, they are the GPU machine's job).
#[test]
fn verify_and_bench_need_a_gpu() {
    match Gpu::new(0) {
        Err(Error::NoGpu(_)) => {}
        _ => return,
    }
    for args in [&["verify"][..], &["verify", "--filter", "copy_blocks"], &["bench"], &["bench", "--op", "swap-blocks"]] {
        let o = pagedattn(args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", text(&o));
    }
}
