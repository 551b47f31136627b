//! Protobuf messages, wire-compatible with tvix's castore.proto and pathinfo.proto.
//!
//! Declared with prost's derive instead of generated from .proto files so the build needs
//! no protoc; field numbers and types follow the tvix definitions exactly.

#[derive(Clone, PartialEq, prost::Message)]
pub struct Directory {
    #[prost(message, repeated, tag = "1")]
    pub directories: Vec<DirectoryNode>,
    #[prost(message, repeated, tag = "2")]
    pub files: Vec<FileNode>,
    #[prost(message, repeated, tag = "3")]
    pub symlinks: Vec<SymlinkNode>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DirectoryNode {
    #[prost(bytes = "bytes", tag = "1")]
    pub name: bytes::Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub digest: bytes::Bytes,
    #[prost(uint64, tag = "3")]
    pub size: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FileNode {
    #[prost(bytes = "bytes", tag = "1")]
    pub name: bytes::Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub digest: bytes::Bytes,
    #[prost(uint64, tag = "3")]
    pub size: u64,
    #[prost(bool, tag = "4")]
    pub executable: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SymlinkNode {
    #[prost(bytes = "bytes", tag = "1")]
    pub name: bytes::Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub target: bytes::Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Node {
    #[prost(oneof = "node::Node", tags = "1, 2, 3")]
    pub node: Option<node::Node>,
}

pub mod node {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Node {
        #[prost(message, tag = "1")]
        Directory(super::DirectoryNode),
        #[prost(message, tag = "2")]
        File(super::FileNode),
        #[prost(message, tag = "3")]
        Symlink(super::SymlinkNode),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PathInfo {
    #[prost(message, optional, tag = "1")]
    pub node: Option<Node>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub references: Vec<bytes::Bytes>,
    #[prost(message, optional, tag = "3")]
    pub narinfo: Option<NarInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StorePath {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub digest: bytes::Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NarInfo {
    #[prost(uint64, tag = "1")]
    pub nar_size: u64,
    #[prost(bytes = "bytes", tag = "2")]
    pub nar_sha256: bytes::Bytes,
    #[prost(message, repeated, tag = "3")]
    pub signatures: Vec<nar_info::Signature>,
    #[prost(string, repeated, tag = "4")]
    pub reference_names: Vec<String>,
    #[prost(message, optional, tag = "5")]
    pub deriver: Option<StorePath>,
    #[prost(message, optional, tag = "6")]
    pub ca: Option<nar_info::Ca>,
}

pub mod nar_info {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Signature {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(bytes = "bytes", tag = "2")]
        pub data: bytes::Bytes,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Ca {
        #[prost(enumeration = "ca::Hash", tag = "1")]
        pub r#type: i32,
        #[prost(bytes = "bytes", tag = "2")]
        pub digest: bytes::Bytes,
    }

    pub mod ca {
        /// What a content address hashes, and with which algorithm (pathinfo.proto's
        /// `NarInfo.CA.Hash`); the text form is Nix's `CA:` prefix.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
        #[repr(i32)]
        pub enum Hash {
            /// `fixed:r:sha256`: the NAR of the path.
            NarSha256 = 0,
            /// `fixed:r:sha1`: the NAR of the path.
            NarSha1 = 1,
            /// `fixed:r:sha512`: the NAR of the path.
            NarSha512 = 2,
            /// `fixed:r:md5`: the NAR of the path.
            NarMd5 = 3,
            /// `text:sha256`: a text file, such as a derivation.
            TextSha256 = 4,
            /// `fixed:sha1`: the contents of a single file.
            FlatSha1 = 5,
            /// `fixed:md5`: the contents of a single file.
            FlatMd5 = 6,
            /// `fixed:sha256`: the contents of a single file.
            FlatSha256 = 7,
            /// `fixed:sha512`: the contents of a single file.
            FlatSha512 = 8,
        }
    }
}
