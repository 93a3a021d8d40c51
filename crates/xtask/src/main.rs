//! Project automation (`cargo xtask <command>`, alias in `.cargo/config.toml`):
//!
//! - `kernels [--clean]`: builds every kernel family for every arch with `ptxas` required, prints the
//!   build time, code sizes and a registers/spills/stack summary of every variant (`ptxas -v`).
//! - `ptxas-report [DIR]`: only the summary, from the `*.ptxas.txt` files of a previous build.
//! - `gpu-pack`: builds the CLI and the integration-test binary in release mode with kernels for
//!   `PAGEDATTN_ARCHS` (default `sm_90`) and copies them with a `run.sh` into `gpu-pack/` (ignored
//!   by git), for a GPU machine without a Rust toolchain. `gpu-pack --examples` packs the serving-loop
//!   example instead of the CLI (each binary embeds every kernel: three would not fit the carry limit).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use pagedattn_layout::{ARCHS, KernelFamily};

/// Largest pack we accept: it is copied to a remote GPU machine on every run.
// Both binaries embed every variant's cubin and PTX (deflated, ~25 MiB each at sm_90); the device
// tool carries at most 64 MiB, so 60 leaves room for a few extra files.
const PACK_LIMIT_BYTES: u64 = 60 << 20;

fn main() -> ExitCode {
    // rustc runs this executable as the nvptx linker during `kernels`.
    ptx_builder::link_if_invoked_as_linker();
    match try_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn try_main() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("kernels") => kernels(&root, args.iter().any(|a| a == "--clean")),
        Some("ptxas-report") => {
            let dir = args.get(1).map(PathBuf::from).unwrap_or_else(|| root.join("target/kernels"));
            let (text, ok) = ptxas_report(&dir)?;
            print!("{text}");
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Some("gpu-pack") => gpu_pack(&root, args.iter().any(|a| a == "--examples")),
        _ => {
            eprintln!("usage: cargo xtask <kernels [--clean] | ptxas-report [DIR] | gpu-pack [--examples]>");
            Ok(ExitCode::from(2))
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("crates/xtask is two levels down").to_path_buf()
}

/// Builds all kernels (the same target dir as `host/build.rs`, so the host build reuses them).
fn kernels(root: &Path, clean: bool) -> Result<ExitCode> {
    let target = root.join("target/ptx-builder");
    let out = root.join("target/kernels");
    if clean {
        let _ = std::fs::remove_dir_all(&target);
        let _ = std::fs::remove_dir_all(&out);
    }
    let families = KernelFamily::ALL.map(KernelFamily::name);
    let mut builder = ptx_builder::PtxBuilder::new(root.join("kernels-gpu")).archs(ARCHS).families(&families);
    // As `host/build.rs`: a family's own archs and launch bounds.
    for f in KernelFamily::ALL {
        if f.archs() != ARCHS {
            builder = builder.family_archs(f.name(), f.archs());
        }
        if let Some((prefix, threads, ctas)) = f.launch_bounds() {
            builder = builder.launch_bounds(prefix, threads, ctas);
        }
    }
    let built = builder
        .target_dir(&target)
        .copy_to(&out)
        .llvm_args(&["-unroll-threshold=2000"])
        .ptxas(ptx_builder::Ptxas::Required)
        .cargo_lines(false)
        .build()?;
    println!("{}{}", if clean { "clean " } else { "" }, built.report());
    let (text, ok) = ptxas_report(&out)?;
    print!("{text}");
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// One entry point's `ptxas -v` figures.
struct Entry {
    name: String,
    registers: u32,
    stack: u32,
    spill_bytes: u32,
}

fn parse_ptxas(text: &str) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    let num_before = |line: &str, word: &str| -> u32 {
        let toks: Vec<&str> = line.split_whitespace().collect();
        toks.windows(2).find(|w| w[1].starts_with(word)).and_then(|w| w[0].parse().ok()).unwrap_or(0)
    };
    // ptxas lists the properties of the functions an entry calls (core's panic paths) after the
    // entry's own: only the block headed by the entry's name counts.
    let mut props_of = String::new();
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            entries.push(Entry { name, registers: 0, stack: 0, spill_bytes: 0 });
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            props_of = rest.trim().to_string();
        } else if let Some(e) = entries.last_mut() {
            if line.contains("bytes stack frame") && props_of == e.name {
                e.stack = num_before(line, "bytes");
                // "S bytes stack frame, T bytes spill stores, L bytes spill loads": stores + loads.
                e.spill_bytes = line.split(',').skip(1).map(|p| num_before(p, "bytes")).sum();
            } else if line.contains("Used") && line.contains("registers") {
                e.registers = num_before(line, "registers");
            }
        }
    }
    entries
}

