//! Just enough STUN (RFC 8489) to route a datagram: its class and the USERNAME's local ufrag.
//! Full parsing and the integrity check are the ICE agent's; this only picks the connection.

/// The fixed STUN magic cookie, bytes 4..8 of every STUN message.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const HEADER_LEN: usize = 20;
const ATTR_USERNAME: u16 = 0x0006;

/// Whether `b` looks like a STUN message (RFC 7983: first byte 0..=3, then the magic cookie).
pub fn is_stun(b: &[u8]) -> bool {
    b.len() >= HEADER_LEN && b[0] < 4 && b[4..8] == MAGIC_COOKIE
}

/// The local ufrag (the part of USERNAME before ':') of a STUN message whose USERNAME names
/// this server first, as a binding request to it does; `None` for anything else, malformed
/// input included.
pub fn local_ufrag(b: &[u8]) -> Option<&[u8]> {
    if !is_stun(b) {
        return None;
    }
    let declared = u16::from_be_bytes([b[2], b[3]]) as usize;
    let end = HEADER_LEN.checked_add(declared)?.min(b.len());
    let mut i = HEADER_LEN;
    while i + 4 <= end {
        let kind = u16::from_be_bytes([b[i], b[i + 1]]);
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        if i + 4 + len > end {
            return None;
        }
        let value = &b[i + 4..i + 4 + len];
        if kind == ATTR_USERNAME {
            let colon = value.iter().position(|&c| c == b':')?;
            return Some(&value[..colon]).filter(|u| !u.is_empty());
        }
        // Attributes are padded to a multiple of four bytes.
        i += 4 + len.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binding request carrying USERNAME `user` and one other attribute before it.
    fn binding_request(user: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        // PRIORITY (0x0024), 4 bytes.
        attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        attrs.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        attrs.extend_from_slice(&(user.len() as u16).to_be_bytes());
        attrs.extend_from_slice(user);
        while !attrs.len().is_multiple_of(4) {
            attrs.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]); // transaction id
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn reads_the_local_ufrag_of_a_binding_request() {
        let m = binding_request(b"sfuAbC:browserXyz");
        assert!(is_stun(&m));
        assert_eq!(local_ufrag(&m), Some(&b"sfuAbC"[..]));
        // Odd-length USERNAME: padding is skipped correctly.
        let m = binding_request(b"abc:d");
        assert_eq!(local_ufrag(&m), Some(&b"abc"[..]));
    }

    #[test]
    fn other_traffic_and_garbage_route_nowhere() {
        // RTP, DTLS, a USERNAME without a colon, truncations, random bytes.
        assert_eq!(local_ufrag(&[0x80; 40]), None);
        assert_eq!(local_ufrag(&[22, 254, 253, 0, 0]), None);
        assert_eq!(local_ufrag(&binding_request(b"nocolon")), None);
        assert_eq!(local_ufrag(&binding_request(b":remote")), None);
        let good = binding_request(b"local:remote");
        for n in 0..good.len() {
            let _ = local_ufrag(&good[..n]);
        }
        let mut lying = good.clone();
        lying[2] = 0xFF; // declared length far beyond the datagram
        assert_eq!(local_ufrag(&lying), Some(&b"local"[..]));
        let mut x: u32 = 99;
        for _ in 0..20_000 {
            let len = (x % 64) as usize;
            let mut junk: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            if junk.len() >= 8 {
                junk[0] &= 3;
                junk[4..8].copy_from_slice(&MAGIC_COOKIE);
            }
            let _ = local_ufrag(&junk);
        }
    }
}
