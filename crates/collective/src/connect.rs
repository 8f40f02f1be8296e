//! Forming the ring: rank r opens a link to rank r+1 and accepts one from
//! rank r-1 (mod W), both at once, until a deadline. Each link starts with a
//! handshake ([`crate::wire`]) so that a stray connection, a worker of another
//! job or of an earlier group, or a peer speaking another protocol version is
//! refused rather than summed into gradients.
//!
//! Refusals are final for the connector (retrying cannot fix a wrong session);
//! a refused stranger does not stop the acceptor, which keeps waiting for its
//! real predecessor until the deadline.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Peer, Result};
use crate::ring::RingConfig;
use crate::wire::{ANSWER_LEN, Answer, HELLO_LEN, Hello, PROTOCOL_VERSION, Verdict};

/// The two open links of one rank.
pub(crate) struct Links {
    /// To rank r+1: this rank only writes here.
    pub next: TcpStream,
    /// From rank r-1: this rank only reads here.
    pub prev: TcpStream,
}

/// Where this rank sits in the ring.
pub(crate) struct Place {
    pub rank: usize,
    pub world: usize,
    pub next: Peer,
    pub prev: Peer,
}

/// Connects to the successor and accepts the predecessor concurrently; the
/// first side to fail makes the other give up, so a doomed setup returns
/// its real cause at once instead of waiting out the deadline.
pub(crate) fn form(place: &Place, listener: TcpListener, cfg: &RingConfig) -> Result<Links> {
    let deadline = Instant::now() + cfg.connect_timeout;
    let give_up = AtomicBool::new(false);
    thread::scope(|s| {
        let connector = s.spawn(|| {
            let r = connect_next(place, cfg, deadline, &give_up);
            if r.is_err() {
                give_up.store(true, Ordering::Relaxed);
            }
            r
        });
        let accepted = accept_prev(place, &listener, cfg, deadline, &give_up);
        if accepted.is_err() {
            give_up.store(true, Ordering::Relaxed);
        }
        let connected = match connector.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        match (connected, accepted) {
            (Ok(Some(next)), Ok(Some(prev))) => Ok(Links { next, prev }),
            (Err(e), _) | (_, Err(e)) => Err(e),
            // Giving up happens only after the other side failed.
            _ => unreachable!("a side gave up although neither failed"),
        }
    })
}

/// Why one connection attempt did not produce a link.
enum Attempt {
    /// The peer said no; retrying cannot help.
    Refused(Error),
    /// The peer was not there yet, or the connection broke: try again.
    Transient(std::io::Error),
}

fn connect_next(
    place: &Place,
    cfg: &RingConfig,
    deadline: Instant,
    give_up: &AtomicBool,
) -> Result<Option<TcpStream>> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(10);
    let mut last = std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no attempt finished before the deadline",
    );
    loop {
        if give_up.load(Ordering::Relaxed) {
            return Ok(None);
        }
        interrupted(cfg)?;
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::ConnectTimeout {
                peer: place.next,
                waited: now - started,
                source: last,
            });
        }
        let attempt = (deadline - now).min(Duration::from_secs(2));
        match TcpStream::connect_timeout(&place.next.addr, attempt) {
            Ok(stream) => match hello(stream, place, cfg, deadline) {
                Ok(stream) => return Ok(Some(stream)),
                Err(Attempt::Refused(e)) => return Err(e),
                Err(Attempt::Transient(e)) => last = e,
            },
            Err(e) => last = e,
        }
        thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// The connector's half of the handshake.
