//! Early GPU smoke test: a slice of the verification grid plus one timing (development aid).
fn main() {
    let device = pagedattn::Device::auto();
    println!("device: {}", device.name());
    let mut worst = std::collections::BTreeMap::new();
    let mut fails = 0;
    for c in pagedattn::testing::grid(true) {
        let t = std::time::Instant::now();
        match pagedattn::testing::check_case(&device, &c) {
            Ok(e) => {
                let ok = e.passes(pagedattn::testing::tolerance(c.dtype));
                if !ok {
                    fails += 1;
                }
                let w = worst.entry(c.dtype.name()).or_insert(0f64);
                *w = w.max(e.rel_l2);
                println!(
                    "{} {c}: rel_l2 {:.3e} max_abs {:.3e} nonfinite {} ({:?})",
                    if ok { "PASS" } else { "FAIL" },
                    e.rel_l2,
                    e.max_abs,
                    e.non_finite,
                    t.elapsed()
                );
            }
            Err(e) => {
                fails += 1;
                println!("ERROR {c}: {e}");
            }
        }
    }
    println!("worst rel_l2 per dtype: {worst:?}; failures: {fails}");
    if let pagedattn::Device::Gpu(mut g) = device {
        println!("status: {:?}", g.check_status());
    }
}
