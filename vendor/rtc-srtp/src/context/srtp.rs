use super::*;
use shared::{
    error::{Error, Result},
    marshal::{MarshalSize, Unmarshal},
};

use bytes::BytesMut;

impl Context {
    /// Decrypts an SRTP packet whose header has already been parsed.
    ///
    /// Saves re-parsing when the caller needed the header to route the packet. The header must
    /// be the one belonging to `encrypted`.
    ///
    /// # Errors
    ///
    /// Fails if authentication fails, if the packet is a replay, or if it is too short to hold
    /// the profile's auth tag.
    pub fn decrypt_rtp_with_header(
        &mut self,
        encrypted: &[u8],
        header: &rtp::Header,
    ) -> Result<BytesMut> {
        let auth_tag_len = self.cipher.rtp_auth_tag_len();
        if encrypted.len() < header.marshal_size() + auth_tag_len {
            return Err(Error::ErrTooShortRtp);
        }

        let state = self.get_srtp_ssrc_state(header.ssrc);
        let (roc, diff, _) = state.next_rollover_count(header.sequence_number);
        if let Some(replay_detector) = &mut state.replay_detector
            && !replay_detector.check(header.sequence_number as u64)
        {
            return Err(Error::SrtpSsrcDuplicated(
                header.ssrc,
                header.sequence_number,
            ));
        }

        let dst = self.cipher.decrypt_rtp(encrypted, header, roc)?;
        {
            let state = self.get_srtp_ssrc_state(header.ssrc);
            if let Some(replay_detector) = &mut state.replay_detector {
                replay_detector.accept();
            }
            state.update_rollover_count(header.sequence_number, diff);
        }

        Ok(dst)
    }

    /// switchboard patch: [`Context::encrypt_rtp_in_place`] with the rollover counter given by
    /// the caller, for a sender that keeps it per stream itself: no per-packet lookup of the
    /// stream's state (an SFU protects each forwarded packet once per subscriber).
    ///
    /// # Errors
    ///
    /// Fails if the packet is shorter than `header_len` or an RTP header, or the cipher fails.
    pub fn encrypt_rtp_in_place_with_roc(
        &mut self,
        packet: &mut Vec<u8>,
        header_len: usize,
        roc: u32,
    ) -> Result<()> {
        if header_len < 12 || packet.len() < header_len {
            return Err(Error::ErrTooShortRtp);
        }
        let sequence_number = u16::from_be_bytes([packet[2], packet[3]]);
        let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        self.cipher
            .encrypt_rtp_in_place(packet, header_len, ssrc, sequence_number, roc)
    }

    /// switchboard patch: authenticates and decrypts the SRTP packet in `packet` in place and
    /// drops its auth tag, so that a receiver that owns the datagram's buffer decrypts without
    /// allocating or copying. The header (CSRCs and extensions included) is read from the bytes.
    /// Same result as [`Context::decrypt_rtp`], and the same replay protection.
    ///
    /// # Errors
    ///
    /// Fails if the packet is malformed or too short, is a replay, or fails authentication
    /// (then the replay window does not move and the buffer's contents are unspecified).
    pub fn decrypt_rtp_in_place(&mut self, packet: &mut BytesMut) -> Result<()> {
        let header_len = rtp_header_len(packet).ok_or(Error::ErrTooShortRtp)?;
        let sequence_number = u16::from_be_bytes([packet[2], packet[3]]);
        let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        let state = self.get_srtp_ssrc_state(ssrc);
        let (roc, diff, _) = state.next_rollover_count(sequence_number);
        if let Some(replay_detector) = &mut state.replay_detector
            && !replay_detector.check(sequence_number as u64)
        {
            return Err(Error::SrtpSsrcDuplicated(ssrc, sequence_number));
        }
        let end = self
            .cipher
            .decrypt_rtp_in_place(packet, header_len, ssrc, sequence_number, roc)?;
        packet.truncate(end);
        let state = self.get_srtp_ssrc_state(ssrc);
        if let Some(replay_detector) = &mut state.replay_detector {
            replay_detector.accept();
        }
        state.update_rollover_count(sequence_number, diff);
        Ok(())
    }

