//! RTP packets as the forwarding core sees them: a parsed header whose extensions point into the
//! received buffer (no copies), and the shared payload.

use bytes::Bytes;

/// Most header extensions one packet can carry here; more are dropped (and counted by the caller).
pub const MAX_EXTENSIONS: usize = 8;

/// Header extensions of one packet: (id, value) pairs in wire order, without allocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    items: [(u8, Bytes); MAX_EXTENSIONS],
    len: u8,
}

impl Extensions {
    /// Appends one; `false` (and nothing stored) when full.
    pub fn push(&mut self, id: u8, value: Bytes) -> bool {
        let i = self.len as usize;
        if i == MAX_EXTENSIONS {
            return false;
        }
        self.items[i] = (id, value);
        self.len += 1;
        true
    }

    pub fn iter(&self) -> impl Iterator<Item = &(u8, Bytes)> {
        self.items[..self.len as usize].iter()
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn get(&self, id: u8) -> Option<&Bytes> {
        self.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }
}

/// The fields of an RTP header that forwarding reads or rewrites. CSRCs are not forwarded: an
/// SFU relays single sources, and browsers do not send them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RtpHeader {
    pub marker: bool,
    pub payload_type: u8,
    pub sequence_number: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub extensions: Extensions,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RtpPacket {
    pub header: RtpHeader,
    pub payload: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("shorter than its header")]
    TooShort,
    #[error("RTP version is not 2")]
    BadVersion,
    #[error("malformed header extension")]
    BadExtension,
    #[error("padding longer than the payload")]
    BadPadding,
}

impl RtpPacket {
    /// Parses a packet, sharing `buf` for the payload and the extension values.
    pub fn parse(buf: Bytes) -> Result<RtpPacket, ParseError> {
        let b = &buf[..];
        if b.len() < 12 {
            return Err(ParseError::TooShort);
        }
        if b[0] >> 6 != 2 {
            return Err(ParseError::BadVersion);
        }
        let padding = b[0] & 0x20 != 0;
        let has_extension = b[0] & 0x10 != 0;
        let csrc_count = (b[0] & 0x0f) as usize;
        let mut header = RtpHeader {
            marker: b[1] & 0x80 != 0,
            payload_type: b[1] & 0x7f,
            sequence_number: u16::from_be_bytes([b[2], b[3]]),
            timestamp: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            ssrc: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            extensions: Extensions::default(),
        };
        let mut offset = 12 + 4 * csrc_count;
        if b.len() < offset {
            return Err(ParseError::TooShort);
        }
        if has_extension {
            if b.len() < offset + 4 {
                return Err(ParseError::TooShort);
            }
            let profile = u16::from_be_bytes([b[offset], b[offset + 1]]);
            let words = u16::from_be_bytes([b[offset + 2], b[offset + 3]]) as usize;
            let start = offset + 4;
            let end = start + 4 * words;
            if b.len() < end {
                return Err(ParseError::TooShort);
            }
            parse_extensions(&buf, profile, start, end, &mut header.extensions)?;
            offset = end;
        }
        let mut end = b.len();
        if padding {
            let pad = *b.last().unwrap_or(&0) as usize;
            if pad == 0 || offset + pad > end {
                return Err(ParseError::BadPadding);
            }
            end -= pad;
        }
        Ok(RtpPacket {
            header,
            payload: buf.slice(offset..end),
        })
    }
}

/// RFC 8285: one-byte (0xBEDE) and two-byte (0x100x) header extensions.
fn parse_extensions(
    buf: &Bytes,
    profile: u16,
    mut i: usize,
    end: usize,
    out: &mut Extensions,
) -> Result<(), ParseError> {
    let one_byte = profile == 0xBEDE;
    let two_byte = profile & 0xFFF0 == 0x1000;
    if !one_byte && !two_byte {
        return Ok(()); // another profile: not RFC 8285, nothing to map
    }
    while i < end {
        let b = buf[i];
        if b == 0 {
            i += 1; // padding
            continue;
        }
        let (id, len, head) = if one_byte {
            let id = b >> 4;
            if id == 15 {
                break; // reserved: stop reading
            }
            (id, (b & 0x0f) as usize + 1, 1)
        } else {
            if i + 1 >= end {
                return Err(ParseError::BadExtension);
            }
            (b, buf[i + 1] as usize, 2)
        };
        let start = i + head;
        if start + len > end {
            return Err(ParseError::BadExtension);
        }
        out.push(id, buf.slice(start..start + len));
        i = start + len;
    }
    Ok(())
}

