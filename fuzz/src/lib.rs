//! What the device fuzz targets share: reading an input as a little-endian byte layout,
//! split virtqueues laid out in a small guest memory, and what may be said about a device's
//! pass over them. Each target's input layout is in its module, next to the encoder that
//! `examples/seeds.rs` writes the seed corpora with, so the two cannot drift apart.

pub mod console;
pub mod input;
pub mod mmio;
pub mod virtiofs;
pub mod virtq;
