//! The bytes between ring neighbours: the handshake that opens a link and the
//! header that starts every collective. Everything is little-endian and of
//! fixed size, so a reader never trusts a length from the wire.
//!
//! A link is one TCP connection from rank r to rank r+1 (mod W); data flows
//! only in that direction except for the handshake's replies.
//!
//! ```text
//! Hello     (connector → acceptor, 60 bytes)
//!   magic "DALLERNG" | version u32 | session u64 | rank u32 | world u32 | nonce [32]
//! Answer    (acceptor → connector, 17 bytes)
//!   magic "DALLERNG" | version u32 | verdict u8 | rank u32
//! Challenge (acceptor → connector, 64 bytes, only after an Accepted answer)
//!   nonce [32] | proof [32]            the acceptor's proof (see auth.rs)
//! Proof     (connector → acceptor, 32 bytes)
//!   proof [32]                         the connector's proof
//! Outcome   (acceptor → connector, 1 byte)
//!   verdict u8                         Accepted or Unauthenticated
//! OpHeader  (before each collective, 24 bytes)
//!   op u8 | 0u8 ×3 | root u32 | seq u64 | len u64
//! then the payload: f32 little-endian for all-reduce, reduce-scatter and
//! all-gather, raw bytes for broadcast.
//! ```
//!
//! The first 28 bytes of a hello and the whole answer keep version 1's
//! layout, so ranks of different versions still tell each other which
//! version they speak instead of timing out.

/// Says "this is a dalle ring link" before anything else is believed.
pub const MAGIC: [u8; 8] = *b"DALLERNG";
/// Bumped whenever any frame below changes, or what a payload means. 2: the
/// handshake authenticates both sides with the generation's secret. 3: the
/// all-reduce's segment schedule changed (rank r now finishes the sum of
/// segment r, see `ring.rs`), so a version-2 rank would add the wrong
/// segments without any header telling; reduce-scatter and all-gather ops.
pub const PROTOCOL_VERSION: u32 = 3;

/// The part of a hello every version shares (version 1's whole hello).
pub const HELLO_HEAD_LEN: usize = 28;
pub const HELLO_LEN: usize = HELLO_HEAD_LEN + NONCE_LEN;
pub const ANSWER_LEN: usize = 17;
pub const CHALLENGE_LEN: usize = NONCE_LEN + PROOF_LEN;
pub const NONCE_LEN: usize = 32;
/// An HMAC-SHA256 tag.
pub const PROOF_LEN: usize = 32;
pub const OUTCOME_LEN: usize = 1;
pub const HEADER_LEN: usize = 24;

/// Fresh random bytes per handshake and side, so no recorded proof is good
/// for another handshake.
pub type Nonce = [u8; NONCE_LEN];
/// Proves its sender holds the ring's secret, for one handshake.
pub type Proof = [u8; PROOF_LEN];

/// What a connecting rank says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    /// The job and group generation this link belongs to: a worker left over
    /// from an earlier group (or another job) is refused. Not a secret.
    pub session: u64,
    pub rank: u32,
    pub world: u32,
    /// The connector's half of what the proofs cover.
    pub nonce: Nonce,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..20].copy_from_slice(&self.session.to_le_bytes());
        b[20..24].copy_from_slice(&self.rank.to_le_bytes());
        b[24..28].copy_from_slice(&self.world.to_le_bytes());
        b[28..60].copy_from_slice(&self.nonce);
        b
    }

    /// `None` when the magic is wrong: whatever connected does not speak this
    /// protocol at all.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Option<Self> {
        let version = Self::version_of(b[..HELLO_HEAD_LEN].try_into().expect("head"))?;
        Some(Self {
            version,
            session: u64_at(b, 12),
            rank: u32_at(b, 20),
            world: u32_at(b, 24),
            nonce: b[28..60].try_into().expect("32 bytes"),
        })
    }

    /// The version a hello of any version announces, from the head they all
    /// share; `None` when the magic is wrong.
    pub fn version_of(head: &[u8; HELLO_HEAD_LEN]) -> Option<u32> {
        (head[0..8] == MAGIC).then(|| u32_at(head, 8))
    }
}

/// The acceptor's decision on a [`Hello`], and later on the connector's
/// [`Proof`] (the outcome byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Verdict {
    Accepted = 0,
    WrongVersion = 1,
    WrongSession = 2,
    WrongRank = 3,
    WrongWorld = 4,
    /// The connector's proof does not match the acceptor's secret.
    Unauthenticated = 5,
}

impl Verdict {
    pub fn decode(v: u8) -> Option<Self> {
        Some(match v {
            0 => Verdict::Accepted,
            1 => Verdict::WrongVersion,
            2 => Verdict::WrongSession,
            3 => Verdict::WrongRank,
            4 => Verdict::WrongWorld,
            5 => Verdict::Unauthenticated,
            _ => return None,
        })
    }

    /// Judges a hello against what this rank expects from its predecessor.
    /// Only the proofs that follow establish who the caller is.
    pub fn judge(hello: &Hello, session: u64, prev_rank: usize, world: usize) -> Self {
        if hello.version != PROTOCOL_VERSION {
            Verdict::WrongVersion
        } else if hello.session != session {
            Verdict::WrongSession
        } else if hello.world as usize != world {
            Verdict::WrongWorld
        } else if hello.rank as usize != prev_rank {
            Verdict::WrongRank
        } else {
            Verdict::Accepted
        }
    }
}

/// The acceptor's reply: its verdict, and its own version and rank so the
/// connector's error can say what differed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub version: u32,
    pub verdict: Verdict,
    pub rank: u32,
}

