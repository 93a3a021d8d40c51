//! The nvptx "linker": rustc calls the build executable with `llvm-bitcode-linker`'s arguments
//! (bitcode inputs, `--export-symbol`, `--target-cpu`, `-o`); this runs `llvm-link`, then `opt` with
//! internalize + globaldce (only the exported kernels stay), then `llc` to PTX.

use std::path::PathBuf;
use std::process::Command;

/// Links, writes the PTX, and exits the process (status 0 on success, 1 with a message on failure).
pub(crate) fn run_and_exit() -> ! {
    match link(expand_response_files(std::env::args().skip(1).collect())) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("ptx-builder linker: {e}");
            std::process::exit(1)
        }
    }
}

/// rustc passes `@file` when the command line is long.
fn expand_response_files(args: Vec<String>) -> Vec<String> {
    args.into_iter()
        .flat_map(|a| match a.strip_prefix('@').map(std::fs::read_to_string) {
            Some(Ok(s)) => s.lines().map(str::to_string).collect(),
            _ => vec![a],
        })
        .collect()
}

fn link(args: Vec<String>) -> Result<(), String> {
    let bin = PathBuf::from(std::env::var_os(super::LLVM_BIN_ENV).ok_or("PTX_BUILDER_LLVM_BIN unset")?);
    let (mut inputs, mut symbols, mut llvm_args) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu, mut features, mut out, mut opt, mut copy) = (None, None, None, "O3".to_string(), None);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--export-symbol" => symbols.push(it.next().ok_or("--export-symbol without a value")?),
            "--target" | "-L" => {
                it.next();
            }
            "--target-cpu" => cpu = it.next(),
            "--target-feature" => features = it.next(),
            "-o" => out = it.next(),
            "--debug" => {}
            s if s.starts_with("--target-feature=") => features = Some(s["--target-feature=".len()..].to_string()),
            s if s.starts_with("--llvm-arg=") => llvm_args.push(s["--llvm-arg=".len()..].to_string()),
            s if s.starts_with("--ptx-copy=") => copy = Some(PathBuf::from(&s["--ptx-copy=".len()..])),
            s if s.starts_with("-O") => opt = s[2..].to_string(),
            _ => inputs.push(a),
        }
    }
    let out = PathBuf::from(out.ok_or("no -o argument")?);
    let linked = out.with_extension("linked.bc");
    let optimized = out.with_extension("opt.bc");
    let symbol_file = out.with_extension("symbols.txt");
    std::fs::write(&symbol_file, symbols.join("\n") + "\n").map_err(|e| e.to_string())?;

    let run = |c: &mut Command| -> Result<(), String> {
        let o = c.output().map_err(|e| format!("{c:?}: {e}"))?;
        if o.status.success() { Ok(()) } else { Err(format!("{c:?} failed:\n{}", String::from_utf8_lossy(&o.stderr))) }
    };
    run(Command::new(bin.join("llvm-link")).arg("--ignore-non-bitcode").args(&inputs).arg("-o").arg(&linked))?;
    let opt_level = if opt == "0" { "O0".to_string() } else { format!("O{}", opt.trim_start_matches('O')) };
    run(Command::new(bin.join("opt"))
        .arg(&linked)
        .arg("-o")
        .arg(&optimized)
        .arg(format!("--internalize-public-api-file={}", symbol_file.display()))
        .arg(format!("--passes=internalize,globaldce,default<{opt_level}>"))
        .arg("--strip-debug")
        .args(&llvm_args))?;
    let mut llc = Command::new(bin.join("llc"));
    if let Some(c) = &cpu {
        llc.arg(format!("--mcpu={c}"));
    }
    if let Some(f) = &features {
        llc.arg(format!("--mattr={f}"));
    }
    run(llc.arg(&optimized).arg("-o").arg(&out))?;
    if let Some(copy) = copy {
        std::fs::copy(&out, &copy).map_err(|e| format!("copy {} -> {}: {e}", out.display(), copy.display()))?;
    }
    Ok(())
}
