//! tvix-boot vmm.
