//! Forming the ring: rank r opens a link to rank r+1 and accepts one from
//! rank r-1 (mod W), both at once, until a deadline. Each link starts with a
//! handshake ([`crate::wire`]) so that a stray connection, a worker of another
//! job or of an earlier group, a peer speaking another protocol version, or
//! anyone who does not hold the generation's secret is refused rather than
//! summed into gradients.
//!
//! The handshake, in order: the connector's hello (session, ranks, world
//! size, a fresh nonce); the acceptor's answer, and if the hello is what it
//! expects, its own fresh nonce and its proof; the connector checks that
//! proof, then sends its own; the acceptor's one-byte outcome. A proof is
//! HMAC-SHA256 under [`RingConfig::secret`] over both nonces, the session,
//! world size, both ranks, the protocol version and which side proves
//! (`auth.rs`), compared in constant time. The acceptor proves first, so a
//! connector never hands its proof to a listener that has not shown it
//! holds the secret; what the acceptor hands an unproven caller is good for
//! nothing else (it names the acceptor's role and covers its own fresh
//! nonce).
//!
//! # Threat model
//!
//! The handshake authenticates peers: only holders of the generation's
//! secret (which the coordinator draws fresh for every generation and hands
//! each member over its authenticated gRPC channel) can open a link, so
//! anyone else who can reach a ring port (another tenant, a stale worker of
//! an earlier generation, someone who only has the job's TOML and
//! checkpoints) is refused, and learns only what is public anyway (that a
//! dalle ring listens there, its protocol version and rank, whether a
//! guessed session is right). Recorded handshakes cannot be replayed: every
//! proof covers the other side's fresh nonce. The data path after the handshake is, like
//! NCCL's, neither encrypted nor authenticated per byte: the ring belongs on
//! a trusted cluster network, and an attacker on the path between two ranks
//! (who can read, inject or rewrite packets of an open link) can still read
//! and tamper with gradients.
//!
//! # Bounds
//!
//! Refusals are final for the connector (retrying cannot fix a wrong session
//! or secret). The acceptor runs each caller's handshake on its own thread,
//! at most [`MAX_PENDING_HANDSHAKES`] at once (further callers wait in the
//! listen backlog), each cut off after `handshake_timeout` however slowly its
//! bytes trickle in, so a silent or slow stranger cannot keep the real
//! predecessor out. A refused or timed-out caller is logged with its address
//! and the acceptor keeps waiting for its real predecessor until the
//! formation deadline. (A flood beyond the kernel's listen backlog can still
//! delay formation, as it can any TCP service: that is the network's to stop.)

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::auth::{self, Prover, Transcript};
use crate::error::{Error, Peer, Result};
use crate::ring::RingConfig;
use crate::wire::{
    ANSWER_LEN, Answer, CHALLENGE_LEN, Challenge, HELLO_HEAD_LEN, HELLO_LEN, Hello, OUTCOME_LEN,
    PROOF_LEN, PROTOCOL_VERSION, Verdict,
};

