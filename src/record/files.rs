//! The built-in recorders: one file per track that plays as it is. Opus goes into Ogg (the
//! `ogg` crate does the paging), VP8 and VP9 into IVF (a 32-byte header and a 12-byte header
//! per frame), H264 into an Annex B stream. Each file is written as `<name>.part` and renamed
//! when the track ends, so a file without `.part` is complete.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::sink::{Frame, MediaSink, TrackMeta};
use crate::sfu::forward::Codec;

/// `<dir>/<room>/<userId>-<trackId>-<UTC start>.<ext>`, each part made safe for a file name.
pub fn track_path(dir: &Path, meta: &TrackMeta) -> PathBuf {
    let ext = match meta.codec {
        Codec::Opus => "ogg",
        Codec::Vp8 | Codec::Vp9 => "ivf",
        Codec::H264 => "h264",
    };
    recording_path(dir, meta, &file_safe(&meta.track_id), ext)
}

/// `<dir>/<room>/<userId>-<what>-<UTC start>.<ext>`: a recording of `meta`'s publisher.
pub(super) fn recording_path(dir: &Path, meta: &TrackMeta, what: &str, ext: &str) -> PathBuf {
    let name = format!(
        "{}-{what}-{}.{ext}",
        file_safe(&meta.user),
        utc_stamp(meta.started)
    );
    dir.join(file_safe(&meta.room)).join(name)
}

/// Path separators, control characters and a leading dot replaced by `_`; never empty. A
/// name that had to change gets a hash of the original, so two rooms (or users) never share a
/// folder (or file name) because their names differ only in what was replaced or cut.
pub(super) fn file_safe(s: &str) -> String {
    // At most 60 bytes (whole characters) plus the hash: user, track and stamp stay under the
    // 255-byte limit of a file name.
    let mut end = 0;
    for (i, c) in s.char_indices() {
        if i + c.len_utf8() > 60 {
            break;
        }
        end = i + c.len_utf8();
    }
    let mut out: String = s[..end]
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() || c == ':' {
                '_'
            } else {
                c
            }
        })
        .collect();
    if out.is_empty() || out.starts_with('.') {
        out.insert(0, '_');
    }
    if out != s {
        let digest = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
        let hash: String = (digest.as_ref()[..4].iter())
            .map(|b| format!("{b:02x}"))
            .collect();
        out.push('~');
        out.push_str(&hash);
    }
    out
}