/// Writes a header in wire form (one-byte extensions where they fit, two-byte otherwise) into
/// `out`, returning its length. For tests and benchmarks: production hands the header to webrtc.
pub fn write_header(h: &RtpHeader, out: &mut Vec<u8>) {
    out.clear();
    let ext = !h.extensions.is_empty();
    out.push(0x80 | if ext { 0x10 } else { 0 });
    out.push((if h.marker { 0x80 } else { 0 }) | (h.payload_type & 0x7f));
    out.extend_from_slice(&h.sequence_number.to_be_bytes());
    out.extend_from_slice(&h.timestamp.to_be_bytes());
    out.extend_from_slice(&h.ssrc.to_be_bytes());
    if ext {
        let one_byte = h
            .extensions
            .iter()
            .all(|(id, v)| (1..15).contains(id) && (1..=16).contains(&v.len()));
        let start = out.len();
        out.extend_from_slice(&(if one_byte { 0xBEDEu16 } else { 0x1000 }).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        for (id, v) in h.extensions.iter() {
            if one_byte {
                out.push((id << 4) | (v.len() as u8 - 1));
            } else {
                out.push(*id);
                out.push(v.len() as u8);
            }
            out.extend_from_slice(v);
        }
        while !(out.len() - start).is_multiple_of(4) {
            out.push(0);
        }
        let words = ((out.len() - start - 4) / 4) as u16;
        out[start + 2..start + 4].copy_from_slice(&words.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet_bytes(exts: &[(u8, &[u8])], payload: &[u8]) -> Bytes {
        let mut h = RtpHeader {
            marker: true,
            payload_type: 96,
            sequence_number: 65535,
            timestamp: 0xFFFF_FFF0,
            ssrc: 0xDEAD_BEEF,
            ..Default::default()
        };
        for (id, v) in exts {
            h.extensions.push(*id, Bytes::copy_from_slice(v));
        }
        let mut out = Vec::new();
        write_header(&h, &mut out);
        out.extend_from_slice(payload);
        Bytes::from(out)
    }

    #[test]
    fn parses_what_it_writes() {
        let buf = packet_bytes(&[(1, &[0xAA]), (3, &[1, 2, 3])], b"payload");
        let p = RtpPacket::parse(buf).unwrap();
        assert!(p.header.marker);
        assert_eq!(p.header.payload_type, 96);
        assert_eq!(p.header.sequence_number, 65535);
        assert_eq!(p.header.timestamp, 0xFFFF_FFF0);
        assert_eq!(p.header.ssrc, 0xDEAD_BEEF);
        assert_eq!(p.header.extensions.get(1).unwrap().as_ref(), &[0xAA]);
        assert_eq!(p.header.extensions.get(3).unwrap().as_ref(), &[1, 2, 3]);
        assert_eq!(p.payload.as_ref(), b"payload");
    }

    #[test]
    fn two_byte_extensions_and_padding() {
        // Two-byte profile, id 20 with 2 bytes, then RTP padding of 3 bytes.
        let mut b = vec![0xB0, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2];
        b.extend_from_slice(&[0x10, 0x00, 0, 1, 20, 2, 9, 9]);
        b.extend_from_slice(b"xy");
        b.extend_from_slice(&[0, 0, 3]);
        let p = RtpPacket::parse(Bytes::from(b)).unwrap();
        assert_eq!(p.header.extensions.get(20).unwrap().as_ref(), &[9, 9]);
        assert_eq!(p.payload.as_ref(), b"xy");
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        assert_eq!(
            RtpPacket::parse(Bytes::from_static(&[0x80; 5])),
            Err(ParseError::TooShort)
        );
        assert_eq!(
            RtpPacket::parse(Bytes::from_static(&[0x40; 12])),
            Err(ParseError::BadVersion)
        );
        // 15 CSRCs announced, none present.
        assert_eq!(
            RtpPacket::parse(Bytes::from_static(&[0x8F; 12])),
            Err(ParseError::TooShort)
        );
        // Extension header claims 10 words.
        let mut b = vec![0x90, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0xBE, 0xDE, 0, 10];
        assert_eq!(
            RtpPacket::parse(Bytes::from(b.clone())),
            Err(ParseError::TooShort)
        );
        // One-byte extension whose length runs past the block.
        b[15] = 1;
        b.extend_from_slice(&[0x1F, 0, 0, 0]);
        assert_eq!(
            RtpPacket::parse(Bytes::from(b)),
            Err(ParseError::BadExtension)
        );
        // Padding count larger than the packet.
        let b = vec![0xA0, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 1, 200];
        assert_eq!(
            RtpPacket::parse(Bytes::from(b)),
            Err(ParseError::BadPadding)
        );
        // Every prefix of a valid packet, and arbitrary bytes, parse or fail cleanly.
        let good = packet_bytes(&[(2, &[1, 2])], b"abc");
        for n in 0..good.len() {
            let _ = RtpPacket::parse(good.slice(..n));
        }
        let mut x: u32 = 12345;
        for _ in 0..10_000 {
            let len = (x % 40) as usize;
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = RtpPacket::parse(Bytes::from(junk));
        }
    }

    #[test]
    fn extensions_beyond_capacity_are_refused() {
        let mut e = Extensions::default();
        for i in 0..MAX_EXTENSIONS as u8 {
            assert!(e.push(i + 1, Bytes::new()));
        }
        assert!(!e.push(14, Bytes::new()));
        assert_eq!(e.len(), MAX_EXTENSIONS);
    }
}
