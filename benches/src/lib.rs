//! Benchmarks: boot time, virtiofs throughput and metadata, store import.

/// The middle value of `samples` (the upper one of the two middles for an even count).
/// Panics on an empty list: a benchmark that measured nothing has nothing to report.
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}