/// Summary per (family, arch) of every `*.ptxas.txt` in `dir`; `ok` is false if a log reports an
/// error or a file is missing.
fn ptxas_report(dir: &Path) -> Result<(String, bool)> {
    let mut logs: Vec<PathBuf> =
        std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().ends_with(".ptxas.txt")).collect();
    logs.sort();
    let mut s = String::from("ptxas -v summary (registers per thread, stack frame and spill bytes per entry point):\n");
    let mut ok = !logs.is_empty();
    for log in &logs {
        let text = std::fs::read_to_string(log)?;
        if text.contains("error") {
            ok = false;
        }
        let entries = parse_ptxas(&text);
        let name = log.file_name().map(|n| n.to_string_lossy().replace(".ptxas.txt", "")).unwrap_or_default();
        let regs = entries.iter().map(|e| e.registers);
        let (min_r, max_r) = (regs.clone().min().unwrap_or(0), regs.max().unwrap_or(0));
        let with_stack: Vec<&Entry> = entries.iter().filter(|e| e.stack > 0).collect();
        let with_spills: Vec<&Entry> = entries.iter().filter(|e| e.spill_bytes > 0).collect();
        s += &format!(
            "  {name:<28} {:>3} entries  registers {min_r}..{max_r}  with stack frame: {}  with spills: {}\n",
            entries.len(),
            with_stack.len(),
            with_spills.len()
        );
        for e in entries.iter().filter(|e| e.stack > 0 || e.spill_bytes > 0).take(8) {
            s += &format!("      {}: {} regs, {} B stack, {} B spills\n", e.name, e.registers, e.stack, e.spill_bytes);
        }
    }
    if logs.is_empty() {
        s += "  no ptxas logs found (was ptxas available?)\n";
    }
    Ok((s, ok))
}

fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(out)
}

/// Builds the CLI (or, with `examples`, the serving-loop example) and the test binary and bundles
/// them with `run.sh` into `gpu-pack/`.
fn gpu_pack(root: &Path, examples: bool) -> Result<ExitCode> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let pack = root.join("gpu-pack");
    let _ = std::fs::remove_dir_all(&pack);
    std::fs::create_dir_all(&pack)?;
    // One arch keeps the pack small (every arch's kernels would not fit the limit): the H100's,
    // unless PAGEDATTN_ARCHS names others.
    let archs = std::env::var("PAGEDATTN_ARCHS").unwrap_or_else(|_| "sm_90".into());
    let (what, path) =
        if examples { (["--example", "serving_loop"], "examples/serving_loop") } else { (["--bin", "pagedattn"], "pagedattn") };
    eprintln!("xtask: building {} and the test binary (release, kernels for {archs})...", what[1]);
    run(Command::new(&cargo).current_dir(root).env("PAGEDATTN_ARCHS", &archs).args(["build", "--release", "-p", "pagedattn"]).args(what))?;
    let out = run(Command::new(&cargo).current_dir(root).env("PAGEDATTN_ARCHS", &archs).args([
        "test",
        "--release",
        "-p",
        "pagedattn-tests",
        "--no-run",
        "--message-format=json",
    ]))?;
    let test_exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "pagedattn-tests" && v["profile"]["test"] == true)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .ok_or("no test executable in cargo's output")?;
    std::fs::copy(root.join("target/release").join(path), pack.join(what[1]))?;
    std::fs::copy(&test_exe, pack.join("pagedattn-tests"))?;
    std::fs::write(pack.join("run.sh"), RUN_SH)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(pack.join("run.sh"), std::fs::Permissions::from_mode(0o755))?;
    }
    let size: u64 = std::fs::read_dir(&pack)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    println!("gpu-pack: {} ({:.1} MiB; limit {} MiB)", pack.display(), size as f64 / (1 << 20) as f64, PACK_LIMIT_BYTES >> 20);
    if size > PACK_LIMIT_BYTES {
        eprintln!("xtask: the pack is larger than {} MiB", PACK_LIMIT_BYTES >> 20);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The GPU machine's entry point: `gpu-pack/run.sh [tests|verify|run|bench|bench-cache|speed|sanitize|all]`; logs and JSON
/// go to `$OUT` when set (the remote runner's output folder), else to `gpu-pack/out`.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# Runs pagedattn's GPU tests, verification and benchmark on a machine with an NVIDIA GPU and no Rust.
# Usage: run.sh [all|tests|verify|run|bench|bench-cache|speed|sanitize|serving] [extra bench or serving args]
# serving: the serving-loop example (a pack made with `cargo xtask gpu-pack --examples`).
# speed: issue 7's table (decode grid f16/bf16 with v1/v2/auto and the graph step, other head sizes,
# MHA and block sizes, varlen prefill), JSON in $out/speed-*.json.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/out}"; mkdir -p "$out"
what="${1:-all}"; shift || true
status=0
step() { # step NAME CMD...: runs CMD, full log in $out/NAME.log, last lines on stdout
  local name=$1; shift
  echo "=== $name: $*"
  "$@" > "$out/$name.log" 2>&1; local rc=$?
  tail -n "${TAIL:-25}" "$out/$name.log"
  if [ $rc -ne 0 ]; then echo "=== $name FAILED (exit $rc)"; status=1; fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
case "$what" in tests|all) step tests "$here/pagedattn-tests" --test-threads=1 ;; esac
case "$what" in verify|all) step verify "$here/pagedattn" verify --long --json "$out/verify.json" ;; esac
case "$what" in run|all)
  for op in paged-attention reshape-and-cache reshape-and-cache-flash copy-blocks swap-blocks; do
    TAIL=3 step "run-$op" "$here/pagedattn" run --op "$op" -o "$out/run-$op.safetensors"
  done
  for op in paged-attention reshape-and-cache reshape-and-cache-flash; do
    TAIL=3 step "run-$op-fp8" "$here/pagedattn" run --op "$op" --kv-cache-dtype fp8_e4m3 -o "$out/run-$op-fp8.safetensors"
  done ;;
