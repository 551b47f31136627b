//! tvix-boot virtiofs.
