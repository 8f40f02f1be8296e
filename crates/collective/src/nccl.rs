//! NCCL through cudarc, for GPU workers.
//!
//! cudarc loads libcuda and libnccl at run time (its `dynamic-loading`
//! feature), so this crate builds and its other backends run on machines
//! without CUDA. cudarc *panics* on first use of a missing library, so every
//! entry point here probes with [`nccl_probe`] first and CPU machines get
//! [`Error::NcclUnavailable`] instead.
//!
//! Why not cudarc's safe `nccl::Comm`: it initialises with the blocking
//! `ncclCommInitRank` and keeps the communicator handle private, so a rank
//! that never shows up, or dies mid-collective, would hang the others
//! forever. Here the communicator is non-blocking (`blocking = 0` in its
//! config) and every call is followed by a watchdog loop, like PyTorch's:
//! it polls the communicator's asynchronous error and the completion event
//! of the stream until the operation finishes, fails, or its deadline
//! passes, and then aborts the communicator, which frees kernels stuck
//! waiting on a dead peer.
//!
//! The unique id: rank 0 calls [`nccl_unique_id`] (NCCL starts its bootstrap
//! root in that process, so the process must stay alive until every rank has
//! joined); its 128 bytes travel to the other ranks in the rendezvous reply.
//!
//! Which libnccl: cudarc looks for `libnccl.so`, `libnccl.so.13`, `.12`, …,
//! `.1` (not `.so.2`) on the loader path. On the GPU machine seen so far the
//! system's `/lib/x86_64-linux-gnu/libnccl.so` (NCCL 2.28.3) is found that
//! way, while libtorch 2.11 uses PyPI's 2.28.9
//! (`site-packages/nvidia/nccl/lib/libnccl.so.2`). To run the same NCCL as
//! libtorch (and every rank the same version), start workers with a
//! directory holding a `libnccl.so` symlink to libtorch's copy first on
//! `LD_LIBRARY_PATH` ([`expose_libnccl`]); glibc then maps the one file once.
//!
//! Sharded collectives: NCCL's ReduceScatter and AllGather want equal
//! shards, while [`shard_range`]'s are uneven in general (the first
//! `len % W` one longer). So a reduce-scatter here is one group of W in-place
//! `ncclReduce`s, shard i to root i, and an all-gather one group of W
//! in-place `ncclBroadcast`s, shard i from root i; NCCL fuses each group into
//! one launch. Unlike the TCP ring, NCCL does not promise that a
//! reduce-scatter then an all-gather gives bitwise what `ncclAllReduce`
//! gives (it picks its algorithms per collective); each is deterministic on
//! its own.
//!
//! Streams: collectives run on a stream of their own that first waits for
//! the device's legacy default stream, where libtorch (and tch) queue their
//! work (an event recorded there when the call is made), and each call
//! returns only after the collective finished, so the caller can use the
//! result at once on any stream. The `enqueue_*` calls return as soon as
//! the collective is queued instead: gradient buckets reduced during
//! backward go one after another on our stream with no wait in between, and
//! [`NcclCollective::wait_queued`] waits once for the last of them (the
//! stream runs them in order), with the watchdog's deadline.

use std::ffi::{CStr, c_char, c_int};
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, CudaViewMut, DevicePtrMut, DriverError,
};
use cudarc::nccl::result::{self as nccl, NcclError, NcclStatus};
use cudarc::nccl::sys;

use crate::error::{Error, Result};
use crate::{Collective, shard_range};

/// Length of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// Deadlines of the NCCL backend.
#[derive(Debug, Clone)]
pub struct NcclOptions {
    /// How long `ncclCommInitRank` may wait for every rank to join.
    pub init_timeout: Duration,
    /// How long one collective may take before the communicator is aborted.
    /// Like the ring's `io_timeout`, it must cover the longest time one rank
    /// may arrive before the others.
    pub op_timeout: Duration,
    /// Flipped, it aborts the communicator: a blocked collective (or init)
    /// fails at once.
    pub interrupt: crate::Interrupt,
}

