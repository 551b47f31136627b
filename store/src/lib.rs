//! tvix-boot store.
