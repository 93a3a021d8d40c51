//! The kernel images embedded at build time (`host/build.rs` → `ptx-builder`): per family and arch,
//! PTX and (where `ptxas` was available) a cubin, deflate-compressed.

use cudarc::nvrtc::Ptx;
use pagedattn_layout::KernelFamily;

use crate::error::{Error, Result};

/// One compiled (family, arch).
pub struct KernelImage {
    /// The family's name ([`KernelFamily::name`]), e.g. `"paged_attention"`.
    pub family: &'static str,
    /// `sm_XY`, or `sm_XYa` for an arch-specific image.
    pub arch: &'static str,
    /// The PTX text, deflate-compressed.
    pub ptx_deflate: &'static [u8],
    /// The cubin `ptxas` built from it, deflate-compressed; `None` where the build had no `ptxas`.
    pub cubin_deflate: Option<&'static [u8]>,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The kernel build's report (time, sizes), as printed by `pagedattn info`.
pub const BUILD_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/kernel-build-report.txt"));

/// Every embedded image.
pub fn images() -> &'static [KernelImage] {
    KERNEL_IMAGES
}

/// `sm_XY[a]` → (X, Y).
pub fn parse_arch(arch: &str) -> Option<(i32, i32)> {
    let digits = arch.strip_prefix("sm_")?.trim_end_matches('a');
    let n: i32 = digits.parse().ok()?;
    Some((n / 10, n % 10))
}

/// How a device loads a family's image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// Machine code built for the device's arch (or a lower minor of the same major).
    Cubin,
    /// PTX text, JIT-compiled by the driver at load time.
    Ptx,
}

impl ImageKind {
    /// A short description for logs and `pagedattn info`: `"cubin"` or `"PTX, JIT-compiled by the driver"`.
    pub const fn describe(self) -> &'static str {
        match self {
            ImageKind::Cubin => "cubin",
            ImageKind::Ptx => "PTX, JIT-compiled by the driver",
        }
    }
}

