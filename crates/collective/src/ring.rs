//! The TCP ring: the CPU backend of [`Collective`].
//!
//! All-reduce is the bandwidth-optimal ring (Patarasuk & Yuan 2009, as in
//! Horovod and NCCL): the data is cut into W segments (the shards of
//! [`shard_range`]); W−1 reduce-scatter steps pass a segment to the
//! successor, which adds its own, until rank r holds the full sum of segment
//! r; W−1 all-gather steps then pass the finished segments around. Each rank
//! sends and receives 2·(W−1)/W of the data, whatever W is.
//!
//! The two phases are also the collectives of sharded training on their own:
//! [`Collective::reduce_scatter_sum`] is the first, [`Collective::all_gather`]
//! the second, and the all-reduce is literally one then the other, with the
//! same code; so a reduce-scatter followed by an all-gather gives bitwise
//! the all-reduce's result.
//!
//! Each step is cut into chunks (`chunk_bytes`) and a sender thread writes
//! while this thread reads, so send and receive overlap and the ring cannot
//! deadlock (see `sender.rs`). A chunk is sent once it is final for that
//! step: the sum a rank sends on step t+1 is the one it received and added on
//! step t, read back from the caller's buffer.
//!
//! Sums are deterministic: each segment is added up in a fixed order (segment
//! i from rank i+1 around the ring to rank i), and the all-gather copies the
//! finished bytes,
//! so every rank ends with bitwise the same result, run after run. The order
//! differs between segments, so the result may differ from a serial sum in
//! the last bits.
//!
//! Every read and write has a deadline (`io_timeout`). After any error this
//! rank closes both links, so its neighbours fail at once instead of waiting
//! out their own timeouts, and the whole ring learns within milliseconds that
//! the group is broken.

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::time::Duration;

use crate::connect::{self, Place};
use crate::error::{Error, Peer, Result};
use crate::sender::Sender;
use crate::wire::{HEADER_LEN, Op, OpHeader};
use crate::{Collective, Interrupt, RingSecret, shard_range};

/// How a ring forms and moves bytes. Every rank of a group must use the same
/// `session` and `secret`; the rest may differ per rank.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Names the job and the group's generation: links from any other
    /// session are refused. The coordinator hands it out with the addresses.
    /// It is not a secret (anyone with a checkpoint can work it out): it
    /// tells honest ranks of different generations apart, nothing more.
    pub session: u64,
    /// What every member of this generation, and nobody else, holds: each
    /// link's handshake proves both ends know it (see `connect.rs`). The
    /// coordinator draws a fresh [`RingSecret::random`] per generation and
    /// hands it to each member over its authenticated channel. A ring of two
    /// or more ranks refuses to form without one (empty, or shorter than
    /// [`RingSecret::MIN_LEN`]); the default is empty.
    pub secret: RingSecret,
    /// How long to keep trying to form the ring (peers start at different
    /// times).
    pub connect_timeout: Duration,
    /// The longest one handshake may take, on either side: a caller that
    /// has not proved itself by then is cut off, and a connect attempt that
    /// got no answer by then is retried.
    pub handshake_timeout: Duration,
    /// The longest a read or write may wait without moving a byte. It bounds
    /// how long a hung peer goes unnoticed, and must exceed the longest time
    /// one rank may arrive at a collective before the others (e.g. a slower
    /// backward pass), since the early rank waits in a read.
    pub io_timeout: Duration,
    /// Size of the pieces a step is cut into, so sending overlaps receiving.
    pub chunk_bytes: usize,
    /// Chunks queued to the sender thread at most (memory per rank is about
    /// `(max_in_flight + 1) · chunk_bytes`).
    pub max_in_flight: usize,
    /// Flipped, it closes the links: a blocked collective fails at once.
    pub interrupt: Interrupt,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            session: 0,
            secret: RingSecret::default(),
            connect_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(300),
            chunk_bytes: 1 << 20,
            max_in_flight: 4,
            interrupt: Interrupt::new(),
        }
    }
}

/// One rank of a TCP ring. Dropping it closes the links.
pub struct TcpRing {
    rank: usize,
    world: usize,
    next: Option<Peer>,
    prev: Option<Peer>,
    io_timeout: Duration,
    chunk_bytes: usize,
    links: Option<Links>,
    /// Collectives carried so far, checked against the predecessor's count.
    seq: u64,
    /// Set by the first error; every later call fails with it.
    broken: Option<String>,
    interrupt: Interrupt,
}

struct Links {
    prev: TcpStream,
    /// A second handle on the successor link, kept to shut it down on error.
    next: TcpStream,
    sender: Sender,
    /// Staging for received f32 chunks before they are added.
    recv_buf: Vec<u8>,
}

