//! Collectives for data-parallel training: what the training loop calls to
//! average gradients, agree on initial weights and wait for each other,
//! without caring which backend carries the bytes.
//!
//! - [`TcpRing`]: a ring all-reduce over plain TCP for CPU workers, on one
//!   machine or across many (std threads and sockets, no async runtime).
//!   Its links are opened only between holders of the generation's
//!   [`RingSecret`]; the bytes after that handshake travel in the clear
//!   (see `connect.rs` for the threat model).
//! - [`NcclCollective`]: NCCL through cudarc for GPU workers. Its hot path
//!   works on device buffers ([`NcclCollective::all_reduce_sum_device`]);
//!   it also implements [`Collective`] on host slices (staged through the
//!   device) for the rare host-side calls: broadcasting initial weights,
//!   verifying them, barriers.
//!
//! The trait is on host slices, not tensors, so this crate does not depend on
//! tch: the trainer copies a flat bucket of gradients (~25 MB) to a slice,
//! reduces it, and copies it back; on GPU it hands NCCL the bucket's device
//! pointer instead. Which backend a worker uses is decided once, when it
//! joins (by device, overridable in config); everything after is through
//! `dyn Collective` or the NCCL device methods.
//!
//! Failure model: a collective either completes on every rank or returns an
//! error naming the peer or operation at fault, within the configured
//! timeout; it never hangs. An [`Interrupt`] ends a blocked call sooner,
//! when the coordinator has decided already that the group is over. After an error the group is broken and every
//! later call fails fast: the coordinator re-forms the group (new session,
//! new links) and training resumes from the last checkpoint.

mod auth;
mod connect;
mod error;
mod interrupt;
pub mod nccl;
mod ring;
mod sender;
pub mod wire;

pub use auth::RingSecret;
pub use error::{Error, Peer, Result};
pub use interrupt::Interrupt;
pub use nccl::{
    NcclCollective, NcclOptions, nccl_available, nccl_probe, nccl_unique_id, nccl_version,
};
pub use ring::{RingConfig, TcpRing};

/// The operations data-parallel training needs from a group of W ranks.
///
/// Every rank must call the same collectives in the same order with the same
/// lengths (and roots); the TCP ring checks this and fails with
/// [`Error::Mismatch`] when they differ.
pub trait Collective: Send {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// Replaces `data` on every rank by the element-wise sum over ranks.
    /// Callers divide by `world_size()` for the mean (so gradient averaging
    /// and global-norm bookkeeping stay in the trainer). Every rank ends with
    /// bitwise the same values.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()>;

    /// Copies `data` from rank `root` to every rank (initial weights, or a
    /// checksum to verify them). Every rank passes a buffer of the same length.
    fn broadcast(&mut self, data: &mut [u8], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
}