impl Default for NcclOptions {
    fn default() -> Self {
        Self {
            init_timeout: Duration::from_secs(300),
            op_timeout: Duration::from_secs(300),
            interrupt: crate::Interrupt::new(),
        }
    }
}

/// Whether this process can use NCCL: libcuda and libnccl load and a CUDA
/// device is visible. Never panics.
pub fn nccl_available() -> bool {
    nccl_probe().is_ok()
}

/// Like [`nccl_available`], with the reason when it is not.
pub fn nccl_probe() -> Result<()> {
    // SAFETY: both only dlopen() candidate names and close them again.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::NcclUnavailable(
            "the CUDA driver library (libcuda.so) cannot be loaded".into(),
        ));
    }
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NcclUnavailable(missing_nccl_reason()));
    }
    let devices = guarded(CudaContext::device_count)
        .map_err(Error::NcclUnavailable)?
        .map_err(|e| Error::NcclUnavailable(format!("CUDA driver: {e}")))?;
    if devices < 1 {
        return Err(Error::NcclUnavailable("no CUDA device is visible".into()));
    }
    Ok(())
}

/// cudarc 0.19 looks for libnccl.so, libnccl.so.13, .12, …, .1, but not
/// libnccl.so.2, the only name PyPI's nvidia-nccl-cu13 ships: say so when
/// that is the case, since the fix is one symlink.
fn missing_nccl_reason() -> String {
    // SAFETY: loading libnccl runs no initialisers with preconditions.
    let so2 = unsafe { libloading::Library::new("libnccl.so.2") }.is_ok();
    if so2 {
        "libnccl.so.2 is loadable, but cudarc looks only for libnccl.so, libnccl.so.13, .12, … \
         and .1: link it as libnccl.so in a directory on LD_LIBRARY_PATH (see \
         `expose_libnccl`)"
            .into()
    } else {
        "libnccl cannot be loaded (not on LD_LIBRARY_PATH or the system's library path; \
         PyPI's nvidia-nccl-cu13 ships it as site-packages/nvidia/nccl/lib/libnccl.so.2)"
            .into()
    }
}

/// Makes `dir/libnccl.so` a symlink to `libnccl` (e.g. PyPI's
/// `…/nvidia/nccl/lib/libnccl.so.2`), so that cudarc finds it once `dir` is
/// on `LD_LIBRARY_PATH`. The dynamic loader reads `LD_LIBRARY_PATH` when a
/// process starts, so a launcher calls this and sets the variable for the
/// workers it spawns. Returns the link's path.
pub fn expose_libnccl(libnccl: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let link = dir.join("libnccl.so");
    match std::fs::remove_file(&link) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::os::unix::fs::symlink(libnccl, &link)?;
    Ok(link)
}

/// The loaded NCCL's version, as "2.28.9".
pub fn nccl_version() -> Result<String> {
    nccl_probe()?;
    let code = guarded(nccl::get_nccl_version)
        .map_err(Error::NcclUnavailable)?
        .map_err(|e| Error::Nccl {
            op: "get the version",
            rank: 0,
            detail: describe(e.0, None),
        })?;
    // NCCL_VERSION(X, Y, Z) = X·10000 + Y·100 + Z since 2.9.
    Ok(format!(
        "{}.{}.{}",
        code / 10000,
        code / 100 % 100,
        code % 100
    ))
}

/// A fresh NCCL unique id for a new group; made by rank 0, whose process
/// hosts NCCL's bootstrap root until every rank has joined.
pub fn nccl_unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    nccl_probe()?;
    let id = guarded(nccl::get_uniqueid)
        .map_err(Error::NcclUnavailable)?
        .map_err(|e| Error::Nccl {
            op: "get a unique id",
            rank: 0,
            detail: describe(e.0, None),
        })?;
    Ok(id.internal.map(|c| c as u8))
}