/// Handshakes the acceptor runs at once, at most: a flood of callers that
/// never finish costs this many threads and sockets; the rest wait in the
/// listen backlog until a slot frees (after `handshake_timeout` at worst).
pub(crate) const MAX_PENDING_HANDSHAKES: usize = 8;

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
    /// The peer said no, or failed authentication: retrying cannot help.
    Final(Error),
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
            Ok(stream) => match hello(stream, place, cfg, deadline, give_up) {
                Ok(stream) => return Ok(Some(stream)),
                Err(Attempt::Final(e)) => return Err(e),
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
    give_up: &AtomicBool,
) -> Result<TcpStream, Attempt> {
    let by = handshake_deadline(cfg, deadline);
    // A listener that never answers must not hold up an interrupt or the
    // acceptor's failure for a whole handshake_timeout.
    let stop = || give_up.load(Ordering::Relaxed) || cfg.interrupt.reason().is_some();
    let nonce = auth::fresh_nonce().map_err(|source| {
        Attempt::Final(Error::Io {
            op: "draw a handshake nonce",
            peer: place.next,
            source,
        })
    })?;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        session: cfg.session,
        rank: place.rank as u32,
        world: place.world as u32,
        nonce,
    };
    let mut answer = [0u8; ANSWER_LEN];
    write_by(&mut stream, &hello.encode(), by)
        .and_then(|()| read_by(&mut stream, &mut answer, by, &stop))
        .map_err(Attempt::Transient)?;
    let refused = |reason: String| {
        Attempt::Final(Error::Refused {
            peer: place.next,
            reason,
        })
    };
    let unauthenticated = |detail: &str| {
        Attempt::Final(Error::Unauthenticated {
            peer: place.next,
            detail: detail.into(),
        })
    };
    let Some(answer) = Answer::decode(&answer) else {
        return Err(refused("it does not speak the dalle ring protocol".into()));
    };
    match answer.verdict {
        Verdict::Accepted if answer.rank as usize == place.next.rank => {}
        Verdict::Accepted => {
            return Err(refused(format!(
                "it answered as rank {}: the ranks were handed different peer lists",
                answer.rank
            )));
        }
        Verdict::WrongVersion => {
            return Err(refused(format!(
                "it speaks protocol version {}, this rank {PROTOCOL_VERSION}",
                answer.version
            )));
        }
        Verdict::WrongSession => {
            return Err(refused(format!(
                "session {:#x} is not its session (another job, or a group that was re-formed)",
                cfg.session
            )));
        }
        Verdict::WrongRank => {
            return Err(refused(format!(
                "it does not expect rank {} as its predecessor: the ranks were handed different peer lists",
                place.rank
            )));
        }
        Verdict::WrongWorld => {
            return Err(refused(format!(
                "it is in a group of a different size than {}",
                place.world
            )));
        }
        Verdict::Unauthenticated => {
            return Err(unauthenticated("it refused this rank before any proof"));
        }
    }
    let mut challenge = [0u8; CHALLENGE_LEN];
    read_by(&mut stream, &mut challenge, by, &stop).map_err(Attempt::Transient)?;
    let challenge = Challenge::decode(&challenge);
    let transcript = Transcript {
        session: cfg.session,
        world: place.world as u32,
        connector_rank: place.rank as u32,
        acceptor_rank: place.next.rank as u32,
        connector_nonce: nonce,
        acceptor_nonce: challenge.nonce,
    };
    // Checked before sending ours: a listener that cannot prove itself gets
    // nothing from this rank.
    if !auth::verify(&cfg.secret, Prover::Acceptor, &transcript, &challenge.proof) {
        return Err(unauthenticated(
            "its proof does not match this rank's ring secret: it holds another \
             generation's secret, or it is not a member of this group",
        ));
    }
    let proof = auth::prove(&cfg.secret, Prover::Connector, &transcript);
    let mut outcome = [0u8; OUTCOME_LEN];
    write_by(&mut stream, &proof, by)
        .and_then(|()| read_by(&mut stream, &mut outcome, by, &stop))
        .map_err(Attempt::Transient)?;
    match Verdict::decode(outcome[0]) {
        Some(Verdict::Accepted) => Ok(stream),
        Some(Verdict::Unauthenticated) => Err(unauthenticated(
            "it found this rank's proof wrong: the two hold different ring secrets",
        )),
        _ => Err(refused(format!(
            "unreadable handshake outcome {:#04x}",
            outcome[0]
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
    let (done_tx, done) = mpsc::channel();
    thread::scope(|s| {
        // A second handle on each handshake in flight, to cut it off once
        // this rank stops waiting, so the scope's join is immediate.
        let mut pending: HashMap<u64, TcpStream> = HashMap::new();
        let mut next_id = 0u64;
        let result = loop {
            if give_up.load(Ordering::Relaxed) {
                break Ok(None);
            }
            if let Err(e) = interrupted(cfg) {
                break Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(Error::AcceptTimeout {
                    peer: place.prev,
                    local,
                    waited: now - started,
                });
            }
            if pending.len() < MAX_PENDING_HANDSHAKES {
                match listener.accept() {
                    Ok((stream, from)) => {
                        match stream.try_clone() {
                            Ok(handle) => {
                                let id = next_id;
                                next_id += 1;
                                pending.insert(id, handle);
                                let done_tx = done_tx.clone();
                                let by = handshake_deadline(cfg, deadline);
                                s.spawn(move || {
                                    let _ =
                                        done_tx.send((id, from, welcome(stream, place, cfg, by)));
                                });
                            }
                            Err(e) => tracing::warn!(%from, "dropped a ring connection: {e}"),
                        }
                        continue; // more callers may be waiting
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::Interrupted
                                | io::ErrorKind::ConnectionAborted
                        ) => {}
                    Err(source) => {
                        break Err(Error::Io {
                            op: "accept",
                            peer: place.prev,
                            source,
                        });
                    }
                }
            }
            // Also the poll interval for new callers and the deadline.
            if let Ok((id, from, outcome)) = done.recv_timeout(Duration::from_millis(2)) {
                pending.remove(&id);
                match outcome {
                    Ok(stream) => break Ok(Some(stream)),
                    Err(why) => tracing::warn!(
                        %from, expected = %place.prev, "refused a ring connection: {why}"
                    ),
                }
            }
        };
        for handle in pending.into_values() {
            let _ = handle.shutdown(Shutdown::Both);
        }
        result
    })
}

/// The acceptor's half of the handshake, all of it by `by`; `Err` says why
/// a caller was turned away.
fn welcome(
    mut stream: TcpStream,
    place: &Place,
    cfg: &RingConfig,
    by: Instant,
) -> std::result::Result<TcpStream, String> {
    stream
        .set_nonblocking(false)
        .map_err(|e| format!("could not configure the connection: {e}"))?;
    let answer = |verdict| {
        Answer {
            version: PROTOCOL_VERSION,
            verdict,
            rank: place.rank as u32,
        }
        .encode()
    };
    let mut hello = [0u8; HELLO_LEN];
    // Cut off from outside (`accept_prev` shuts the socket down), so it
    // needs no stop condition of its own.
    let stop = || false;
    read_by(&mut stream, &mut hello[..HELLO_HEAD_LEN], by, &stop)
        .map_err(|e| stalled("a hello", e))?;
    let head = hello[..HELLO_HEAD_LEN].try_into().expect("the head");
    let Some(version) = Hello::version_of(head) else {
        return Err("it does not speak the dalle ring protocol".into());
    };
    if version != PROTOCOL_VERSION {
        // The rest of its hello may differ from ours: answer now, in the
        // layout every version reads.
        let _ = write_by(&mut stream, &answer(Verdict::WrongVersion), by);
        return Err(format!(
            "it speaks protocol version {version}, this rank {PROTOCOL_VERSION}"
        ));
    }
    read_by(&mut stream, &mut hello[HELLO_HEAD_LEN..], by, &stop)
        .map_err(|e| stalled("a whole hello", e))?;
    let hello = Hello::decode(&hello).expect("the magic was checked");
    let verdict = Verdict::judge(&hello, cfg.session, place.prev.rank, place.world);
    write_by(&mut stream, &answer(verdict), by).map_err(|e| format!("could not answer: {e}"))?;
    if verdict != Verdict::Accepted {
        return Err(format!(
            "{verdict:?} (it said rank {} of {}, session {:#x})",
            hello.rank, hello.world, hello.session
        ));
    }
    let transcript = Transcript {
        session: cfg.session,
        world: place.world as u32,
        connector_rank: place.prev.rank as u32,
        acceptor_rank: place.rank as u32,
        connector_nonce: hello.nonce,
        acceptor_nonce: auth::fresh_nonce().map_err(|e| e.to_string())?,
    };
    let challenge = Challenge {
        nonce: transcript.acceptor_nonce,
        proof: auth::prove(&cfg.secret, Prover::Acceptor, &transcript),
    };
    let mut proof = [0u8; PROOF_LEN];
    write_by(&mut stream, &challenge.encode(), by)
        .map_err(|e| format!("could not send the challenge: {e}"))?;
    read_by(&mut stream, &mut proof, by, &stop).map_err(|e| stalled("its proof", e))?;
    let verdict = if auth::verify(&cfg.secret, Prover::Connector, &transcript, &proof) {
        Verdict::Accepted
    } else {
        Verdict::Unauthenticated
    };
    write_by(&mut stream, &[verdict as u8], by)
        .map_err(|e| format!("could not send the outcome: {e}"))?;
    match verdict {
        Verdict::Accepted => Ok(stream),
        _ => Err(format!(
            "authentication failed: its proof (as rank {}) does not match this rank's ring secret",
            hello.rank
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

/// When a handshake starting now must be over.
fn handshake_deadline(cfg: &RingConfig, deadline: Instant) -> Instant {
    (Instant::now() + cfg.handshake_timeout).min(deadline)
}

/// Fills `buf` by `by`, however slowly the bytes trickle in (a per-read
/// timeout alone would let a caller that sends a byte now and then hold a
/// handshake open for ever), or until `stop` says to give up.
fn read_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    by: Instant,
    stop: &dyn Fn() -> bool,
) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        if stop() {
            return Err(io::Error::other("forming the ring was abandoned"));
        }
        // In slices, so that `stop` is seen soon.
        let slice = time_left(by)?.min(Duration::from_millis(50));
        stream.set_read_timeout(Some(slice))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed mid-handshake",
                ));
            }
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Handshake frames are far smaller than any socket buffer, so one timeout
/// for the whole write is enough.
fn write_by(stream: &mut TcpStream, bytes: &[u8], by: Instant) -> io::Result<()> {
    stream.set_write_timeout(Some(time_left(by)?))?;
    stream.write_all(bytes)
}

fn time_left(by: Instant) -> io::Result<Duration> {
    match by.saturating_duration_since(Instant::now()) {
        Duration::ZERO => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the handshake took longer than handshake_timeout",
        )),
        left => Ok(left),
    }
}

/// Why an acceptor's read failed, as its log line says it.
fn stalled(what: &str, e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no {what} within the handshake timeout")
        }
        io::ErrorKind::UnexpectedEof => format!("it hung up before sending {what}"),
        _ => format!("reading {what}: {e}"),
    }
}