/// The image a device of compute capability `cc` loads for `family`, without inflating it: a cubin of
/// the same major version and the highest minor not above the device's (arch-specific `a` cubins only
/// on their exact arch), else the PTX of the highest arch not above the device.
pub fn choose_image(family: KernelFamily, cc: (i32, i32)) -> Result<(&'static KernelImage, ImageKind)> {
    let of_family = || KERNEL_IMAGES.iter().filter(move |i| i.family == family.name());
    let cubin = of_family()
        .filter_map(|i| Some((i, parse_arch(i.arch)?, i.cubin_deflate?)))
        .filter(|(i, a, _)| a.0 == cc.0 && a.1 <= cc.1 && (!i.arch.ends_with('a') || *a == cc))
        .max_by_key(|(_, a, _)| *a);
    if let Some((i, _, _)) = cubin {
        return Ok((i, ImageKind::Cubin));
    }
    let ptx = of_family()
        .filter_map(|i| Some((i, parse_arch(i.arch)?)))
        .filter(|(i, a)| *a <= cc && !i.arch.ends_with('a'))
        .max_by_key(|(_, a)| *a);
    match ptx {
        Some((i, _)) => Ok((i, ImageKind::Ptx)),
        None => Err(Error::NoImage {
            family: family.name(),
            major: cc.0,
            minor: cc.1,
            available: of_family().map(|i| i.arch).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// The image to load on a device of compute capability `cc` (see [`choose_image`]), inflated, with
/// a description of its kind.
///
/// `PAGEDATTN_KERNEL_DIR=DIR` (experiments): `DIR/<family>.sm_<major><minor>.cubin`, when it exists,
/// replaces the embedded image, e.g. to compare ptxas options on a GPU machine without a rebuild.
pub fn select_image(family: KernelFamily, cc: (i32, i32)) -> Result<(Ptx, &'static str)> {
    if let Some(dir) = std::env::var_os("PAGEDATTN_KERNEL_DIR") {
        let path = std::path::Path::new(&dir).join(format!("{}.sm_{}{}.cubin", family.name(), cc.0, cc.1));
        if path.is_file() {
            log::warn!("{}: loading {} (PAGEDATTN_KERNEL_DIR)", family.name(), path.display());
            return Ok((Ptx::from_binary(std::fs::read(&path)?), "cubin from PAGEDATTN_KERNEL_DIR"));
        }
    }
    let (image, kind) = choose_image(family, cc)?;
    match (kind, image.cubin_deflate) {
        (ImageKind::Cubin, Some(data)) => Ok((Ptx::from_binary(inflate(data)?), kind.describe())),
        _ => {
            let text = String::from_utf8(inflate(image.ptx_deflate)?).map_err(|e| Error::Io(std::io::Error::other(e)))?;
            Ok((Ptx::from_src(text), ImageKind::Ptx.describe()))
        }
    }
}

fn inflate(data: &[u8]) -> Result<Vec<u8>> {
    miniz_oxide::inflate::decompress_to_vec(data)
        .map_err(|e| Error::Io(std::io::Error::other(format!("corrupt embedded kernel image: {e:?}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_and_arch_is_embedded() {
        // Every arch unless the build asked for fewer (`PAGEDATTN_ARCHS`); a family with archs of
        // its own (sm_90a) has them where their base arch was built.
        let known = |a: &&str| pagedattn_layout::ARCHS.contains(a) || pagedattn_layout::SPECIFIC_ARCHS.contains(a);
        assert!(!BUILT_ARCHS.is_empty() && BUILT_ARCHS.iter().all(known));
        let base_built = |a: &str| BUILT_ARCHS.contains(&a.trim_end_matches('a'));
        if env!("PAGEDATTN_ARCHS_SUBSET") == "0" {
            assert!(pagedattn_layout::ARCHS.iter().all(|a| BUILT_ARCHS.contains(a)));
        }
        for f in KernelFamily::ALL {
            for arch in f.archs().iter().filter(|a| base_built(a)) {
                let img = KERNEL_IMAGES.iter().find(|i| i.family == f.name() && i.arch == *arch);
                let img = img.unwrap_or_else(|| panic!("{} {arch} missing", f.name()));
                let ptx = inflate(img.ptx_deflate).unwrap();
                let text = std::str::from_utf8(&ptx).unwrap();
                assert!(text.contains(&format!(".target {arch}")), "{} {arch}", f.name());
            }
        }
    }

    /// The names of the `.entry` directives of a PTX module.
    fn ptx_entries(text: &str) -> std::collections::BTreeSet<&str> {
        text.lines()
            .filter_map(|l| l.split_once(".entry ").map(|(_, rest)| rest))
            .map(|rest| rest.split(|c: char| c == '(' || c.is_whitespace()).next().unwrap_or(rest))
            .collect()
    }

    /// `dispatch::kernel_variants` (what `pagedattn info` lists) is exactly the set of entry points
    /// of every embedded image.
    #[test]
    fn variant_list_matches_the_embedded_entry_points() {
        for img in KERNEL_IMAGES {
            let ptx = inflate(img.ptx_deflate).unwrap();
            let got = ptx_entries(std::str::from_utf8(&ptx).unwrap());
            let want: std::collections::BTreeSet<&str> =
                crate::dispatch::kernel_variants().iter().filter(|v| v.family.name() == img.family).map(|v| v.symbol).collect();
            assert_eq!(got, want, "{} {}", img.family, img.arch);
        }
    }

    #[test]
    fn arch_selection() {
        assert_eq!(parse_arch("sm_90a"), Some((9, 0)));
        assert_eq!(parse_arch("sm_80"), Some((8, 0)));
        // A device newer than every arch still gets PTX.
        assert!(select_image(KernelFamily::Util, (12, 0)).is_ok());
        // Older than every arch: a clear error.
        assert!(matches!(select_image(KernelFamily::Util, (7, 5)), Err(Error::NoImage { .. })));
    }
}
