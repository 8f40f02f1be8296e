//! Collectives for data-parallel training: what the training loop calls to
//! average gradients, agree on initial weights and wait for each other,
//! without caring which backend carries the bytes.
//!
//! The operations ([`Collective`]): all-reduce (sum), and its two halves for
//! ZeRO-style sharded training, reduce-scatter (sum) and all-gather, over the
//! balanced contiguous shards of [`shard_range`] (rank r owns shard r);
//! broadcast; barrier.
//!
//! - [`TcpRing`]: a ring all-reduce over plain TCP for CPU workers, on one
//!   machine or across many (std threads and sockets, no async runtime).
//!   Its links are opened only between holders of the generation's
//!   [`RingSecret`]; the bytes after that handshake travel in the clear
//!   (see `connect.rs` for the threat model).
//! - [`NcclCollective`]: NCCL through cudarc for GPU workers. Its hot path
//!   works on device buffers ([`NcclCollective::all_reduce_sum_device`],
//!   [`NcclCollective::reduce_scatter_sum_device`],
//!   [`NcclCollective::all_gather_device`] and their `_raw` twins);
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

/// Every shard but the last non-empty one starts and ends at a multiple of
/// this many elements: 256 bytes of f32, aligned for the device, and where
/// cutting a buffer changes no bit of a vectorised kernel's result over it
/// (the fused AdamW update runs over shards).
pub const SHARD_ALIGN: usize = 64;

/// The elements of a buffer of `len` that rank `rank` of `world` owns in
/// [`Collective::reduce_scatter_sum`] and [`Collective::all_gather`]: `len`
/// cut into `world` contiguous shards in rank order, in whole units of
/// [`SHARD_ALIGN`] elements (the last unit may be short), the first ranks
/// one unit longer than the rest where the units do not divide evenly (so
/// some shards are empty when `len` is under `world` units). The shards
/// tile `0..len`.
///
/// # Panics
/// When `rank >= world` (so also when `world` is 0).
pub fn shard_range(len: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    assert!(
        rank < world,
        "shard_range: rank {rank} is outside a group of {world}"
    );
    let units = len.div_ceil(SHARD_ALIGN);
    let (base, extra) = (units / world, units % world);
    let start = rank * base + rank.min(extra);
    let end = start + base + usize::from(rank < extra);
    (start * SHARD_ALIGN).min(len)..(end * SHARD_ALIGN).min(len)
}

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

    /// The first half of [`Self::all_reduce_sum`], for sharded (ZeRO-style)
    /// training: afterwards `data[shard_range(data.len(), world_size(),
    /// rank())]` holds the element-wise sum over ranks of that shard, and the
    /// rest of `data` is unspecified (it may hold partial sums). Every rank
    /// passes a buffer of the same length.
    ///
    /// On the TCP ring the shard's sums are bitwise those
    /// [`Self::all_reduce_sum`] would give, so a reduce-scatter followed by an
    /// [`Self::all_gather`] equals an all-reduce bit for bit. NCCL makes no
    /// such promise across its different collectives (each is deterministic
    /// on its own).
    fn reduce_scatter_sum(&mut self, data: &mut [f32]) -> Result<()>;

    /// Every rank contributes its shard, `data[shard_range(data.len(),
    /// world_size(), rank())]`; afterwards every rank holds every rank's shard
    /// in place, bitwise (the rest of its input is overwritten). Every rank
    /// passes a buffer of the same length.
    fn all_gather(&mut self, data: &mut [f32]) -> Result<()>;

    /// Copies `data` from rank `root` to every rank (initial weights, or a
    /// checksum to verify them). Every rank passes a buffer of the same length.
    fn broadcast(&mut self, data: &mut [u8], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::{SHARD_ALIGN, shard_range};

    #[test]
    fn shards_are_contiguous_disjoint_aligned_balanced_and_cover_the_buffer() {
        for len in [0usize, 1, 2, 63, 64, 65, 200, 1000, 1_000_003] {
            for world in 1..=7 {
                let units = len.div_ceil(SHARD_ALIGN);
                let mut next = 0;
                for rank in 0..world {
                    let s = shard_range(len, world, rank);
                    // Contiguous from the previous one, so disjoint and in
                    // rank order.
                    assert_eq!(s.start, next, "len={len} world={world} rank={rank}");
                    assert!(s.start.is_multiple_of(SHARD_ALIGN) || s.start == len);
                    assert!(s.end.is_multiple_of(SHARD_ALIGN) || s.end == len);
                    // Balanced: the first units % world one unit longer.
                    let want = units / world + usize::from(rank < units % world);
                    assert_eq!(
                        s.len().div_ceil(SHARD_ALIGN),
                        want,
                        "len={len} world={world}"
                    );
                    next = s.end;
                }
                assert_eq!(next, len, "len={len} world={world}");
            }
        }
        assert_eq!(shard_range(200, 3, 0), 0..128);
        assert_eq!(shard_range(200, 3, 1), 128..192);
        assert_eq!(shard_range(200, 3, 2), 192..200);
        assert_eq!(shard_range(7, 3, 0), 0..7);
        assert_eq!(shard_range(7, 3, 2), 7..7);
    }

    #[test]
    #[should_panic(expected = "outside a group")]
    fn a_rank_outside_the_group_has_no_shard() {
        let _ = shard_range(10, 3, 3);
    }
}
