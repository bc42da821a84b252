//! The SRTP of a pipe between two nodes (docs/CLUSTER.md): each node draws a key for what it
//! sends to a peer and announces it over the bus; the peer decrypts with it. AES-GCM, as with
//! browsers: relayed media is encrypted and authenticated between nodes too.

use bytes::BytesMut;
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;
use serde::{Deserialize, Serialize};

const PROFILE: ProtectionProfile = ProtectionProfile::AeadAes128Gcm;

/// One direction's master key and salt, as announced over the bus.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeKey {
    key: Vec<u8>,
    salt: Vec<u8>,
}

impl std::fmt::Debug for PipeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PipeKey(..)") // never in logs
    }
}

impl PipeKey {
    /// A fresh key from the system's random source.
    pub fn generate() -> Result<PipeKey, PipeError> {
        let rng = ring::rand::SystemRandom::new();
        let mut key = vec![0u8; PROFILE.key_len()];
        let mut salt = vec![0u8; PROFILE.salt_len()];
        ring::rand::SecureRandom::fill(&rng, &mut key).map_err(|_| PipeError::Random)?;
        ring::rand::SecureRandom::fill(&rng, &mut salt).map_err(|_| PipeError::Random)?;
        Ok(PipeKey { key, salt })
    }

    /// The SRTP context that protects (sending) or unprotects (receiving, with replay
    /// protection over the last 1024 packets of each source) with this key.
    pub fn context(&self) -> Result<Context, PipeError> {
        let crypto = rtc::crypto::default_provider().map_err(|e| PipeError::Srtp(e.to_string()))?;
        let replay = Some(rtc::srtp::option::srtp_replay_protection(1024));
        Context::new(
            &self.key,
            &self.salt,
            PROFILE,
            replay,
            None,
            crypto.crypto(),
        )
        .map_err(|e| PipeError::Srtp(e.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipeError {
    #[error("no random bytes for a pipe key")]
    Random,
    #[error("pipe SRTP: {0}")]
    Srtp(String),
}

/// Protects one RTP packet for the pipe.
pub fn seal(ctx: &mut Context, rtp: &[u8]) -> Result<BytesMut, PipeError> {
    ctx.encrypt_rtp(rtp)
        .map_err(|e| PipeError::Srtp(e.to_string()))
}

/// Checks and decrypts one datagram from the pipe.
pub fn open(ctx: &mut Context, datagram: &[u8]) -> Result<BytesMut, PipeError> {
    ctx.decrypt_rtp(datagram)
        .map_err(|e| PipeError::Srtp(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 96];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0x12, 0x34]);
        p.extend_from_slice(b"a relayed frame");
        p
    }

    #[test]
    fn a_packet_crosses_with_the_announced_key_only() {
        let key = PipeKey::generate().unwrap();
        // The key travels over the bus (msgpack) and comes back the same.
        let announced: PipeKey = rmp_serde::from_slice(&rmp_serde::to_vec(&key).unwrap()).unwrap();
        assert_eq!(announced, key);
        let (mut a, mut b) = (key.context().unwrap(), announced.context().unwrap());
        let sealed = seal(&mut a, &rtp(1)).unwrap();
        assert_ne!(&sealed[12..], &rtp(1)[12..], "the payload is encrypted");
        assert_eq!(&open(&mut b, &sealed).unwrap()[..], &rtp(1)[..]);

        let mut tampered = seal(&mut a, &rtp(2)).unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(open(&mut b, &tampered).is_err(), "authenticated");
        let mut stranger = PipeKey::generate().unwrap().context().unwrap();
        assert!(open(&mut stranger, &seal(&mut a, &rtp(3)).unwrap()).is_err());
        assert!(open(&mut b, &sealed).is_err(), "a replay is refused");
        assert_eq!(format!("{key:?}"), "PipeKey(..)");
    }
}
