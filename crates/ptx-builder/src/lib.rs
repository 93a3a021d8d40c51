//! Compiles a `#![no_std]` GPU crate to PTX for `nvptx64-nvidia-cuda`, and to cubins when `ptxas` is
//! available: the role of rust-cuda's `cuda_builder`, on rustc's own nvptx64 backend.
//!
//! ```no_run
//! // In build.rs's `main`:
//! let out = ptx_builder::PtxBuilder::new("../kernels-gpu")
//!     .archs(&["sm_80", "sm_90"])
//!     .families(&["paged_attention"])
//!     .build()
//!     .unwrap_or_else(|e| panic!("{e}"));
//! out.write_rust_index(std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("kernels.rs")).unwrap();
//! ```
//!
//! How it works: for each arch it runs a nested `cargo rustc --release --target nvptx64-nvidia-cuda
//! -Zbuild-std=core` in a target dir of its own (so it never waits on the outer build's lock), once per
//! kernel family (a cargo feature of the GPU crate). The nvptx target's linker, `llvm-bitcode-linker`,
//! is not shipped for this toolchain, so the builder passes *the running executable* as the linker:
//! rustc calls it back with the crate's LLVM bitcode, [`PtxBuilder::build`] notices (an environment
//! variable) and runs `llvm-link → opt (internalize + globaldce) → llc` from the `llvm-tools`
//! component instead of building. `--emit=asm` alone is not enough: calls into `core` stay unresolved.
//! Then `ptxas -v` assembles each PTX for its arch and keeps the register/spill report.

mod linker;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Environment variable that tells the executable it was started by rustc as the linker.
const LINKER_MODE_ENV: &str = "PTX_BUILDER_LINKER_MODE";
/// Directory of `llvm-link`, `opt`, `llc` (passed to the linker invocation).
const LLVM_BIN_ENV: &str = "PTX_BUILDER_LLVM_BIN";
const TARGET: &str = "nvptx64-nvidia-cuda";

/// What went wrong; each message names the command that fixes it where there is one.
#[derive(Debug)]
pub enum BuildError {
    /// A toolchain component or tool is missing.
    Missing {
        what: String,
        fix: String,
    },
    /// A command could not be started or failed.
    Command {
        command: String,
        output: String,
    },
    Io(std::io::Error),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Missing { what, fix } => write!(f, "ptx-builder: {what} is missing; fix it with: {fix}"),
            BuildError::Command { command, output } => write!(f, "ptx-builder: `{command}` failed:\n{output}"),
            BuildError::Io(e) => write!(f, "ptx-builder: {e}"),
        }
    }
}

impl std::error::Error for BuildError {}

impl From<std::io::Error> for BuildError {
    fn from(e: std::io::Error) -> Self {
        BuildError::Io(e)
    }
}

/// When to assemble cubins with `ptxas`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ptxas {
    /// Assemble when `ptxas` is found; otherwise embed PTX only (the driver JIT-compiles it).
    IfAvailable,
    /// Fail when `ptxas` is not found (CI).
    Required,
    /// Never assemble.
    Never,
}

/// One compiled (family, arch).
#[derive(Clone, Debug)]
pub struct Artifact {
    pub family: String,
    pub arch: String,
    pub ptx: PathBuf,
    /// Present when `ptxas` ran.
    pub cubin: Option<PathBuf>,
    /// `ptxas -v` output (registers, spills, stack per entry point).
    pub ptxas_log: Option<PathBuf>,
}

/// Result of [`PtxBuilder::build`].
#[derive(Clone, Debug)]
pub struct BuildOutput {
    pub artifacts: Vec<Artifact>,
    /// Wall time of the whole build (nested cargo, linking, ptxas).
    pub elapsed: Duration,
    /// Paths whose change must trigger a rebuild (already printed as `cargo:rerun-if-changed`).
    pub watched: Vec<PathBuf>,
}

/// Builder for the PTX of one GPU crate. Every option has a default; see each method.
#[derive(Clone, Debug)]
pub struct PtxBuilder {
    crate_path: PathBuf,
    archs: Vec<String>,
    families: Vec<String>,
    target_dir: Option<PathBuf>,
    copy_to: Option<PathBuf>,
    ptxas: Ptxas,
    extra_watch: Vec<PathBuf>,
    llvm_args: Vec<String>,
    emit_cargo_lines: bool,
    family_archs: Vec<(String, Vec<String>)>,
    launch_bounds: Vec<(String, u32, u32)>,
}