impl Answer {
    pub fn encode(&self) -> [u8; ANSWER_LEN] {
        let mut b = [0u8; ANSWER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12] = self.verdict as u8;
        b[13..17].copy_from_slice(&self.rank.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; ANSWER_LEN]) -> Option<Self> {
        if b[0..8] != MAGIC {
            return None;
        }
        Some(Self {
            version: u32_at(b, 8),
            verdict: Verdict::decode(b[12])?,
            rank: u32_at(b, 13),
        })
    }
}

/// The acceptor's nonce and its proof over both nonces, sent once the hello
/// is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: Nonce,
    pub proof: Proof,
}

impl Challenge {
    pub fn encode(&self) -> [u8; CHALLENGE_LEN] {
        let mut b = [0u8; CHALLENGE_LEN];
        b[..NONCE_LEN].copy_from_slice(&self.nonce);
        b[NONCE_LEN..].copy_from_slice(&self.proof);
        b
    }

    pub fn decode(b: &[u8; CHALLENGE_LEN]) -> Self {
        Self {
            nonce: b[..NONCE_LEN].try_into().expect("32 bytes"),
            proof: b[NONCE_LEN..].try_into().expect("32 bytes"),
        }
    }
}

/// Which collective a header starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    AllReduceSumF32 = 1,
    Broadcast = 2,
    Barrier = 3,
    ReduceScatterSumF32 = 4,
    AllGatherF32 = 5,
}

impl Op {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Op::AllReduceSumF32,
            2 => Op::Broadcast,
            3 => Op::Barrier,
            4 => Op::ReduceScatterSumF32,
            5 => Op::AllGatherF32,
            _ => return None,
        })
    }
}

/// Sent to the successor before every collective and checked against the
/// predecessor's, so ranks that disagree on what they are doing fail loudly
/// instead of summing unrelated bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpHeader {
    pub op: Op,
    pub root: u32,
    /// Collectives this link has carried before this one.
    pub seq: u64,
    /// Elements (f32 for all-reduce, reduce-scatter and all-gather, bytes
    /// for broadcast).
    pub len: u64,
}

impl OpHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.op as u8;
        b[4..8].copy_from_slice(&self.root.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Option<Self> {
        Some(Self {
            op: Op::from_u8(b[0])?,
            root: u32_at(b, 4),
            seq: u64_at(b, 8),
            len: u64_at(b, 16),
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            session: 0xDEAD_BEEF_0123_4567,
            rank: 3,
            world: 5,
            nonce: [0xA5; NONCE_LEN],
        }
    }

    #[test]
    fn frames_round_trip() {
        assert_eq!(Hello::decode(&hello().encode()), Some(hello()));
        let answer = Answer {
            version: 7,
            verdict: Verdict::Unauthenticated,
            rank: 4,
        };
        assert_eq!(Answer::decode(&answer.encode()), Some(answer));
        let challenge = Challenge {
            nonce: [1; NONCE_LEN],
            proof: [2; PROOF_LEN],
        };
        assert_eq!(Challenge::decode(&challenge.encode()), challenge);
        let header = OpHeader {
            op: Op::Broadcast,
            root: 2,
            seq: 1 << 40,
            len: 1_000_003,
        };
        assert_eq!(OpHeader::decode(&header.encode()), Some(header));
        for op in [
            Op::AllReduceSumF32,
            Op::Broadcast,
            Op::Barrier,
            Op::ReduceScatterSumF32,
            Op::AllGatherF32,
        ] {
            let header = OpHeader { op, ..header };
            assert_eq!(OpHeader::decode(&header.encode()), Some(header));
        }
    }

    #[test]
    fn the_head_keeps_version_1s_layout() {
        // Version 1's hello for rank 3 of 5, byte for byte.
        let mut v1 = Vec::from(MAGIC);
        v1.extend(1u32.to_le_bytes());
        v1.extend(0xDEAD_BEEF_0123_4567u64.to_le_bytes());
        v1.extend(3u32.to_le_bytes());
        v1.extend(5u32.to_le_bytes());
        let v2 = Hello {
            version: 1,
            ..hello()
        }
        .encode();
        assert_eq!(&v2[..HELLO_HEAD_LEN], &v1[..]);
        assert_eq!(Hello::version_of(&v1[..].try_into().unwrap()), Some(1));
    }

    #[test]
    fn foreign_bytes_are_not_believed() {
        let mut b = hello().encode();
        b[0] = b'G'; // e.g. an HTTP client's "GET /…"
        assert_eq!(Hello::decode(&b), None);
        assert_eq!(
            Hello::version_of(&b[..HELLO_HEAD_LEN].try_into().unwrap()),
            None
        );
        assert_eq!(Verdict::decode(6), None);
        let mut h = [0u8; HEADER_LEN];
        h[0] = 99;
        assert_eq!(OpHeader::decode(&h), None);
    }

    #[test]
    fn judge_names_the_first_difference() {
        let ok = Hello {
            session: 9,
            rank: 1,
            world: 3,
            ..hello()
        };
        assert_eq!(Verdict::judge(&ok, 9, 1, 3), Verdict::Accepted);
        assert_eq!(Verdict::judge(&ok, 8, 1, 3), Verdict::WrongSession);
        assert_eq!(Verdict::judge(&ok, 9, 2, 3), Verdict::WrongRank);
        assert_eq!(Verdict::judge(&ok, 9, 1, 4), Verdict::WrongWorld);
        let old = Hello { version: 1, ..ok };
        assert_eq!(Verdict::judge(&old, 9, 1, 3), Verdict::WrongVersion);
    }
}
