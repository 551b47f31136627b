//! tvix-boot devices.
