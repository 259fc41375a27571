//! The fs device's shared state: the server, the queue layout, what the frontend
//! negotiated, and per-queue metrics. Owned by the daemon, read by the API, used by every
//! queue worker (atomics; nothing here is locked on the data path).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use storage_core::metrics::QueueMetrics;

use crate::passthrough::PassthroughFs;
use crate::server::Server;

/// Requests a worker starts before it submits them, reaps and notifies (as vhost-blk).
pub const SUBMIT_BATCH: usize = 16;

/// Length of the tag field in `virtio_fs_config`.
pub const TAG_LEN: usize = 36;

pub struct FsDevice {
    pub server: Server,
    /// The passthrough filesystem under any wrapper, for inode and handle counts.
    pub passthrough: Arc<PassthroughFs>,
    pub shared_dir: String,
    pub tag: Option<String>,
    pub read_only: bool,
    /// Request queues (the high-priority queue comes on top).
    pub request_queues: u16,
    pub queue_size: u16,
    pub queue_depth: u32,
    pub engine: &'static str,
    pub acked_features: AtomicU64,
    pub connected: AtomicBool,
    pub connections: AtomicU64,
    pub stopping: AtomicBool,
    pub submit_batch: usize,
    /// The longest a worker polls an idle queue before sleeping (`--poll-us`; zero: never).
    pub poll: std::time::Duration,
    queues: Vec<Arc<QueueMetrics>>,
}

impl FsDevice {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        server: Server,
        passthrough: Arc<PassthroughFs>,
        shared_dir: String,
        tag: Option<String>,
        read_only: bool,
        request_queues: u16,
        queue_size: u16,
        queue_depth: u32,
        engine: &'static str,
    ) -> Self {
        FsDevice {
            server,
            passthrough,
            shared_dir,
            tag,
            read_only,
            request_queues,
            queue_size,
            queue_depth,
            engine,
            acked_features: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            submit_batch: SUBMIT_BATCH,
            poll: std::time::Duration::ZERO,
            queues: (0..=request_queues)
                .map(|_| Arc::new(QueueMetrics::default()))
                .collect(),
        }
    }

    /// Every virtqueue: the high-priority queue (index 0) and the request queues.
    pub fn num_queues(&self) -> usize {
        usize::from(self.request_queues) + 1
    }

    pub fn queue_metrics(&self, index: usize) -> Arc<QueueMetrics> {
        self.queues[index].clone()
    }

    pub fn all_queue_metrics(&self) -> &[Arc<QueueMetrics>] {
        &self.queues
    }

    /// `virtio_fs_config`: the tag (NUL-padded) and the number of request queues.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; TAG_LEN + 4];
        if let Some(tag) = &self.tag {
            let b = tag.as_bytes();
            let n = b.len().min(TAG_LEN);
            c[..n].copy_from_slice(&b[..n]);
        }
        c[TAG_LEN..].copy_from_slice(&u32::from(self.request_queues).to_le_bytes());
        c
    }
}