fn hello(
    mut stream: TcpStream,
    place: &Place,
    cfg: &RingConfig,
    deadline: Instant,
) -> Result<TcpStream, Attempt> {
    let timeout = handshake_timeout(cfg, deadline);
    let hello = Hello {
        version: PROTOCOL_VERSION,
        session: cfg.session,
        rank: place.rank as u32,
        world: place.world as u32,
    };
    let mut answer = [0u8; ANSWER_LEN];
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| stream.write_all(&hello.encode()))
        .and_then(|()| stream.read_exact(&mut answer))
        .map_err(Attempt::Transient)?;
    let refused = |reason: String| {
        Attempt::Refused(Error::Refused {
            peer: place.next,
            reason,
        })
    };
    let Some(answer) = Answer::decode(&answer) else {
        return Err(refused("it does not speak the dalle ring protocol".into()));
    };
    match answer.verdict {
        Verdict::Accepted if answer.rank as usize == place.next.rank => Ok(stream),
        Verdict::Accepted => Err(refused(format!(
            "it answered as rank {}: the ranks were handed different peer lists",
            answer.rank
        ))),
        Verdict::WrongVersion => Err(refused(format!(
            "it speaks protocol version {}, this rank {PROTOCOL_VERSION}",
            answer.version
        ))),
        Verdict::WrongSession => Err(refused(format!(
            "session {:#x} is not its session (another job, or a group that was re-formed)",
            cfg.session
        ))),
        Verdict::WrongRank => Err(refused(format!(
            "it does not expect rank {} as its predecessor: the ranks were handed different peer lists",
            place.rank
        ))),
        Verdict::WrongWorld => Err(refused(format!(
            "it is in a group of a different size than {}",
            place.world
        ))),
    }
}

fn accept_prev(
    place: &Place,
    listener: &TcpListener,
    cfg: &RingConfig,
    deadline: Instant,
    give_up: &AtomicBool,
) -> Result<Option<TcpStream>> {
    let started = Instant::now();
    let local = listener.local_addr().map_err(|source| Error::Io {
        op: "listen",
        peer: place.prev,
        source,
    })?;
    // Non-blocking so that the deadline and the other side's failure are seen.
    listener.set_nonblocking(true).map_err(|source| Error::Io {
        op: "listen",
        peer: place.prev,
        source,
    })?;
    loop {
        if give_up.load(Ordering::Relaxed) {
            return Ok(None);
        }
        interrupted(cfg)?;
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::AcceptTimeout {
                peer: place.prev,
                local,
                waited: now - started,
            });
        }
        match listener.accept() {
            Ok((stream, from)) => match welcome(stream, place, cfg, deadline) {
                Ok(stream) => return Ok(Some(stream)),
                Err(why) => tracing::warn!(
                    %from, expected = %place.prev, "refused a ring connection: {why}"
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                ) => {}
            Err(source) => {
                return Err(Error::Io {
                    op: "accept",
                    peer: place.prev,
                    source,
                });
            }
        }
    }
}

/// The acceptor's half of the handshake; `Err` says why a caller was turned away.
fn welcome(
    mut stream: TcpStream,
    place: &Place,
    cfg: &RingConfig,
    deadline: Instant,
) -> std::result::Result<TcpStream, String> {
    let timeout = handshake_timeout(cfg, deadline);
    let mut hello = [0u8; HELLO_LEN];
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| stream.read_exact(&mut hello))
        .map_err(|e| format!("no hello: {e}"))?;
    let hello = Hello::decode(&hello).ok_or("it does not speak the dalle ring protocol")?;
    let verdict = Verdict::judge(&hello, cfg.session, place.prev.rank, place.world);
    let answer = Answer {
        version: PROTOCOL_VERSION,
        verdict,
        rank: place.rank as u32,
    };
    stream
        .write_all(&answer.encode())
        .map_err(|e| format!("could not answer: {e}"))?;
    match verdict {
        Verdict::Accepted => Ok(stream),
        _ => Err(format!(
            "{verdict:?} (it said rank {} of {}, session {:#x}, version {})",
            hello.rank, hello.world, hello.session, hello.version
        )),
    }
}

/// Forming gives up once the interrupt is flipped (the coordinator ended
/// the group while a peer was still missing).
fn interrupted(cfg: &RingConfig) -> Result<()> {
    match cfg.interrupt.reason() {
        Some(reason) => Err(Error::Interrupted { reason }),
        None => Ok(()),
    }
}

/// A silent stranger may hold the acceptor for at most this long.
fn handshake_timeout(cfg: &RingConfig, deadline: Instant) -> Duration {
    cfg.io_timeout
        .min(Duration::from_secs(10))
        .min(deadline.saturating_duration_since(Instant::now()))
        .max(Duration::from_millis(1))
}