/// `20261201T203500Z`: sortable, no characters a shell or ffmpeg treats specially.
fn utc_stamp(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The file sink for a track's codec, created under the `.part` name of `path` (see
/// [`track_path`]). Returns the path the file will have (a new one: see [`create_unique`]).
pub fn track_file(path: &Path, meta: &TrackMeta) -> std::io::Result<(PathBuf, Box<dyn MediaSink>)> {
    let (path, part, file) = create_unique(path, false)?;
    let out = Output {
        file: BufWriter::new(file),
        part,
        path: path.clone(),
    };
    let sink: Box<dyn MediaSink> = match meta.codec {
        Codec::Opus => Box::new(OggOpus::new(out, meta.channels)?),
        Codec::Vp8 => Box::new(Ivf::new(out, *b"VP80", meta.clock_rate)?),
        Codec::Vp9 => Box::new(Ivf::new(out, *b"VP90", meta.clock_rate)?),
        Codec::H264 => Box::new(AnnexB { out, frames: 0 }),
    };
    Ok((path, sink))
}

/// Creates `<path>.part` for a recording that will become `path`, or `<stem>-2.<ext>` and so
/// on when that name is taken (a recording started again within the same second): two
/// recordings never write one file. Returns the final path, the `.part` path and the file.
pub fn create_unique(path: &Path, readable: bool) -> std::io::Result<(PathBuf, PathBuf, File)> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let stem = path
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let ext = path
        .extension()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    for n in 1..=100 {
        let candidate = match n {
            1 => path.to_path_buf(),
            n => path.with_file_name(format!("{stem}-{n}.{ext}")),
        };
        let part = part_path(&candidate);
        if candidate.exists() {
            continue;
        }
        let opened = std::fs::OpenOptions::new()
            .read(readable)
            .write(true)
            .create_new(true)
            .open(&part);
        match opened {
            Ok(file) => return Ok((candidate, part, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free file name"))
}

fn part_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    path.with_file_name(name)
}

/// A file being written, and where it goes when complete.
struct Output {
    file: BufWriter<File>,
    part: PathBuf,
    path: PathBuf,
}

impl Output {
    /// Renames the finished file into place; one without a single frame is removed instead
    /// (nothing to play).
    fn complete(mut self, frames: u64) -> std::io::Result<Option<PathBuf>> {
        if frames == 0 {
            drop(self.file);
            std::fs::remove_file(&self.part)?;
            return Ok(None);
        }
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        std::fs::rename(&self.part, &self.path)?;
        Ok(Some(self.path))
    }
}

/// VP8 / VP9 in IVF, timestamps in RTP clock units (timebase 1/clock rate). The header's
/// length field gets the duration in timebase units (ffmpeg writes and reads it so; libvpx's
/// tools call it a frame count, which only equals the duration at a timebase of one frame).
struct Ivf {
    out: Output,
    frames: u32,
    first_last: Option<(u64, u64)>,
}

impl Ivf {
    fn new(mut out: Output, fourcc: [u8; 4], clock_rate: u32) -> std::io::Result<Self> {
        let mut header = Vec::with_capacity(32);
        header.extend_from_slice(b"DKIF");
        header.extend_from_slice(&0u16.to_le_bytes()); // version
        header.extend_from_slice(&32u16.to_le_bytes()); // header size
        header.extend_from_slice(&fourcc);
        header.extend_from_slice(&0u16.to_le_bytes()); // width: set from the first keyframe
        header.extend_from_slice(&0u16.to_le_bytes()); // height
        header.extend_from_slice(&clock_rate.to_le_bytes()); // timebase denominator
        header.extend_from_slice(&1u32.to_le_bytes()); // timebase numerator
        header.extend_from_slice(&0u32.to_le_bytes()); // length: set at the end
        header.extend_from_slice(&0u32.to_le_bytes()); // unused
        out.file.write_all(&header)?;
        Ok(Ivf {
            out,
            frames: 0,
            first_last: None,
        })
    }
}

/// Width and height of a VP8 keyframe (RFC 6386 9.1), if `data` is one.
pub(super) fn vp8_size(data: &[u8]) -> Option<(u16, u16)> {
    if data.len() < 10 || data[0] & 1 != 0 || data[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([data[6], data[7]]) & 0x3fff;
    let h = u16::from_le_bytes([data[8], data[9]]) & 0x3fff;
    Some((w, h))
}

impl MediaSink for Ivf {
    fn frame(&mut self, frame: &Frame<'_>) -> std::io::Result<()> {
        if self.frames == 0
            && let Some((w, h)) = vp8_size(frame.data)
        {
            let file = &mut self.out.file;
            file.seek(SeekFrom::Start(12))?;
            file.write_all(&w.to_le_bytes())?;
            file.write_all(&h.to_le_bytes())?;
            file.seek(SeekFrom::End(0))?;
        }
        let file = &mut self.out.file;
        file.write_all(&(frame.data.len() as u32).to_le_bytes())?;
        file.write_all(&frame.timestamp.to_le_bytes())?;
        file.write_all(frame.data)?;
        self.frames += 1;
        let first = self.first_last.map_or(frame.timestamp, |(first, _)| first);
        self.first_last = Some((first, frame.timestamp));
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> std::io::Result<Option<PathBuf>> {
        // First to last frame plus one average frame interval, as ffmpeg computes it.
        let duration = match self.first_last {
            Some((first, last)) if self.frames > 1 => {
                let span = last - first;
                span + span / (self.frames as u64 - 1)
            }
            _ => 0,
        };
        let file = &mut self.out.file;
        file.seek(SeekFrom::Start(24))?;
        file.write_all(&(duration.min(u32::MAX as u64) as u32).to_le_bytes())?;
        self.out.complete(self.frames as u64)
    }
}

/// H264 access units as they come out of the depacketizer: an Annex B stream.
struct AnnexB {
    out: Output,
    frames: u64,
}

impl MediaSink for AnnexB {
    fn frame(&mut self, frame: &Frame<'_>) -> std::io::Result<()> {
        self.frames += 1;
        self.out.file.write_all(frame.data)
    }

    fn finish(self: Box<Self>) -> std::io::Result<Option<PathBuf>> {
        self.out.complete(self.frames)
    }
}

/// Opus in Ogg (RFC 7845): the ID and comment headers, then one packet per page, each page's
/// granule position the sample count at its packet's end (48 kHz). A packet is written when
/// the next one arrives, so that the last can be marked as the end of the stream.
struct OggOpus {
    writer: ogg::PacketWriter<'static, BufWriter<File>>,
    part: PathBuf,
    path: PathBuf,
    held: Option<(Vec<u8>, u64)>,
}

const OGG_SERIAL: u32 = 0x5357_4254;

impl OggOpus {
    fn new(out: Output, channels: u16) -> std::io::Result<Self> {
        let Output { file, part, path } = out;
        let mut writer = ogg::PacketWriter::new(file);
        let head = opus_head(channels);
        writer.write_packet(head, OGG_SERIAL, ogg::PacketWriteEndInfo::EndPage, 0)?;
        let vendor = b"switchboard";
        let mut tags = Vec::with_capacity(16 + vendor.len());
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor);
        tags.extend_from_slice(&0u32.to_le_bytes()); // no comments
        writer.write_packet(tags, OGG_SERIAL, ogg::PacketWriteEndInfo::EndPage, 0)?;
        Ok(OggOpus {
            writer,
            part,
            path,
            held: None,
        })
    }

    fn write_held(&mut self, end: u64, last: bool) -> std::io::Result<()> {
        if let Some((data, _)) = self.held.take() {
            let info = if last {
                ogg::PacketWriteEndInfo::EndStream
            } else {
                ogg::PacketWriteEndInfo::EndPage
            };
            self.writer.write_packet(data, OGG_SERIAL, info, end)?;
        }
        Ok(())
    }
}

impl MediaSink for OggOpus {
    fn frame(&mut self, frame: &Frame<'_>) -> std::io::Result<()> {
        // The held packet ends where this one starts (a gap in timestamps is silence the
        // decoder fills, as a gap in the granule positions says).
        if let Some((held, start)) = &self.held {
            let end = (*start + opus_samples(held))
                .min(frame.timestamp)
                .max(*start);
            self.write_held(end, false)?;
        }
        self.held = Some((frame.data.to_vec(), frame.timestamp));
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> std::io::Result<Option<PathBuf>> {
        // Not a single packet: no file (nothing to play).
        let packets = u64::from(self.held.is_some());
        if let Some((held, start)) = &self.held {
            let end = start + opus_samples(held);
            self.write_held(end, true)?;
        }
        let OggOpus {
            writer, part, path, ..
        } = *self;
        let file = writer.into_inner();
        Output { file, part, path }.complete(packets)
    }
}

/// Opus's identification header (RFC 7845 5.1): the Ogg stream's first packet, and WebM's
/// CodecPrivate for A_OPUS.
pub(super) fn opus_head(channels: u16) -> Vec<u8> {
    let mut head = Vec::with_capacity(19);
    head.extend_from_slice(b"OpusHead");
    head.push(1); // version
    head.push(channels.clamp(1, 2) as u8);
    head.extend_from_slice(&0u16.to_le_bytes()); // pre-skip
    head.extend_from_slice(&48_000u32.to_le_bytes()); // input sample rate (informational)
    head.extend_from_slice(&0i16.to_le_bytes()); // output gain
    head.push(0); // channel mapping family 0 (mono or stereo)
    head
}

/// Samples (at 48 kHz) in an Opus packet, from its TOC byte (RFC 6716 3.1).
fn opus_samples(packet: &[u8]) -> u64 {
    let Some(&toc) = packet.first() else {
        return 0;
    };
    let config = toc >> 3;
    let frame = match config {
        0..=11 => [480, 960, 1920, 2880][(config % 4) as usize], // SILK: 10/20/40/60 ms
        12..=15 => [480, 960][(config % 2) as usize],            // hybrid: 10/20 ms
        _ => [120, 240, 480, 960][(config % 4) as usize],        // CELT: 2.5/5/10/20 ms
    };
    let frames = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => packet.get(1).map_or(1, |b| (b & 0x3f) as u64),
    };
    frame * frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_durations_come_from_the_toc() {
        assert_eq!(opus_samples(&[0xFC]), 960, "CELT 20 ms, one frame");
        assert_eq!(opus_samples(&[0x70]), 480, "hybrid 10 ms");
        assert_eq!(opus_samples(&[0x78]), 960, "hybrid 20 ms");
        assert_eq!(
            opus_samples(&[0x0B << 3 | 1]),
            2 * 2880,
            "SILK 60 ms, two frames"
        );
        assert_eq!(opus_samples(&[0xFB, 0x03]), 3 * 960, "code 3: three frames");
        assert_eq!(opus_samples(&[]), 0);
    }

    #[test]
    fn names_are_safe_and_sortable() {
        let meta = TrackMeta {
            room: "../etc".into(),
            user: "a/b".into(),
            track_id: "cam:1".into(),
            codec: Codec::Vp8,
            clock_rate: 90_000,
            channels: 0,
            started: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_157_300),
        };
        let p = track_path(Path::new("/rec"), &meta);
        let hash = |s: &str| file_safe(s).rsplit_once('~').unwrap().1.to_owned();
        assert_eq!(hash("a/b").len(), 8);
        let expected = format!(
            "/rec/_.._etc~{}/a_b~{}-cam_1~{}-20261201T203500Z.ivf",
            hash("../etc"),
            hash("a/b"),
            hash("cam:1")
        );
        assert_eq!(p, Path::new(&expected));
    }

    #[test]
    fn a_recording_without_a_frame_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("switchboard-empty-{}", std::process::id()));
        for codec in [Codec::Opus, Codec::Vp8, Codec::H264] {
            let meta = TrackMeta {
                room: "r".into(),
                user: "u".into(),
                track_id: format!("{codec:?}"),
                codec,
                clock_rate: codec.clock_rate(),
                channels: 2,
                started: SystemTime::now(),
            };
            let (_, sink) = track_file(&track_path(&dir, &meta), &meta).unwrap();
            assert!(
                part_path(&track_path(&dir, &meta)).exists(),
                "written as .part"
            );
            assert_eq!(sink.finish().unwrap(), None);
            let left: Vec<_> = std::fs::read_dir(dir.join("r")).unwrap().collect();
            assert!(left.is_empty(), "{codec:?}: {left:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_recording_started_again_within_the_second_gets_a_file_of_its_own() {
        let dir = std::env::temp_dir().join(format!("switchboard-unique-{}", std::process::id()));
        let meta = TrackMeta {
            room: "r".into(),
            user: "u".into(),
            track_id: "t".into(),
            codec: Codec::Opus,
            clock_rate: 48_000,
            channels: 2,
            started: SystemTime::now(),
        };
        let (first, _a) = track_file(&track_path(&dir, &meta), &meta).unwrap();
        let (second, _b) = track_file(&track_path(&dir, &meta), &meta).unwrap();
        assert_ne!(first, second);
        let name = second.file_name().unwrap().to_str().unwrap();
        assert!(name.ends_with("-2.ogg"), "{name}");
        let long = "é".repeat(100); // 200 bytes
        let safe = file_safe(&long);
        assert!(
            safe.len() <= 69 && safe.starts_with(&"é".repeat(30)),
            "{safe}"
        );
        assert_ne!(file_safe(&"é".repeat(101)), safe, "cut names stay apart");
        assert_ne!(file_safe("a/b"), file_safe("a_b"));
        assert_eq!(file_safe("room-1"), "room-1");
        assert!(file_safe("..").starts_with("_.."));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