    /// DecryptRTP decrypts a RTP packet with an encrypted payload
    pub fn decrypt_rtp(&mut self, encrypted: &[u8]) -> Result<BytesMut> {
        let mut buf = encrypted;
        let header = rtp::Header::unmarshal(&mut buf)?;
        self.decrypt_rtp_with_header(encrypted, &header)
    }

    /// Encrypts an RTP payload, using an already-parsed header.
    ///
    /// Saves re-parsing when the caller has just built the header. Returns the full protected
    /// packet, header included.
    ///
    /// # Errors
    ///
    /// Fails if the SRTP context has no key for this SSRC or the cipher rejects the input.
    pub fn encrypt_rtp_with_header(
        &mut self,
        plaintext: &[u8],
        header: &rtp::Header,
    ) -> Result<BytesMut> {
        let (roc, diff, ovf) = self
            .get_srtp_ssrc_state(header.ssrc)
            .next_rollover_count(header.sequence_number);
        if ovf {
            // ... when 2^48 SRTP packets or 2^31 SRTCP packets have been secured with the same key
            // (whichever occurs before), the key management MUST be called to provide new master key(s)
            // (previously stored and used keys MUST NOT be used again), or the session MUST be terminated.
            // https://www.rfc-editor.org/rfc/rfc3711#section-9.2
            return Err(Error::ErrExceededMaxPackets);
        }

        let dst = self.cipher.encrypt_rtp(plaintext, header, roc)?;

        self.get_srtp_ssrc_state(header.ssrc)
            .update_rollover_count(header.sequence_number, diff);

        Ok(dst)
    }

    /// switchboard patch: protects the RTP packet in `packet` (header and payload) in place and
    /// appends the auth tag, so that a caller who reuses its buffers protects without
    /// allocating (an SFU forwarding one packet to many subscribers). `header_len` is the
    /// length of the packet's header, CSRCs and extensions included. Same output as
    /// [`Context::encrypt_rtp`].
    ///
    /// # Errors
    ///
    /// Fails if the packet is shorter than `header_len` or an RTP header, or the cipher fails.
    pub fn encrypt_rtp_in_place(&mut self, packet: &mut Vec<u8>, header_len: usize) -> Result<()> {
        if header_len < 12 || packet.len() < header_len {
            return Err(Error::ErrTooShortRtp);
        }
        let sequence_number = u16::from_be_bytes([packet[2], packet[3]]);
        let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        let (roc, diff, ovf) = self
            .get_srtp_ssrc_state(ssrc)
            .next_rollover_count(sequence_number);
        if ovf {
            return Err(Error::ErrExceededMaxPackets);
        }
        self.cipher
            .encrypt_rtp_in_place(packet, header_len, ssrc, sequence_number, roc)?;
        self.get_srtp_ssrc_state(ssrc)
            .update_rollover_count(sequence_number, diff);
        Ok(())
    }

    /// EncryptRTP marshals and encrypts an RTP packet, writing to the dst buffer provided.
    /// If the dst buffer does not have the capacity to hold `len(plaintext) + 10` bytes, a new one will be allocated and returned.
    pub fn encrypt_rtp(&mut self, plaintext: &[u8]) -> Result<BytesMut> {
        let mut buf = plaintext;
        let header = rtp::Header::unmarshal(&mut buf)?;
        self.encrypt_rtp_with_header(plaintext, &header)
    }
}

/// switchboard patch: the length of an RTP packet's header as sent (fixed part, CSRCs, header
/// extension block), or `None` if the bytes are too short for it or not RTP version 2.
fn rtp_header_len(packet: &[u8]) -> Option<usize> {
    if packet.len() < 12 || packet[0] >> 6 != 2 {
        return None;
    }
    let mut len = 12 + 4 * (packet[0] & 0x0F) as usize;
    if packet[0] & 0x10 != 0 {
        let words = packet.get(len + 2..len + 4)?;
        len += 4 + 4 * u16::from_be_bytes([words[0], words[1]]) as usize;
    }
    (len <= packet.len()).then_some(len)
}