impl PtxBuilder {
    /// Builder for the GPU crate at `crate_path` (a directory with a `Cargo.toml`).
    pub fn new(crate_path: impl Into<PathBuf>) -> Self {
        PtxBuilder {
            crate_path: crate_path.into(),
            archs: vec!["sm_80".into()],
            families: Vec::new(),
            target_dir: None,
            copy_to: None,
            ptxas: Ptxas::IfAvailable,
            extra_watch: Vec::new(),
            llvm_args: Vec::new(),
            emit_cargo_lines: true,
            family_archs: Vec::new(),
            launch_bounds: Vec::new(),
        }
    }

    /// GPU architectures (`sm_80`, `sm_90`, `sm_90a`, ...), each compiled separately with
    /// `-C target-cpu=<arch>`. Code for `sm_XY` runs on devices of compute capability X.Y and, as PTX
    /// JIT-compiled by the driver, on any later one; a cubin runs on the same major version with an
    /// equal or higher minor (`sm_90a` cubins only on 9.0).
    pub fn archs(mut self, archs: &[&str]) -> Self {
        self.archs = archs.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Kernel families: cargo features of the GPU crate, each compiled into a PTX module of its own,
    /// so a host can load only the modules it uses. Empty (default): one module with the crate's
    /// default features, named after the crate.
    pub fn families(mut self, families: &[&str]) -> Self {
        self.families = families.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Archs of one family instead of [`Self::archs`] (e.g. only `sm_90a` for a family of Hopper-only
    /// instructions); the other families keep the common list.
    pub fn family_archs(mut self, family: &str, archs: &[&str]) -> Self {
        self.family_archs.retain(|(f, _)| f != family);
        self.family_archs.push((family.to_string(), archs.iter().map(|s| s.to_string()).collect()));
        self
    }

    /// Launch bounds for every entry point whose name starts with `prefix`: `.maxntid max_threads, 1, 1`
    /// and `.minnctapersm min_ctas` are written into the PTX (CUDA C++'s `__launch_bounds__`, which
    /// rustc's nvptx target has no attribute for). `ptxas` then caps registers at entry, which
    /// `setmaxnreg` needs.
    pub fn launch_bounds(mut self, prefix: &str, max_threads: u32, min_ctas: u32) -> Self {
        self.launch_bounds.push((prefix.to_string(), max_threads, min_ctas));
        self
    }

    /// Target directory of the nested cargo (default: `<outer target dir>/ptx-builder`, shared by all
    /// profiles of the outer build, or `$OUT_DIR/ptx-builder`). One subdirectory per arch.
    pub fn target_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.target_dir = Some(dir.into());
        self
    }

    /// Directory that receives `<family>.<arch>.ptx` / `.cubin` / `.ptxas.txt` (default: `$OUT_DIR`).
    pub fn copy_to(mut self, dir: impl Into<PathBuf>) -> Self {
        self.copy_to = Some(dir.into());
        self
    }

    /// When to run `ptxas` (default [`Ptxas::IfAvailable`]; the environment variable
    /// `PTX_BUILDER_REQUIRE_PTXAS=1` turns it into [`Ptxas::Required`]). `ptxas` is looked up as `$PTXAS`,
    /// on `PATH`, in `$CUDA_HOME/bin`, then in the Python package `nvidia-cuda-nvcc`.
    pub fn ptxas(mut self, mode: Ptxas) -> Self {
        self.ptxas = mode;
        self
    }

    /// More paths that trigger a rebuild (e.g. a crate the GPU crate depends on by path).
    pub fn watch(mut self, path: impl Into<PathBuf>) -> Self {
        self.extra_watch.push(path.into());
        self
    }

    /// Extra LLVM options (e.g. `-unroll-threshold=2000`), given to rustc (`-C llvm-args`) and to the
    /// link-time `opt`, which runs the full `O3` pipeline over the linked module.
    pub fn llvm_args(mut self, args: &[&str]) -> Self {
        self.llvm_args = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Print `cargo:rerun-if-changed` lines (default true; turn off outside build scripts).
    pub fn cargo_lines(mut self, on: bool) -> Self {
        self.emit_cargo_lines = on;
        self
    }

    /// Builds every (arch, family). If this executable was started by rustc as the nvptx linker, it
    /// links instead and exits: call this before the build script prints anything.
    pub fn build(self) -> Result<BuildOutput, BuildError> {
        link_if_invoked_as_linker();
        let start = Instant::now();
        let crate_path = self.crate_path.canonicalize().map_err(|e| BuildError::Missing {
            what: format!("GPU crate {} ({e})", self.crate_path.display()),
            fix: "pass the path of the kernels crate to PtxBuilder::new".into(),
        })?;
        let toolchain = Toolchain::locate()?;
        let target_dir = match &self.target_dir {
            Some(d) => d.clone(),
            None => default_target_dir()?,
        };
        let copy_to = match &self.copy_to {
            Some(d) => d.clone(),
            None => PathBuf::from(std::env::var_os("OUT_DIR").ok_or_else(|| BuildError::Missing {
                what: "OUT_DIR (not running from a build script)".into(),
                fix: "call PtxBuilder::copy_to(dir)".into(),
            })?),
        };
        std::fs::create_dir_all(&copy_to)?;
        let mode = if std::env::var("PTX_BUILDER_REQUIRE_PTXAS").is_ok_and(|v| v == "1") { Ptxas::Required } else { self.ptxas };
        let ptxas = match mode {
            Ptxas::Never => None,
            Ptxas::IfAvailable => find_ptxas(),
            Ptxas::Required => Some(find_ptxas().ok_or_else(|| BuildError::Missing {
                what: "ptxas (CUDA 13.0 assembler)".into(),
                fix: "python3 -m pip install nvidia-cuda-nvcc==13.0.88   (or set PTXAS=/path/to/ptxas)".into(),
            })?),
        };

        let families: Vec<Option<String>> =
            if self.families.is_empty() { vec![None] } else { self.families.iter().cloned().map(Some).collect() };
        let crate_name = crate_name(&crate_path)?;

        // The archs of a family: its own list, else the common one.
        let archs_of = |family: &Option<String>| -> &[String] {
            let own = family.as_ref().and_then(|f| self.family_archs.iter().find(|(n, _)| n == f));
            own.map_or(&self.archs, |(_, a)| a)
        };
        let mut all_archs: Vec<&String> = Vec::new();
        for f in &families {
            for a in archs_of(f) {
                if !all_archs.contains(&a) {
                    all_archs.push(a);
                }
            }
        }

        // Archs in parallel (separate target dirs, separate cargo locks); families in sequence.
        let results: Vec<Result<Vec<Artifact>, BuildError>> = std::thread::scope(|s| {
            let handles: Vec<_> = all_archs
                .iter()
                .map(|&arch| {
                    let (toolchain, families, crate_path, crate_name) = (&toolchain, &families, &crate_path, &crate_name);
                    let (target_dir, copy_to, ptxas, llvm_args) = (&target_dir, &copy_to, &ptxas, &self.llvm_args);
                    let (archs_of, bounds) = (&archs_of, &self.launch_bounds);
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for family in families.iter().filter(|f| archs_of(f).contains(arch)) {
                            let name = family.clone().unwrap_or_else(|| crate_name.replace('-', "_"));
                            // A target dir per (arch, family): cargo keeps one fingerprint per crate
                            // and target dir, whatever the features, so families sharing a dir
                            // rebuilt each other on every run (all of them, every time the build
                            // script ran). `core` is built once per family instead.
                            let dir = target_dir.join(arch).join(&name);
                            let ptx = compile_ptx(toolchain, crate_path, &dir, arch, family.as_deref(), &name, llvm_args)?;
                            let dst = copy_to.join(format!("{name}.{arch}.ptx"));
                            if bounds.is_empty() {
                                copy_if_changed(&ptx, &dst)?;
                            } else {
                                write_if_changed(&dst, add_launch_bounds(&std::fs::read_to_string(&ptx)?, bounds).as_bytes())?;
                            }
                            let (cubin, log) = match ptxas {
                                Some(ptxas) => {
                                    let (c, l) = assemble_cached(ptxas, &dst, arch, &dir)?;
                                    (Some(c), Some(l))
                                }
                                None => (None, None),
                            };
                            out.push(Artifact { family: name, arch: arch.clone(), ptx: dst, cubin, ptxas_log: log });
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("ptx-builder worker panicked")).collect()
        });
        let mut artifacts = Vec::new();
        for r in results {
            artifacts.extend(r?);
        }

        let mut watched = vec![crate_path.join("src"), crate_path.join("Cargo.toml")];
        watched.extend(self.extra_watch.iter().cloned());
        if self.emit_cargo_lines {
            for w in &watched {
                println!("cargo:rerun-if-changed={}", w.display());
            }
            println!("cargo:rerun-if-env-changed=PTXAS");
            println!("cargo:rerun-if-env-changed=PTX_BUILDER_REQUIRE_PTXAS");
        }
        Ok(BuildOutput { artifacts, elapsed: start.elapsed(), watched })
    }
}

impl BuildOutput {
    /// Writes a Rust file (for `include!`) defining `KERNEL_IMAGES: &[KernelImage]`, one entry per
    /// (family, arch). PTX and cubins are stored deflate-compressed (PTX text shrinks about tenfold),
    /// next to the index, and embedded with `include_bytes!`; the includer defines
    /// `struct KernelImage { family: &'static str, arch: &'static str, ptx_deflate: &'static [u8],
    /// cubin_deflate: Option<&'static [u8]> }` and inflates an image when it loads its module.
    pub fn write_rust_index(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        let dir = path.as_ref().parent().unwrap_or(Path::new("."));
        let compressed = |p: &Path| -> std::io::Result<String> {
            let data = std::fs::read(p)?;
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let dst = dir.join(format!("{name}.deflate"));
            let stale = std::fs::metadata(&dst).and_then(|m| m.modified()).ok() < std::fs::metadata(p).and_then(|m| m.modified()).ok();
            if stale {
                write_if_changed(&dst, &miniz_oxide::deflate::compress_to_vec(&data, 8))?;
            }
            Ok(format!("include_bytes!({:?})", dst.display().to_string()))
        };
        let mut s = String::from(
            "// Generated by ptx-builder.\n/// Every embedded kernel image (one per family and arch).\npub static KERNEL_IMAGES: &[KernelImage] = &[\n",
        );
        for a in &self.artifacts {
            let cubin = match &a.cubin {
                Some(c) => format!("Some({})", compressed(c)?),
                None => "None".into(),
            };
            s += &format!(
                "    KernelImage {{ family: {:?}, arch: {:?}, ptx_deflate: {}, cubin_deflate: {cubin} }},\n",
                a.family,
                a.arch,
                compressed(&a.ptx)?
            );
        }
        s += "];\n";
        let mut archs: Vec<&str> = Vec::new();
        for a in &self.artifacts {
            if !archs.contains(&a.arch.as_str()) {
                archs.push(&a.arch);
            }
        }
        s += &format!("/// The archs this build compiled.\npub static BUILT_ARCHS: &[&str] = &{archs:?};\n");
        write_if_changed(path.as_ref(), s.as_bytes())
    }

    /// A short report: per artifact the PTX and cubin sizes, and the total.
    pub fn report(&self) -> String {
        let mut s = format!("kernel build: {:.1} s\n", self.elapsed.as_secs_f64());
        let (mut ptx_total, mut cubin_total) = (0u64, 0u64);
        for a in &self.artifacts {
            let ptx = std::fs::metadata(&a.ptx).map(|m| m.len()).unwrap_or(0);
            let cubin = a.cubin.as_ref().and_then(|c| std::fs::metadata(c).ok()).map(|m| m.len()).unwrap_or(0);
            ptx_total += ptx;
            cubin_total += cubin;
            s += &format!("  {:<24} {:<6} ptx {:>9} B  cubin {:>9} B\n", a.family, a.arch, ptx, cubin);
        }
        s += &format!("  total: ptx {ptx_total} B, cubin {cubin_total} B\n");
        s
    }
}

/// The builder makes the running executable the nvptx linker of the nested cargo. A program that calls
/// [`PtxBuilder::build`] outside a build script (e.g. an xtask) must call this first thing in `main`,
/// before it parses its arguments: when rustc started it as the linker, it links and exits.
pub fn link_if_invoked_as_linker() {
    if std::env::var_os(LINKER_MODE_ENV).is_some() {
        linker::run_and_exit();
    }
}

/// Where the nightly's tools are.
struct Toolchain {
    cargo: PathBuf,
    rustc: PathBuf,
    llvm_bin: PathBuf,
}

impl Toolchain {
    fn locate() -> Result<Toolchain, BuildError> {
        // Inside a build script CARGO/RUSTC name the outer build's (pinned) toolchain binaries.
        let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| "cargo".into());
        let rustc = std::env::var_os("RUSTC").map(PathBuf::from).unwrap_or_else(|| "rustc".into());
        let out = clean_env(Command::new(&rustc))
            .args(["--print", "sysroot"])
            .output()
            .map_err(|e| BuildError::Command { command: format!("{} --print sysroot", rustc.display()), output: e.to_string() })?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let host =
            String::from_utf8_lossy(&clean_env(Command::new(&rustc)).args(["--print", "host-tuple"]).output()?.stdout).trim().to_string();
        // Hand the nested cargo the toolchain's own rustc, never the rustup proxy: cargo compiles `core`
        // with the rust-src directory as working directory, where no rust-toolchain.toml selects the
        // pinned nightly and the proxy would pick the default toolchain.
        let rustc = if sysroot.join("bin/rustc").is_file() { sysroot.join("bin/rustc") } else { rustc };
        let cargo =
            if std::env::var_os("CARGO").is_none() && sysroot.join("bin/cargo").is_file() { sysroot.join("bin/cargo") } else { cargo };
        let llvm_bin = sysroot.join("lib/rustlib").join(&host).join("bin");
        for tool in ["llvm-link", "opt", "llc"] {
            if !llvm_bin.join(tool).exists() {
                return Err(BuildError::Missing {
                    what: format!("{tool} from the llvm-tools component (looked in {})", llvm_bin.display()),
                    fix: "rustup toolchain install   (installs rust-toolchain.toml's components; or: rustup component add llvm-tools)"
                        .into(),
                });
            }
        }
        if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
            return Err(BuildError::Missing {
                what: "the rust-src component (needed by -Zbuild-std=core)".into(),
                fix: "rustup toolchain install   (or: rustup component add rust-src)".into(),
            });
        }
        Ok(Toolchain { cargo, rustc, llvm_bin })
    }
}

/// Removes the outer build's variables that would steer the nested cargo wrongly.
fn clean_env(mut c: Command) -> Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let drop = k.starts_with("CARGO_")
            || matches!(
                k.as_ref(),
                "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "OUT_DIR"
                    | "TARGET"
                    | "HOST"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
                    | "NUM_JOBS"
                    | "RUSTC_LINKER"
                    | "CARGO"
                    | "RUSTC"
                    | "RUSTDOC"
                    | "RUSTUP_TOOLCHAIN"
            );
        if drop {
            c.env_remove(k.as_ref());
        }
    }
    c
}

fn default_target_dir() -> Result<PathBuf, BuildError> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or_else(|| BuildError::Missing {
        what: "OUT_DIR (not running from a build script)".into(),
        fix: "call PtxBuilder::target_dir(dir)".into(),
    })?);
    // OUT_DIR = <target>/<profile>/build/<pkg>-<hash>/out: share one kernel build across profiles.
    Ok(match out.ancestors().nth(4) {
        Some(t) if out.ancestors().nth(2).is_some_and(|b| b.ends_with("build")) => t.join("ptx-builder"),
        _ => out.join("ptx-builder"),
    })
}

