//! What the fuzz targets in `fuzz/` need to drive a request queue through the device's own
//! code: the queue pass the queue workers (and the vhost-user-fs backend) make, without
//! their threads, so a run is deterministic. Not an API: only built with the `fuzzing`
//! feature.

use fuse_backend_rs::api::server::Server;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::device::serve_available_requests;
use crate::fs::StoreFs;

/// A FUSE server over a `StoreFs`, as one device holds it for all its queues.
pub struct RequestServer(Server<StoreFs>);

impl RequestServer {
    /// A server answering from `fs`.
    pub fn new(fs: StoreFs) -> Self {
        Self(Server::new(fs))
    }

    /// One pass over `queue`, as a queue worker makes it when notified: every available
    /// chain is answered. Returns how many chains went to the used ring and whether the
    /// driver asked to be interrupted.
    pub fn serve(
        &self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
    ) -> Result<(u64, bool), virtio_queue::Error> {
        serve_available_requests(queue, memory, &self.0).map(|s| (s.requests, s.notify))
    }
}