esac
case "$what" in bench|all) TAIL=40 step bench "$here/pagedattn" bench --json "$out/bench.json" "$@" ;; esac
case "$what" in bench-cache|all)
  for op in reshape-and-cache reshape-and-cache-flash copy-blocks swap-blocks; do
    TAIL=30 step "bench-$op" "$here/pagedattn" bench --op "$op" --json "$out/bench-$op.json"
  done ;;
esac
case "$what" in speed)
  b="$here/pagedattn bench --iters 30 --warmup 5"
  TAIL=60 step speed-grid $b --dtype f16,bf16 --batch 1,16,64,256 --context 512,4096,16384 --version v1,v2,auto --graph --json "$out/speed-grid.json"
  for s in "--head-size 64" "--head-size 256" "--num-heads 32 --num-kv-heads 32" "--block-size 8" "--block-size 32" "--kv-cache-dtype fp8_e4m3"; do
    n=$(echo "$s" | tr -d '-' | tr ' ' '_')
    TAIL=8 step "speed-$n" $b --dtype f16,bf16 --batch 64,256 --context 4096 --version auto --max-kv-gib 20 $s --json "$out/speed-$n.json"
  done
  TAIL=12 step speed-varlen "$here/pagedattn" bench --op flash-attn-varlen --json "$out/speed-varlen.json" ;;
esac
case "$what" in serving)
  TAIL=12 step serving "$here/serving_loop" --device gpu --json "$out/serving.json" "$@" ;;
esac
case "$what" in sanitize)
  # The sanitizer grid: small cases of every op and dtype (tests/sanitize.rs), the guarded
  # bad-device-data tests, the decode graphs; under each of the four tools, one summary line each.
  grid="sanitize:: gpu_bad_device_block_id_is_flagged gpu_bad_device_seq_len_is_flagged gpu_v2_length_beyond_workspace_is_flagged
    gpu_bad_device_slot_is_flagged gpu_duplicate_device_slots_one_write_wins gpu_bad_device_block_id_in_copy_blocks_is_flagged
    gpu_bad_device_scale_is_flagged gpu_swap_blocks_with_pinned_host_memory gpu_swap_blocks_device_to_device
    gpu_varlen_guards_device_tables gpu_serving_steps_graph gpu_decode_step_replays_in_a_graph gpu_zero_length_gives_zeros"
  t_all=$(date +%s)
  for tool in memcheck racecheck synccheck initcheck; do
    t0=$(date +%s)
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$here/pagedattn-tests" --test-threads=1 $grid > "$out/sanitize-$tool.log" 2>&1; rc=$?
    summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$out/sanitize-$tool.log" | tail -n 1 | sed 's/^=* *//')
    result=$(grep -E "^test result" "$out/sanitize-$tool.log" | tail -n 1)
    echo "sanitize $tool: ${summary:-no summary}; ${result:-no test result}; exit $rc; $(( $(date +%s) - t0 )) s"
    if [ $rc -ne 0 ]; then status=1; grep -m 20 -E "^=+ +(Invalid|Race|Uninitialized|Barrier|ERROR|Error)" "$out/sanitize-$tool.log"; fi
  done
  echo "sanitize: all four tools in $(( $(date +%s) - t_all )) s" ;;
esac
exit $status
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_entries_keep_their_own_properties() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
                   ptxas info    : Function properties for k\n    64 bytes stack frame, 88 bytes spill stores, 204 bytes spill loads\n\
                   ptxas info    : Used 168 registers, used 16 barriers, 64 bytes cumulative stack size\n\
                   ptxas info    : Function properties for panic_fmt\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n";
        let e = parse_ptxas(log);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].registers, e[0].stack, e[0].spill_bytes), (168, 64, 88 + 204));
    }
}