/// One rank of an NCCL group, bound to one GPU.
pub struct NcclCollective {
    rank: usize,
    world: usize,
    comm: sys::ncclComm_t,
    options: NcclOptions,
    /// Device staging for the host-slice [`Collective`] methods, grown on demand.
    staging_f32: Option<CudaSlice<f32>>,
    staging_u8: Option<CudaSlice<u8>>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    /// Set by the first error; the communicator is aborted then.
    broken: Option<String>,
    /// The last collective queued and not yet waited for.
    queued: Option<Queued>,
}

/// A collective on our stream that the host has not waited for: its
/// completion event, and when the watchdog gives up on it.
struct Queued {
    op: &'static str,
    done: CudaEvent,
    deadline: Instant,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// on it do not overlap, which `&mut self` on every call guarantees; the CUDA
// context is bound to the calling thread before each use.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Joins the group named by `unique_id` as `rank` of `world`, on the GPU
    /// `device_ordinal`, with default deadlines.
    pub fn new(
        rank: usize,
        world: usize,
        unique_id: &[u8; UNIQUE_ID_BYTES],
        device_ordinal: usize,
    ) -> Result<Self> {
        Self::with_options(
            rank,
            world,
            unique_id,
            device_ordinal,
            NcclOptions::default(),
        )
    }

    pub fn with_options(
        rank: usize,
        world: usize,
        unique_id: &[u8; UNIQUE_ID_BYTES],
        device_ordinal: usize,
        options: NcclOptions,
    ) -> Result<Self> {
        if world == 0 || rank >= world || world > c_int::MAX as usize {
            return Err(Error::Setup(format!(
                "rank {rank} of a group of {world} cannot form an NCCL communicator"
            )));
        }
        nccl_probe()?;
        let ctx = guarded(|| CudaContext::new(device_ordinal))
            .map_err(Error::NcclUnavailable)?
            .map_err(cuda_error("open the device"))?;
        let stream = ctx.new_stream().map_err(cuda_error("create a stream"))?;
        let mut this = Self {
            rank,
            world,
            comm: std::ptr::null_mut(),
            options,
            staging_f32: None,
            staging_u8: None,
            stream,
            ctx,
            broken: None,
            queued: None,
        };
        let id = sys::ncclUniqueId {
            internal: unique_id.map(|b| b as c_char),
        };
        let mut config = nonblocking_config();
        // SAFETY: `comm` and `config` are valid for writes and reads; the id
        // is passed by value.
        let started = unsafe {
            nccl::comm_init_rank_config(
                &mut this.comm,
                world as c_int,
                id,
                rank as c_int,
                &mut config,
            )
        };
        if let Err(e) = started {
            return Err(this.fail("init", e.0));
        }
        let deadline = Instant::now() + this.options.init_timeout;
        this.wait_ready("init", deadline)?;
        tracing::debug!(rank, world, device_ordinal, "NCCL communicator ready");
        Ok(this)
    }

    pub fn device_ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The stream collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// In-place sum across ranks of a device buffer of f32 (a flat gradient
    /// bucket); returns once the result is in `buf`.
    pub fn all_reduce_sum_device<B: DevicePtrMut<f32>>(&mut self, buf: &mut B) -> Result<()> {
        let len = buf.len();
        let stream = self.stream.clone();
        let (ptr, _record) = buf.device_ptr_mut(&stream);
        // SAFETY: `ptr` addresses `len` f32 of live device memory on this
        // context, borrowed mutably until `_record` drops.
        unsafe { self.all_reduce_sum_raw(ptr, len) }
    }

    /// [`Self::all_reduce_sum_device`] on a raw device pointer, for memory
    /// cudarc does not own (a libtorch tensor's `data_ptr()`).
    ///
    /// # Safety
    /// `ptr` must address `len` contiguous f32 on this communicator's device,
    /// not used by anything else until this returns.
    pub unsafe fn all_reduce_sum_raw(&mut self, ptr: CUdeviceptr, len: usize) -> Result<()> {
        // SAFETY: as the caller promised.
        unsafe { self.enqueue_all_reduce_sum_raw(ptr, len) }?;
        self.wait_queued()
    }

