//! The store as a read-only file system: the guest's (or the host's) /nix/store.
//!
//! One `FileSystem` implementation (`StoreFs`) answers FUSE requests from the store; the
//! transports around it (in-process virtio-fs, vhost-user-fs, a host /dev/fuse mount) only
//! move requests and replies.

#![warn(missing_docs)]

mod blob_source;
pub mod device;
pub mod fs;
pub mod host_mount;
pub mod vhost_user;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

pub use device::{QueueService, VirtioFs};
pub use fs::{FsStore, StoreFs, StoreFsOptions};
