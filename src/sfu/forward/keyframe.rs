//! Where a decoder can start: the first packet of a keyframe, per codec payload format.

/// Codecs the SFU forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Opus,
    Vp8,
    Vp9,
    H264,
}

impl Codec {
    /// From a MIME type such as `video/VP8` (case-insensitive).
    pub fn from_mime(mime: &str) -> Option<Codec> {
        let (_, name) = mime.split_once('/')?;
        match name.to_ascii_lowercase().as_str() {
            "opus" => Some(Codec::Opus),
            "vp8" => Some(Codec::Vp8),
            "vp9" => Some(Codec::Vp9),
            "h264" => Some(Codec::H264),
            _ => None,
        }
    }

    pub fn is_video(self) -> bool {
        !matches!(self, Codec::Opus)
    }

    pub fn clock_rate(self) -> u32 {
        match self {
            Codec::Opus => 48_000,
            _ => 90_000,
        }
    }

    /// Whether this payload starts a keyframe. Audio: always true (any packet can start).
    pub fn starts_keyframe(self, payload: &[u8]) -> bool {
        match self {
            Codec::Opus => true,
            Codec::Vp8 => vp8_keyframe_start(payload),
            Codec::Vp9 => vp9_keyframe_start(payload),
            Codec::H264 => h264_keyframe_start(payload),
        }
    }
}

/// RFC 7741: the payload descriptor, then the VP8 header whose P bit is 0 on keyframes.
fn vp8_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    // S=1 (start of partition) and PID=0 (first partition).
    if b0 & 0x10 == 0 || b0 & 0x07 != 0 {
        return false;
    }
    let mut i = 1;
    if b0 & 0x80 != 0 {
        let Some(&x) = p.get(1) else { return false };
        i = 2;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits (M flag).
            let Some(&pid) = p.get(i) else { return false };
            i += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            i += 1; // TID/Y/KEYIDX
        }
    }
    p.get(i).is_some_and(|h| h & 0x01 == 0)
}

/// RFC 9628: P=0 (no inter-picture prediction) on the first packet of a frame (B=1), and for
/// spatial layers only the base layer (SID 0) starts a keyframe.
fn vp9_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    let inter_predicted = b0 & 0x40 != 0;
    let begins_frame = b0 & 0x08 != 0;
    if inter_predicted || !begins_frame {
        return false;
    }
    if b0 & 0x20 != 0 {
        // L: layer indices follow the picture id.
        let mut i = 1;
        if b0 & 0x80 != 0 {
            let Some(&pid) = p.get(1) else { return false };
            i += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        let Some(&layers) = p.get(i) else {
            return false;
        };
        return (layers >> 1) & 0x07 == 0;
    }
    true
}

/// RFC 6184: an IDR slice or SPS, alone, in a STAP-A, or at the start of an FU-A.
fn h264_keyframe_start(p: &[u8]) -> bool {
    let is_key = |nal_type: u8| nal_type == 5 || nal_type == 7;
    let Some(&b0) = p.first() else { return false };
    match b0 & 0x1F {
        24 => {
            // STAP-A: 16-bit sizes, each followed by a NAL unit.
            let mut i = 1;
            while i + 2 < p.len() {
                let size = u16::from_be_bytes([p[i], p[i + 1]]) as usize;
                if size == 0 || i + 2 + size > p.len() {
                    return false;
                }
                if is_key(p[i + 2] & 0x1F) {
                    return true;
                }
                i += 2 + size;
            }
            false
        }
        28 => p
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && is_key(fu & 0x1F)),
        t => is_key(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8() {
        assert!(Codec::Vp8.starts_keyframe(&[0x10, 0x00])); // S=1, P=0
        assert!(!Codec::Vp8.starts_keyframe(&[0x10, 0x01])); // interframe
        assert!(!Codec::Vp8.starts_keyframe(&[0x00, 0x00])); // not a partition start
        // X, I with 15-bit picture id, L, T: header at byte 6.
        assert!(Codec::Vp8.starts_keyframe(&[0x90, 0xE0, 0x80, 0x01, 0x05, 0x20, 0x9c]));
        assert!(!Codec::Vp8.starts_keyframe(&[0x90, 0xE0, 0x80, 0x01, 0x05, 0x20, 0x9d]));
        assert!(!Codec::Vp8.starts_keyframe(&[0x90, 0xE0])); // truncated
        assert!(!Codec::Vp8.starts_keyframe(&[]));
    }

    #[test]
    fn vp9() {
        assert!(Codec::Vp9.starts_keyframe(&[0x08])); // B=1, P=0
        assert!(!Codec::Vp9.starts_keyframe(&[0x48])); // P=1
        assert!(!Codec::Vp9.starts_keyframe(&[0x00])); // not the frame start
        assert!(Codec::Vp9.starts_keyframe(&[0xA8, 0x05, 0x00])); // I, L, SID 0
        assert!(!Codec::Vp9.starts_keyframe(&[0xA8, 0x05, 0x02])); // SID 1
        assert!(!Codec::Vp9.starts_keyframe(&[0xA8]));
    }

    #[test]
    fn h264() {
        assert!(Codec::H264.starts_keyframe(&[0x65, 0x88])); // IDR
        assert!(Codec::H264.starts_keyframe(&[0x67, 0x42])); // SPS
        assert!(!Codec::H264.starts_keyframe(&[0x41, 0x9a])); // non-IDR slice
        // STAP-A with SPS and PPS.
        assert!(Codec::H264.starts_keyframe(&[0x78, 0, 2, 0x67, 0x42, 0, 2, 0x68, 0xce]));
        assert!(!Codec::H264.starts_keyframe(&[0x78, 0, 2, 0x41, 0x42, 0, 9, 0x68]));
        assert!(Codec::H264.starts_keyframe(&[0x7c, 0x85])); // FU-A start of IDR
        assert!(!Codec::H264.starts_keyframe(&[0x7c, 0x05])); // FU-A continuation
        assert!(!Codec::H264.starts_keyframe(&[0x7c]));
    }

    #[test]
    fn mime_types() {
        assert_eq!(Codec::from_mime("video/VP8"), Some(Codec::Vp8));
        assert_eq!(Codec::from_mime("audio/opus"), Some(Codec::Opus));
        assert_eq!(Codec::from_mime("video/H264"), Some(Codec::H264));
        assert_eq!(Codec::from_mime("video/AV1"), None);
        assert!(Codec::Opus.starts_keyframe(&[]));
    }
}