    /// [`Self::all_reduce_sum_raw`] that returns once the all-reduce is
    /// queued on our stream (after what the default stream holds now);
    /// [`Self::wait_queued`] waits for it.
    ///
    /// # Safety
    /// `ptr` must address `len` contiguous f32 on this communicator's device,
    /// not used by anything else until [`Self::wait_queued`] returns.
    pub unsafe fn enqueue_all_reduce_sum_raw(
        &mut self,
        ptr: CUdeviceptr,
        len: usize,
    ) -> Result<()> {
        self.enqueue("all-reduce", |comm, stream| unsafe {
            nccl::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                len,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                comm,
                stream,
            )
        })
    }

    /// In-place reduce-scatter (sum) of a device buffer of f32: afterwards
    /// this rank's shard (`shard_range(len, world, rank)`) holds the sum over
    /// ranks, and the rest of `buf` is unspecified. Returns once it is there.
    pub fn reduce_scatter_sum_device<B: DevicePtrMut<f32>>(&mut self, buf: &mut B) -> Result<()> {
        let len = buf.len();
        let stream = self.stream.clone();
        let (ptr, _record) = buf.device_ptr_mut(&stream);
        // SAFETY: as in `all_reduce_sum_device`.
        unsafe { self.reduce_scatter_sum_raw(ptr, len) }
    }

    /// [`Self::reduce_scatter_sum_device`] on a raw device pointer.
    ///
    /// # Safety
    /// As for [`Self::all_reduce_sum_raw`].
    pub unsafe fn reduce_scatter_sum_raw(&mut self, ptr: CUdeviceptr, len: usize) -> Result<()> {
        // SAFETY: as the caller promised.
        unsafe { self.enqueue_reduce_scatter_sum_raw(ptr, len) }?;
        self.wait_queued()
    }

    /// [`Self::reduce_scatter_sum_raw`] that returns once it is queued (see
    /// [`Self::enqueue_all_reduce_sum_raw`]).
    ///
    /// # Safety
    /// As for [`Self::enqueue_all_reduce_sum_raw`].
    pub unsafe fn enqueue_reduce_scatter_sum_raw(
        &mut self,
        ptr: CUdeviceptr,
        len: usize,
    ) -> Result<()> {
        let world = self.world;
        self.enqueue("reduce-scatter", |comm, stream| {
            grouped(world, len, |root, shard| unsafe {
                let at = shard_ptr(ptr, &shard);
                nccl::reduce(
                    at as *const _,
                    at as *mut _,
                    shard.len(),
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    root as c_int,
                    comm,
                    stream,
                )
            })
        })
    }

    /// In-place all-gather of a device buffer of f32: every rank contributes
    /// its shard (`shard_range(len, world, rank)`) and ends holding every
    /// rank's, bitwise. Returns once they are there.
    pub fn all_gather_device<B: DevicePtrMut<f32>>(&mut self, buf: &mut B) -> Result<()> {
        let len = buf.len();
        let stream = self.stream.clone();
        let (ptr, _record) = buf.device_ptr_mut(&stream);
        // SAFETY: as in `all_reduce_sum_device`.
        unsafe { self.all_gather_raw(ptr, len) }
    }

    /// [`Self::all_gather_device`] on a raw device pointer.
    ///
    /// # Safety
    /// As for [`Self::all_reduce_sum_raw`].
    pub unsafe fn all_gather_raw(&mut self, ptr: CUdeviceptr, len: usize) -> Result<()> {
        let world = self.world;
        self.run("all-gather", |comm, stream| {
            grouped(world, len, |root, shard| unsafe {
                let at = shard_ptr(ptr, &shard);
                nccl::broadcast(
                    at as *const _,
                    at as *mut _,
                    shard.len(),
                    sys::ncclDataType_t::ncclFloat32,
                    root as c_int,
                    comm,
                    stream,
                )
            })
        })
    }

    /// In-place broadcast of a device byte buffer from `root`.
    pub fn broadcast_device<B: DevicePtrMut<u8>>(
        &mut self,
        buf: &mut B,
        root: usize,
    ) -> Result<()> {
        if root >= self.world {
            return Err(Error::InvalidArgument {
                op: "broadcast",
                detail: format!("root {root} is outside a group of {}", self.world),
            });
        }
        let len = buf.len();
        let stream = self.stream.clone();
        let (ptr, _record) = buf.device_ptr_mut(&stream);
        self.run("broadcast", |comm, stream| unsafe {
            nccl::broadcast(
                ptr as *const _,
                ptr as *mut _,
                len,
                sys::ncclDataType_t::ncclUint8,
                root as c_int,
                comm,
                stream,
            )
        })
    }

    /// Enqueues one NCCL call (or one group of them, see [`grouped`]) on our
    /// stream (after the default stream's work) and watches it to the end.
    fn run(
        &mut self,
        op: &'static str,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<NcclStatus, NcclError>,
    ) -> Result<()> {
        self.enqueue(op, call)?;
        self.wait_queued()
    }

    /// Enqueues one NCCL call on our stream, after what the default stream
    /// holds now, and records its completion for [`Self::wait_queued`].
    fn enqueue(
        &mut self,
        op: &'static str,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<NcclStatus, NcclError>,
    ) -> Result<()> {
        if let Some(first) = &self.broken {
            return Err(Error::Broken {
                first: first.clone(),
            });
        }
        self.ctx
            .bind_to_thread()
            .map_err(cuda_error("bind the context"))?;
        // libtorch queues on the legacy default stream; ours is non-blocking,
        // so order after it explicitly.
        self.stream
            .join(&self.ctx.default_stream())
            .map_err(cuda_error("order after the default stream"))?;
        let deadline = Instant::now() + self.options.op_timeout;
        if let Err(e) = call(self.comm, self.stream.cu_stream() as sys::cudaStream_t) {
            return Err(self.fail(op, e.0));
        }
        // A non-blocking communicator may still be enqueueing.
        self.wait_ready(op, deadline)?;
        let done = self
            .stream
            .record_event(None)
            .map_err(cuda_error("record an event"))?;
        // Our stream runs in order: the last event's completion is every
        // earlier one's.
        self.queued = Some(Queued { op, done, deadline });
        Ok(())
    }

    /// Waits until every collective queued so far has finished, watching
    /// for the communicator's errors, the interrupt and the deadline of the
    /// last one (and aborting the communicator on any of them).
    pub fn wait_queued(&mut self) -> Result<()> {
        let Some(Queued { op, done, deadline }) = self.queued.take() else {
            return Ok(());
        };
        self.ctx
            .bind_to_thread()
            .map_err(cuda_error("bind the context"))?;
        let mut pause = Duration::from_micros(20);
        loop {
            match done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    let e = Error::Cuda {
                        op,
                        detail: e.to_string(),
                    };
                    self.abort(&e);
                    return Err(e);
                }
            }
            self.check_async(op)?;
            self.check_interrupt()?;
            if Instant::now() >= deadline {
                return Err(self.timed_out(op));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Waits until the device's default stream, where libtorch queues
    /// compute, has run everything queued on it so far (not our stream):
    /// what a step waits for after that is communication.
    pub fn wait_for_compute(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(cuda_error("bind the context"))?;
        self.ctx
            .default_stream()
            .synchronize()
            .map_err(cuda_error("wait for the default stream"))
    }

    /// Polls the communicator until it leaves `ncclInProgress`.
    fn wait_ready(&mut self, op: &'static str, deadline: Instant) -> Result<()> {
        loop {
            match self.async_state() {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => {}
                other => return Err(self.fail(op, other)),
            }
            self.check_interrupt()?;
            if Instant::now() >= deadline {
                return Err(self.timed_out(op));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Aborts once the interrupt is flipped: polling it is how a call
    /// blocked on a peer learns the coordinator gave up on the group.
    fn check_interrupt(&mut self) -> Result<()> {
        match self.options.interrupt.reason() {
            None => Ok(()),
            Some(reason) => {
                let e = Error::Interrupted { reason };
                self.abort(&e);
                Err(e)
            }
        }
    }

    fn check_async(&mut self, op: &'static str) -> Result<()> {
        match self.async_state() {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
            other => Err(self.fail(op, other)),
        }
    }

    fn async_state(&self) -> sys::ncclResult_t {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is a live communicator (aborted ones are never polled:
        // `broken` stops every call first).
        let called = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
        if called == sys::ncclResult_t::ncclSuccess {
            state
        } else {
            called
        }
    }

    fn timed_out(&mut self, op: &'static str) -> Error {
        let e = Error::Nccl {
            op,
            rank: self.rank,
            detail: format!(
                "did not finish within {:?} (a peer hung or died); communicator aborted",
                match op {
                    "init" => self.options.init_timeout,
                    _ => self.options.op_timeout,
                }
            ),
        };
        self.abort(&e);
        e
    }

    fn fail(&mut self, op: &'static str, result: sys::ncclResult_t) -> Error {
        let comm = (!self.comm.is_null()).then_some(self.comm);
        let e = Error::Nccl {
            op,
            rank: self.rank,
            detail: describe(result, comm),
        };
        self.abort(&e);
        e
    }

    /// Aborts the communicator (unblocking any kernel waiting on a peer) and
    /// marks the group broken.
    fn abort(&mut self, e: &Error) {
        tracing::warn!(rank = self.rank, "NCCL collective failed: {e}");
        self.broken.get_or_insert_with(|| e.to_string());
        if !self.comm.is_null() {
            // SAFETY: `comm` is live and not used after this.
            let _ = unsafe { nccl::comm_abort(self.comm) };
            self.comm = std::ptr::null_mut();
        }
    }

    fn check_root(&self, root: usize) -> Result<()> {
        if root < self.world {
            Ok(())
        } else {
            Err(Error::InvalidArgument {
                op: "broadcast",
                detail: format!("root {root} is outside a group of {}", self.world),
            })
        }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            let _ = self.ctx.bind_to_thread();
            // Abort rather than finalize: finalizing a non-blocking
            // communicator would need its own watchdog, and nothing is in
            // flight once a call has returned.
            // SAFETY: `comm` is live and never used again.
            let _ = unsafe { nccl::comm_abort(self.comm) };
        }
    }
}

/// Host-slice collectives, staged through device memory: for the occasional
/// host-side call (initial weights, checks, barriers), not for gradients.
impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        self.staged_f32(data, |this, view| this.all_reduce_sum_device(view))
    }

    fn reduce_scatter_sum(&mut self, data: &mut [f32]) -> Result<()> {
        self.staged_f32(data, |this, view| this.reduce_scatter_sum_device(view))
    }

    fn all_gather(&mut self, data: &mut [f32]) -> Result<()> {
        self.staged_f32(data, |this, view| this.all_gather_device(view))
    }

    fn broadcast(&mut self, data: &mut [u8], root: usize) -> Result<()> {
        self.check_root(root)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut staging = self.staging(data.len(), |s| &mut s.staging_u8)?;
        let result = {
            let mut view = staging.slice_mut(..data.len());
            self.copy_in(data, &mut view)
                .and_then(|()| self.broadcast_device(&mut view, root))
                .and_then(|()| self.copy_out(&view, data))
        };
        self.staging_u8 = Some(staging);
        result
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = [1.0f32];
        self.all_reduce_sum(&mut one)
    }
}

impl NcclCollective {
    /// Runs `op` on a device copy of `data` and copies the result back.
    fn staged_f32(
        &mut self,
        data: &mut [f32],
        op: impl FnOnce(&mut Self, &mut CudaViewMut<'_, f32>) -> Result<()>,
    ) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut staging = self.staging(data.len(), |s| &mut s.staging_f32)?;
        let result = {
            let mut view = staging.slice_mut(..data.len());
            self.copy_in(data, &mut view)
                .and_then(|()| op(self, &mut view))
                .and_then(|()| self.copy_out(&view, data))
        };
        self.staging_f32 = Some(staging);
        result
    }

    /// Takes the staging buffer out of `slot`, grown to at least `len`.
    fn staging<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &mut self,
        len: usize,
        slot: impl Fn(&mut Self) -> &mut Option<CudaSlice<T>>,
    ) -> Result<CudaSlice<T>> {
        match slot(self).take() {
            Some(s) if s.len() >= len => Ok(s),
            _ => self
                .stream
                .alloc_zeros::<T>(len.next_power_of_two())
                .map_err(|e| Error::Cuda {
                    op: "allocate staging memory",
                    detail: e.to_string(),
                }),
        }
    }

    fn copy_in<T: cudarc::driver::DeviceRepr>(
        &self,
        host: &[T],
        device: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.stream
            .memcpy_htod(host, device)
            .map_err(|e| Error::Cuda {
                op: "copy to the device",
                detail: e.to_string(),
            })
    }

    fn copy_out<T: cudarc::driver::DeviceRepr>(
        &self,
        device: &impl cudarc::driver::DevicePtr<T>,
        host: &mut [T],
    ) -> Result<()> {
        self.stream
            .memcpy_dtoh(device, host)
            .and_then(|()| self.stream.synchronize())
            .map_err(|e| Error::Cuda {
                op: "copy from the device",
                detail: e.to_string(),
            })
    }
}

