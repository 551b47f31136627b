//! tvix-boot's guest init.
//!
//! The binary (`src/main.rs`) is PID 1 in the guest; this library half holds
//! the host/guest [`protocol`] so that tvix-boot and the init share one
//! definition of the command-line keys, the argument encoding and the
//! exit-status channel.

pub mod protocol;
