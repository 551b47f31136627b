//! The root of a castore file system: named nodes, looked up by name.
//!
//! A file system over the castore (virtio-fs, a host mount) needs only this beside the
//! blob and directory services: which node a name at its root stands for. For /nix/store
//! the names are store path basenames and the Nix layer answers from path info; nothing
//! here knows that.

use bytes::Bytes;

use crate::directory::Node;

/// Why the root's names could not be looked up (a backend failed, a remote store broke
/// its protocol): the message says which and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RootNodesError(pub Box<dyn std::error::Error + Send + Sync>);

/// Named nodes at the root of a file system.
pub trait RootNodes: Send + Sync {
    /// The node `name` stands for; `None` when there is none (also for a name that could
    /// never be one).
    fn get(&self, name: &[u8]) -> Result<Option<Node>, RootNodesError>;
    /// Every name and its node, for listing the root.
    fn list(&self) -> Result<Vec<(Bytes, Node)>, RootNodesError>;
}