/// One NCCL call per non-empty shard of a buffer of `len` (`call(root,
/// shard)`, root i for shard i), between `ncclGroupStart` and `ncclGroupEnd`
/// so NCCL runs them as one operation. Every rank skips the same empty
/// shards, since the layout depends only on `len` and `world`. After a
/// failed call the group is still ended (NCCL requires it) and that first
/// error returned.
fn grouped(
    world: usize,
    len: usize,
    mut call: impl FnMut(usize, Range<usize>) -> Result<NcclStatus, NcclError>,
) -> Result<NcclStatus, NcclError> {
    nccl::group_start()?;
    let mut first = Ok(NcclStatus::Success);
    for root in 0..world {
        let shard = shard_range(len, world, root);
        if shard.is_empty() {
            continue;
        }
        if let Err(e) = call(root, shard) {
            first = Err(e);
            break;
        }
    }
    let ended = nccl::group_end();
    first.and(ended)
}

/// The device address of `shard` of a buffer of f32 at `ptr`.
/// Maps a CUDA driver error of `op` to ours.
fn cuda_error(op: &'static str) -> impl Fn(DriverError) -> Error {
    move |e: DriverError| Error::Cuda {
        op,
        detail: e.to_string(),
    }
}

fn shard_ptr(ptr: CUdeviceptr, shard: &Range<usize>) -> CUdeviceptr {
    ptr + (shard.start * std::mem::size_of::<f32>()) as CUdeviceptr
}

/// `NCCL_CONFIG_INITIALIZER` of NCCL 2.28's `nccl.h`, with `blocking = 0`.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF_INT: c_int = c_int::MIN; // NCCL_CONFIG_UNDEF_INT
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 22800, // NCCL_VERSION(2, 28, 0): the layout cudarc's bindings have
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
    }
}

/// NCCL's name for a result code and, with a communicator, its last error
/// message (which names the peer or the system call that failed).
fn describe(result: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> String {
    // SAFETY: NCCL returns static or thread-local NUL-terminated strings.
    let text = |p: *const c_char| {
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let name = text(unsafe { sys::ncclGetErrorString(result) }).unwrap_or_default();
    let last = comm
        .and_then(|c| text(unsafe { sys::ncclGetLastError(c) }))
        .filter(|s| !s.is_empty());
    match last {
        Some(last) => format!("{result:?}: {name}: {last}"),
        None => format!("{result:?}: {name}"),
    }
}

/// Runs a cudarc call that panics when a library or symbol is missing,
/// turning the panic into an error message.
fn guarded<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "cudarc panicked while loading CUDA".into())
    })
}