/// What a received chunk does to the caller's buffer.
#[derive(Clone, Copy)]
enum Mode {
    Add,
    Copy,
}

impl TcpRing {
    /// Joins the ring of `peers.len()` ranks as `rank`: connects to
    /// `peers[rank + 1]`, accepts `peers[rank - 1]` on `listener` (already
    /// bound, so tests and the coordinator can bind port 0 first and hand
    /// out the real address), and returns when both links are open.
    ///
    /// `peers[i]` is the address rank i listens on; it must be reachable from
    /// rank i − 1. With one rank nothing is opened and every collective is a
    /// no-op.
    pub fn connect(
        rank: usize,
        peers: Vec<SocketAddr>,
        listener: TcpListener,
        config: RingConfig,
    ) -> Result<Self> {
        let world = peers.len();
        if world == 0 {
            return Err(Error::Setup("no peer addresses".into()));
        }
        if rank >= world {
            return Err(Error::Setup(format!(
                "rank {rank} is outside a group of {world}"
            )));
        }
        if world > u32::MAX as usize {
            return Err(Error::Setup(format!(
                "{world} ranks do not fit the wire format"
            )));
        }
        // One rank opens no link, so it has nothing to authenticate.
        if world > 1 && config.secret.len() < RingSecret::MIN_LEN {
            return Err(Error::Setup(format!(
                "the ring secret is {} bytes, at least {} are needed: without it anyone who \
                 can reach this rank's port could join the ring (the coordinator hands every \
                 member the generation's secret)",
                config.secret.len(),
                RingSecret::MIN_LEN
            )));
        }
        if config.handshake_timeout.is_zero() {
            return Err(Error::Setup("handshake_timeout is zero".into()));
        }
        // Whole f32s per chunk, at least one.
        let chunk_bytes = (config.chunk_bytes / 4).max(1) * 4;
        let mut ring = Self {
            rank,
            world,
            next: None,
            prev: None,
            io_timeout: config.io_timeout,
            chunk_bytes,
            links: None,
            seq: 0,
            broken: None,
            interrupt: config.interrupt.clone(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let peer = |r: usize| Peer {
            rank: r,
            addr: peers[r],
        };
        let place = Place {
            rank,
            world,
            next: peer((rank + 1) % world),
            prev: peer((rank + world - 1) % world),
        };
        let links = connect::form(&place, listener, &config)?;
        let io = |op, peer, source| Error::Io { op, peer, source };
        for (stream, peer) in [(&links.next, place.next), (&links.prev, place.prev)] {
            stream
                .set_nodelay(true)
                .and_then(|()| stream.set_read_timeout(Some(config.io_timeout)))
                .and_then(|()| stream.set_write_timeout(Some(config.io_timeout)))
                .map_err(|e| io("configure the link", peer, e))?;
        }
        let writer = links
            .next
            .try_clone()
            .map_err(|e| io("configure the link", place.next, e))?;
        let closers = [&links.prev, &links.next].map(|s| s.try_clone());
        if let [Ok(prev), Ok(next)] = closers {
            config.interrupt.on_trigger(move || {
                let _ = prev.shutdown(Shutdown::Both);
                let _ = next.shutdown(Shutdown::Both);
            });
        }
        let sender = Sender::spawn(
            writer,
            place.next,
            config.io_timeout,
            chunk_bytes,
            config.max_in_flight,
        )?;
        ring.next = Some(place.next);
        ring.prev = Some(place.prev);
        ring.links = Some(Links {
            prev: links.prev,
            next: links.next,
            sender,
            recv_buf: Vec::with_capacity(chunk_bytes),
        });
        tracing::debug!(rank, world, next = %place.next, prev = %place.prev, "ring formed");
        Ok(ring)
    }

    /// Runs one collective: checks the group is whole, exchanges headers,
    /// runs `body`, and on any error breaks the group.
    fn collective(
        &mut self,
        op: Op,
        root: usize,
        len: usize,
        body: impl FnOnce(&mut Links, &Step) -> Result<()>,
    ) -> Result<()> {
        if let Some(first) = &self.broken {
            return Err(Error::Broken {
                first: first.clone(),
            });
        }
        let Some(links) = self.links.as_mut() else {
            return Ok(()); // one rank: nothing to exchange
        };
        let step = Step {
            rank: self.rank,
            world: self.world,
            prev: self.prev.expect("links imply peers"),
            next: self.next.expect("links imply peers"),
            timeout: self.io_timeout,
            chunk_bytes: self.chunk_bytes,
            op,
        };
        if let Some(reason) = self.interrupt.reason() {
            let e = Error::Interrupted { reason };
            self.break_group(&e);
            return Err(e);
        }
        let header = OpHeader {
            op,
            root: root as u32,
            seq: self.seq,
            len: len as u64,
        };
        self.seq += 1;
        let result = step
            .exchange_header(links, header)
            .and_then(|()| body(links, &step))
            .and_then(|()| links.sender.flush());
        // An interrupt closed the links: that, not the closed link, is
        // what happened.
        let result = result.map_err(|e| match self.interrupt.reason() {
            Some(reason) => Error::Interrupted { reason },
            None => e,
        });
        if let Err(e) = &result {
            self.break_group(e);
        }
        result
    }

    /// Remembers the first error and closes both links so the neighbours
    /// fail now rather than after their timeouts.
    fn break_group(&mut self, e: &Error) {
        tracing::warn!(rank = self.rank, "ring collective failed: {e}");
        self.broken = Some(e.to_string());
        if let Some(links) = &self.links {
            let _ = links.prev.shutdown(Shutdown::Both);
            let _ = links.next.shutdown(Shutdown::Both);
        }
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<()> {
        if root < self.world {
            Ok(())
        } else {
            Err(Error::InvalidArgument {
                op,
                detail: format!("root {root} is outside a group of {}", self.world),
            })
        }
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        self.collective(Op::AllReduceSumF32, 0, data.len(), |links, step| {
            step.all_reduce(links, data)
        })
    }

    fn reduce_scatter_sum(&mut self, data: &mut [f32]) -> Result<()> {
        self.collective(Op::ReduceScatterSumF32, 0, data.len(), |links, step| {
            step.reduce_scatter(links, data)
        })
    }

    fn all_gather(&mut self, data: &mut [f32]) -> Result<()> {
        self.collective(Op::AllGatherF32, 0, data.len(), |links, step| {
            step.all_gather(links, data)
        })
    }

    fn broadcast(&mut self, data: &mut [u8], root: usize) -> Result<()> {
        self.check_root("broadcast", root)?;
        self.collective(Op::Broadcast, root, data.len(), |links, step| {
            step.broadcast(links, data, root)
        })
    }

    /// An all-reduce of one value per rank: no rank can finish it before
    /// every rank has contributed, which is what a barrier needs.
    fn barrier(&mut self) -> Result<()> {
        let world = self.world;
        self.collective(Op::Barrier, 0, world, |links, step| {
            let mut ones = vec![1.0f32; world];
            step.all_reduce(links, &mut ones)?;
            if ones.iter().all(|&v| v == world as f32) {
                Ok(())
            } else {
                Err(Error::Mismatch {
                    peer: step.prev,
                    detail: format!("barrier counted {ones:?} arrivals, not {world} each"),
                })
            }
        })
    }
}

/// What one collective needs to know about the ring.
struct Step {
    rank: usize,
    world: usize,
    prev: Peer,
    next: Peer,
    timeout: Duration,
    chunk_bytes: usize,
    op: Op,
}

impl Step {
    fn op_name(&self) -> &'static str {
        match self.op {
            Op::AllReduceSumF32 => "all-reduce",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::ReduceScatterSumF32 => "reduce-scatter",
            Op::AllGatherF32 => "all-gather",
        }
    }

    fn read(&self, links: &mut Links, buf: &mut [u8]) -> Result<()> {
        links
            .prev
            .read_exact(buf)
            .map_err(|e| Error::link(self.op_name(), self.prev, self.timeout, e))
    }

    fn exchange_header(&self, links: &mut Links, ours: OpHeader) -> Result<()> {
        let mut buf = links.sender.buffer()?;
        buf.extend_from_slice(&ours.encode());
        links.sender.send(buf)?;
        let mut theirs = [0u8; HEADER_LEN];
        self.read(links, &mut theirs)?;
        match OpHeader::decode(&theirs) {
            Some(theirs) if theirs == ours => Ok(()),
            Some(theirs) => Err(Error::Mismatch {
                peer: self.prev,
                detail: format!("it started {theirs:?} while this rank started {ours:?}"),
            }),
            None => Err(Error::Mismatch {
                peer: self.prev,
                detail: format!("unreadable collective header {theirs:?}"),
            }),
        }
    }

    /// Reduce-scatter then all-gather; see the module doc.
    fn all_reduce(&self, links: &mut Links, data: &mut [f32]) -> Result<()> {
        self.reduce_scatter(links, data)?;
        self.all_gather(links, data)
    }

    /// W−1 steps: on step t rank r sends its running sum of segment r−1−t
    /// (its own values on step 0, else what it received and added on step
    /// t−1) and adds what it receives to segment r−2−t; the last step
    /// completes segment r.
    fn reduce_scatter(&self, links: &mut Links, data: &mut [f32]) -> Result<()> {
        let (w, r, n) = (self.world, self.rank, data.len());
        let steps = (0..w - 1).map(|t| {
            (
                shard_range(n, w, (r + 2 * w - t - 1) % w),
                shard_range(n, w, (r + 2 * w - t - 2) % w),
            )
        });
        self.pass(links, data, steps, Mode::Add)
    }

    /// W−1 steps: on step s rank r sends segment r−s (its own on step 0,
    /// else the one it received on step s−1) and copies in segment r−1−s.
    fn all_gather(&self, links: &mut Links, data: &mut [f32]) -> Result<()> {
        let (w, r, n) = (self.world, self.rank, data.len());
        let steps = (0..w - 1).map(|s| {
            (
                shard_range(n, w, (r + w - s) % w),
                shard_range(n, w, (r + 2 * w - s - 1) % w),
            )
        });
        self.pass(links, data, steps, Mode::Copy)
    }

    /// Runs ring steps, each sending one range of `data` to the successor
    /// while receiving another from the predecessor, applied with `mode`.
    fn pass(
        &self,
        links: &mut Links,
        data: &mut [f32],
        steps: impl Iterator<Item = (Range<usize>, Range<usize>)>,
        mode: Mode,
    ) -> Result<()> {
        let chunk = self.chunk_bytes / 4;
        for (send, recv) in steps {
            let (ps, pr) = (send.len().div_ceil(chunk), recv.len().div_ceil(chunk));
            // Queue a chunk, then take one in: every rank follows the same
            // order, which is what keeps the ring free of deadlock.
            for k in 0..ps.max(pr) {
                if k < ps {
                    let mut buf = links.sender.buffer()?;
                    encode_f32(&data[piece(&send, k, chunk)], &mut buf);
                    links.sender.send(buf)?;
                }
                if k < pr {
                    let target = &mut data[piece(&recv, k, chunk)];
                    let mut staging = std::mem::take(&mut links.recv_buf);
                    staging.resize(target.len() * 4, 0);
                    let read = self.read(links, &mut staging);
                    if read.is_ok() {
                        decode_f32(&staging, target, mode);
                    }
                    links.recv_buf = staging;
                    read?;
                }
            }
        }
        Ok(())
    }

    /// Root sends, everyone else receives from its predecessor and forwards
    /// to its successor, chunk by chunk, stopping before the root.
    fn broadcast(&self, links: &mut Links, data: &mut [u8], root: usize) -> Result<()> {
        let receives = self.rank != root;
        let forwards = self.next.rank != root;
        let all = 0..data.len();
        for k in 0..data.len().div_ceil(self.chunk_bytes) {
            let p = piece(&all, k, self.chunk_bytes);
            if receives {
                self.read(links, &mut data[p.clone()])?;
            }
            if forwards {
                let mut buf = links.sender.buffer()?;
                buf.extend_from_slice(&data[p]);
                links.sender.send(buf)?;
            }
        }
        Ok(())
    }
}

/// Piece `k` of `range` cut into `chunk`-element pieces.
fn piece(range: &Range<usize>, k: usize, chunk: usize) -> Range<usize> {
    let start = range.start + k * chunk;
    start..(start + chunk).min(range.end)
}

fn encode_f32(values: &[f32], buf: &mut Vec<u8>) {
    buf.resize(values.len() * 4, 0);
    for (bytes, v) in buf.chunks_exact_mut(4).zip(values) {
        bytes.copy_from_slice(&v.to_le_bytes());
    }
}

fn decode_f32(bytes: &[u8], into: &mut [f32], mode: Mode) {
    let values = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    match mode {
        Mode::Add => into.iter_mut().zip(values).for_each(|(d, v)| *d += v),
        Mode::Copy => into.iter_mut().zip(values).for_each(|(d, v)| *d = v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_tile_a_segment() {
        let seg = 10..35;
        let pieces: Vec<_> = (0..seg.len().div_ceil(8))
            .map(|k| piece(&seg, k, 8))
            .collect();
        assert_eq!(pieces, vec![10..18, 18..26, 26..34, 34..35]);
    }

    #[test]
    fn f32_bytes_round_trip_and_add() {
        let values = [1.5f32, -0.0, f32::MAX, 3.25e-38];
        let mut buf = Vec::new();
        encode_f32(&values, &mut buf);
        let mut back = [0f32; 4];
        decode_f32(&buf, &mut back, Mode::Copy);
        assert_eq!(back.map(f32::to_bits), values.map(f32::to_bits));
        decode_f32(&buf, &mut back, Mode::Add);
        assert_eq!(back[0], 3.0);
    }
}
