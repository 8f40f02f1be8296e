//! The ring's shared secret and the HMAC-SHA256 proofs its handshake
//! exchanges (the flow is in `connect.rs`, the frames in [`crate::wire`]).
//!
//! Each side of a link proves it holds the generation's secret by an HMAC
//! over everything that identifies this one handshake: both sides' fresh
//! nonces, the session, the world size, both ranks, the protocol version and
//! which side is proving. So a proof is good for exactly one link of one
//! handshake: a recorded one fails against a fresh nonce, and one side's
//! proof cannot be reflected back as the other's.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::{NONCE_LEN, Nonce, PROOF_LEN, PROTOCOL_VERSION, Proof};

/// The secret every member of one generation of the group shares, and
/// nobody else: the coordinator draws a fresh one per generation and hands
/// it to each member over its authenticated channel.
///
/// Its `Debug` shows only the length, so configs can be logged.
#[derive(Clone, Default)]
pub struct RingSecret(Vec<u8>);

impl RingSecret {
    /// The shortest secret a ring accepts (128 bits): anything shorter is a
    /// mistake (a password, a placeholder), not a drawn key.
    pub const MIN_LEN: usize = 16;
    /// The length [`RingSecret::random`] draws.
    pub const LEN: usize = 32;

    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// [`RingSecret::LEN`] bytes from the operating system's CSPRNG.
    pub fn random() -> Self {
        let mut bytes = vec![0u8; Self::LEN];
        getrandom::fill(&mut bytes).expect("the OS random number generator failed");
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for RingSecret {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for RingSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RingSecret(<{} bytes, redacted>)", self.0.len())
    }
}

/// Which side of the link a proof comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Prover {
    Acceptor = 1,
    Connector = 2,
}

/// What both sides of one handshake know and must agree on.
pub(crate) struct Transcript {
    pub session: u64,
    pub world: u32,
    pub connector_rank: u32,
    pub acceptor_rank: u32,
    pub connector_nonce: Nonce,
    pub acceptor_nonce: Nonce,
}

/// Keeps these MACs apart from any other use of the same key.
const DOMAIN: &[u8] = b"dalle ring handshake\0";

fn mac(secret: &RingSecret, prover: Prover, t: &Transcript) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    // Fixed-size fields after a fixed prefix: the encoding is unambiguous.
    mac.update(DOMAIN);
    mac.update(&[prover as u8]);
    mac.update(&PROTOCOL_VERSION.to_le_bytes());
    mac.update(&t.session.to_le_bytes());
    mac.update(&t.world.to_le_bytes());
    mac.update(&t.connector_rank.to_le_bytes());
    mac.update(&t.acceptor_rank.to_le_bytes());
    mac.update(&t.connector_nonce);
    mac.update(&t.acceptor_nonce);
    mac
}

/// `prover`'s proof that it holds `secret`, for this handshake only.
pub(crate) fn prove(secret: &RingSecret, prover: Prover, t: &Transcript) -> Proof {
    let mut proof = [0u8; PROOF_LEN];
    proof.copy_from_slice(&mac(secret, prover, t).finalize().into_bytes());
    proof
}

/// Whether `proof` is `prover`'s proof for this handshake under `secret`.
/// Compared in constant time (hmac's `verify_slice`), so timing tells a
/// guesser nothing about how close it came.
pub(crate) fn verify(secret: &RingSecret, prover: Prover, t: &Transcript, proof: &Proof) -> bool {
    mac(secret, prover, t).verify_slice(proof).is_ok()
}

/// A nonce nobody can predict, so no recorded proof matches it.
pub(crate) fn fresh_nonce() -> std::io::Result<Nonce> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(format!("OS random: {e}")))?;
    Ok(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript() -> Transcript {
        Transcript {
            session: 0xfeed,
            world: 3,
            connector_rank: 1,
            acceptor_rank: 2,
            connector_nonce: [1; NONCE_LEN],
            acceptor_nonce: [2; NONCE_LEN],
        }
    }

    #[test]
    fn a_proof_verifies_only_for_its_secret_side_and_handshake() {
        let secret = RingSecret::new(vec![9u8; 32]);
        let t = transcript();
        let proof = prove(&secret, Prover::Connector, &t);
        assert!(verify(&secret, Prover::Connector, &t, &proof));
        let other = RingSecret::new(vec![8u8; 32]);
        assert!(!verify(&other, Prover::Connector, &t, &proof));
        // Reflected back as the other side's proof.
        assert!(!verify(&secret, Prover::Acceptor, &t, &proof));
        // Replayed against a fresh acceptor nonce.
        let replayed = Transcript {
            acceptor_nonce: [3; NONCE_LEN],
            ..transcript()
        };
        assert!(!verify(&secret, Prover::Connector, &replayed, &proof));
        for changed in [
            Transcript {
                session: 1,
                ..transcript()
            },
            Transcript {
                world: 4,
                ..transcript()
            },
            Transcript {
                connector_rank: 0,
                ..transcript()
            },
            Transcript {
                acceptor_rank: 0,
                ..transcript()
            },
            Transcript {
                connector_nonce: [0; NONCE_LEN],
                ..transcript()
            },
        ] {
            assert!(!verify(&secret, Prover::Connector, &changed, &proof));
        }
    }

    #[test]
    fn nonces_and_random_secrets_are_fresh() {
        assert_ne!(fresh_nonce().unwrap(), fresh_nonce().unwrap());
        let (a, b) = (RingSecret::random(), RingSecret::random());
        assert_eq!(a.len(), RingSecret::LEN);
        assert_ne!(a.as_bytes(), b.as_bytes());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let secret = RingSecret::new(b"0123456789abcdef-very-secret".to_vec());
        let shown = format!("{secret:?}");
        assert_eq!(shown, "RingSecret(<28 bytes, redacted>)");
    }
}
