//! Benchmarks: boot time, virtiofs throughput and metadata, store import.
