//! Benchmarks: boot time, virtiofs throughput and metadata, store import.

/// The middle value of `samples` (the upper one of the two middles for an even count).
/// Panics on an empty list: a benchmark that measured nothing has nothing to report.
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// For benchmarks with nothing short to check: unless run by `cargo bench` (which passes
/// `--bench`), says so and exits with status 2, so that a `cargo test` that names one
/// fails rather than passing having checked nothing. (`bench = false` in Cargo.toml
/// keeps them out of `cargo test --all-targets`.)
pub fn bench_mode_only(name: &str) {
    if std::env::args().all(|a| a != "--bench") {
        eprintln!(
            "{name} is a benchmark, not a test: run it with \
             `cargo bench -p tvix-boot-benches --bench {name}`"
        );
        std::process::exit(2);
    }
}