fn crate_name(crate_path: &Path) -> Result<String, BuildError> {
    let toml = std::fs::read_to_string(crate_path.join("Cargo.toml"))?;
    toml.lines()
        .find_map(|l| l.trim().strip_prefix("name").map(|r| r.trim_start_matches([' ', '=']).trim().trim_matches('"').to_string()))
        .ok_or_else(|| BuildError::Missing { what: "package name in the GPU crate's Cargo.toml".into(), fix: "add [package] name".into() })
}

fn run(mut c: Command) -> Result<(), BuildError> {
    let out = c.output().map_err(|e| BuildError::Command { command: format!("{c:?}"), output: e.to_string() })?;
    if !out.status.success() {
        return Err(BuildError::Command {
            command: format!("{c:?}"),
            output: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(())
}

/// One nested cargo build of `family` for `arch`; returns the PTX path (inside the target dir).
fn compile_ptx(
    tc: &Toolchain,
    crate_path: &Path,
    target_dir: &Path,
    arch: &str,
    family: Option<&str>,
    name: &str,
    llvm_args: &[String],
) -> Result<PathBuf, BuildError> {
    let ptx_dir = target_dir.join("ptx");
    std::fs::create_dir_all(&ptx_dir)?;
    let ptx = ptx_dir.join(format!("{name}.ptx"));
    let me = stable_linker(target_dir)?;
    let mut c = clean_env(Command::new(&tc.cargo));
    c.current_dir(crate_path)
        .env("RUSTC", &tc.rustc)
        .env(LINKER_MODE_ENV, "1")
        .env(LLVM_BIN_ENV, &tc.llvm_bin)
        .args(["rustc", "--release", "--lib", "--target", TARGET, "-Zbuild-std=core", "--crate-type", "cdylib"])
        .arg("--target-dir")
        .arg(target_dir);
    if let Some(f) = family {
        c.args(["--no-default-features", "--features", f]);
    }
    c.arg("--").arg("-C").arg(format!("target-cpu={arch}")).arg("-C").arg(format!("linker={}", me.display()));
    // sm_90 and later: PTX ISA 8.0 (Hopper's bulk copies and prefetches; llc's default for sm_90 is 7.8).
    if ptx80(arch) {
        c.arg("-C").arg("target-feature=+ptx80");
    }
    // The linker also leaves a copy at a path of this family's own, since all families of one target
    // dir share the cdylib's file name.
    c.arg("-C").arg(format!("link-arg=--ptx-copy={}", ptx.display()));
    for a in llvm_args {
        c.arg("-C").arg(format!("llvm-args={a}")).arg("-C").arg(format!("link-arg=--llvm-arg={a}"));
    }
    run(c)?;
    if !ptx.exists() {
        return Err(BuildError::Missing {
            what: format!("{} (cargo reported the kernels fresh but the PTX copy is gone)", ptx.display()),
            fix: format!("rm -rf {}", target_dir.display()),
        });
    }
    Ok(ptx)
}

/// The linker path is part of the nested build's fingerprint: every build script and tool that calls
/// the builder is a different executable, so a copy at a fixed path keeps the kernels fresh across
/// them (debug and release host builds, `cargo xtask kernels`). Replaced atomically when it differs.
fn stable_linker(target_dir: &Path) -> Result<PathBuf, BuildError> {
    let me = std::env::current_exe()?;
    let dst = target_dir.join("ptx-builder-linker");
    let mine = std::fs::read(&me)?;
    if std::fs::read(&dst).is_ok_and(|old| old == mine) {
        return Ok(dst);
    }
    std::fs::create_dir_all(target_dir)?;
    let tmp = target_dir.join(format!("ptx-builder-linker.{}", std::process::id()));
    std::fs::write(&tmp, &mine)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::rename(&tmp, &dst)?;
    Ok(dst)
}

/// `ptxas -v -arch=<arch>` → `<ptx stem>.cubin` + `.ptxas.txt`; skipped when the cubin is newer.
/// [`assemble`], reusing the cubin and log of the last assembly in `cache_dir` (the family's nested
/// target dir) when the PTX is byte-identical: each caller of the builder (the host's build script
/// under `cargo build` and under `cargo clippy`, `cargo xtask kernels`) writes to an output dir of its
/// own, and ptxas on the fp8 family alone takes minutes.
fn assemble_cached(ptxas: &Path, ptx: &Path, arch: &str, cache_dir: &Path) -> Result<(PathBuf, PathBuf), BuildError> {
    let (cubin, log) = (ptx.with_extension("cubin"), ptx.with_extension("ptxas.txt"));
    let (c_ptx, c_cubin, c_log) =
        (cache_dir.join("assembled.ptx"), cache_dir.join("assembled.cubin"), cache_dir.join("assembled.ptxas.txt"));
    let text = std::fs::read(ptx)?;
    if std::fs::read(&c_ptx).is_ok_and(|old| old == text) && c_cubin.is_file() && c_log.is_file() {
        write_if_changed(&cubin, &std::fs::read(&c_cubin)?)?;
        write_if_changed(&log, &std::fs::read(&c_log)?)?;
        return Ok((cubin, log));
    }
    let (cubin, log) = assemble(ptxas, ptx, arch)?;
    std::fs::copy(&cubin, &c_cubin)?;
    std::fs::copy(&log, &c_log)?;
    std::fs::write(&c_ptx, &text)?;
    Ok((cubin, log))
}

fn assemble(ptxas: &Path, ptx: &Path, arch: &str) -> Result<(PathBuf, PathBuf), BuildError> {
    let cubin = ptx.with_extension("cubin");
    let log = ptx.with_extension("ptxas.txt");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(c), Some(p), Some(_)) = (mtime(&cubin), mtime(ptx), mtime(&log))
        && c >= p
    {
        return Ok((cubin, log));
    }
    // sm_90a's features need the arch-specific target spelled out (see HOPPER notes): -arch=sm_90a works for ptxas.
    let out = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .args(["-O3", "-v", "--warn-on-spills"])
        .arg(ptx)
        .arg("-o")
        .arg(&cubin)
        .output()
        .map_err(|e| BuildError::Command { command: format!("{} {}", ptxas.display(), ptx.display()), output: e.to_string() })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(BuildError::Command { command: format!("ptxas -arch={arch} {}", ptx.display()), output: text });
    }
    std::fs::write(&log, text)?;
    Ok((cubin, log))
}

/// Looks for `ptxas`: `$PTXAS`, `PATH`, `$CUDA_HOME/bin`, the PyPI package `nvidia-cuda-nvcc`.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PTXAS") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("ptxas")).find(|p| p.is_file()));
    if on_path.is_some() {
        return on_path;
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            let p = PathBuf::from(d).join("bin/ptxas");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let out = Command::new("python3")
        .args(["-c", "import site, sysconfig; print('\\n'.join([sysconfig.get_paths()['purelib'], site.getusersitepackages()] + site.getsitepackages()))"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .flat_map(|d| ["nvidia/cu13/bin/ptxas", "nvidia/cuda_nvcc/bin/ptxas"].map(|rel| Path::new(d).join(rel)))
        .find(|p| p.is_file())
}

fn copy_if_changed(src: &Path, dst: &Path) -> Result<(), BuildError> {
    let data = std::fs::read(src)?;
    write_if_changed(dst, &data)?;
    Ok(())
}

/// Writes only when the content differs, so mtimes (and the outer build's fingerprints) stay put.
fn write_if_changed(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    std::fs::write(path, data)
}

/// `ptx` with `.maxntid` / `.minnctapersm` lines after the parameter list of each `.entry` whose
/// name starts with one of the prefixes (the first match wins).
pub fn add_launch_bounds(ptx: &str, bounds: &[(String, u32, u32)]) -> String {
    let mut out = String::with_capacity(ptx.len() + 256);
    let mut pending: Option<(u32, u32)> = None;
    for line in ptx.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix(".visible .entry ").or_else(|| t.strip_prefix(".entry ")) {
            let name = rest.split('(').next().unwrap_or("").trim();
            pending = bounds.iter().find(|(p, _, _)| name.starts_with(p.as_str())).map(|&(_, n, m)| (n, m));
        }
        if let (Some((n, m)), "{") = (pending, t.trim_end()) {
            out += &format!(".maxntid {n}, 1, 1\n.minnctapersm {m}\n");
            pending = None;
        }
        out += line;
        out.push('\n');
    }
    out
}

/// Whether `arch` (`sm_XY`, optionally with a suffix) gets PTX ISA 8.0: compute capability 9.0 and up.
fn ptx80(arch: &str) -> bool {
    let digits: String = arch.trim_start_matches("sm_").chars().take_while(char::is_ascii_digit).collect();
    digits.parse::<u32>().is_ok_and(|v| v >= 90)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_bounds_go_after_the_matching_entries_parameters() {
        let ptx = ".visible .entry k_a(\n\t.param .u64 p\n)\n{\n\tret;\n}\n.visible .entry other(\n)\n{\n\tret;\n}\n";
        let out = add_launch_bounds(ptx, &[("k_".into(), 384, 1)]);
        assert_eq!(out.matches(".maxntid 384, 1, 1\n.minnctapersm 1\n{").count(), 1, "{out}");
        assert!(out.find(".maxntid").unwrap() < out.find("other").unwrap());
        assert_eq!(add_launch_bounds(ptx, &[]), ptx);
    }

    #[test]
    fn ptx80_from_compute_capability_9() {
        assert!(ptx80("sm_90") && ptx80("sm_90a") && ptx80("sm_100"));
        assert!(!ptx80("sm_80") && !ptx80("sm_89"));
    }
}
