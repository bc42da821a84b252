//! One file per participant: its audio and video tracks together in WebM (Opus, VP8/VP9),
//! in sync. Each track's writer thread hands its frames to the participant's muxer; frames are
//! placed on one timeline by the publisher's capture clock (its RTCP sender reports map every
//! track's RTP timestamps to the same NTP clock), or, when a track had no sender report by the
//! time the file starts, by arrival at the server. The EBML is written by `webm-iterable`.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use webm_iterable::WebmWriter;
use webm_iterable::WriteOptions;
use webm_iterable::matroska_spec::{Master, MatroskaSpec};

use super::sink::{Frame, MediaSink, TrackMeta};
use crate::sfu::forward::Codec;

/// How long frames are held before the file starts, so that every track of the participant
/// is known and has had a sender report.
const SETTLE_SECONDS: f64 = 1.5;
/// Frames are written in time order once every track has reached them, or once they are this
/// much older than the newest frame (a track that went quiet holds nothing back longer).
const MAX_HOLD_SECONDS: f64 = 3.0;
/// Frames held at most (~20 s of a participant's audio and video): frames whose timestamps do
/// not advance never fall MAX_HOLD_SECONDS behind, and are written past this bound instead.
const MAX_PENDING_FRAMES: usize = 2000;

/// Media of one track before the others start is left out if it is at most this long.
const MAX_LEAD_SECONDS: f64 = 1.0;
/// Written into the header's Duration and replaced at the end (recognised before it is).
const DURATION_PLACEHOLDER: f64 = 1.0e12;
/// A new cluster at least this often (milliseconds).
const CLUSTER_MS: u64 = 1000;

/// Whether a codec can go into a WebM participant file.
pub fn supports(codec: Codec) -> bool {
    matches!(codec, Codec::Opus | Codec::Vp8 | Codec::Vp9)
}

/// `<dir>/<room>/<userId>-av-<UTC start>.webm`.
pub fn participant_path(dir: &Path, meta: &TrackMeta) -> PathBuf {
    super::files::recording_path(dir, meta, "av", "webm")
}

/// A participant's file, shared by the sinks of its tracks.
#[derive(Clone)]
pub struct ParticipantFile {
    muxer: Arc<Mutex<Muxer>>,
    done: Arc<std::sync::atomic::AtomicBool>,
    path: PathBuf,
}

struct TrackInfo {
    codec: Codec,
    clock_rate: u32,
    channels: u16,
    size: Option<(u16, u16)>,
    /// Its first frame: (RTP timestamp, capture time, arrival).
    first: Option<(u64, Option<f64>, Instant)>,
    /// A frame with a capture time (the latest): (RTP timestamp, capture time).
    captured: Option<(u64, f64)>,
    /// Its place on the timeline (seconds), once the file started.
    origin: Option<f64>,
    /// Its newest frame's time, and the last timestamp written (each track's must grow).
    latest: Option<f64>,
    last_ms: Option<u64>,
    finished: bool,
}

struct Pending {
    track: usize,
    timestamp: u64,
    keyframe: bool,
    data: Vec<u8>,
}

struct Muxer {
    writer: Option<WebmWriter<BufWriter<File>>>,
    part: PathBuf,
    path: PathBuf,
    tracks: Vec<TrackInfo>,
    /// Frames not written yet (before the start, and the interleaving window).
    pending: Vec<(f64, Pending)>,
    created: Instant,
    /// The timeline's zero in capture or arrival seconds; set when the file starts.
    zero: Option<(f64, bool)>,
    cluster_start: Option<u64>,
    cluster: Vec<MatroskaSpec>,
    /// The file's last timestamp (the duration), and where the header's Duration is.
    end_ms: u64,
    duration_at: Option<u64>,
    written: u64,
    error: Option<String>,
}

impl ParticipantFile {
    /// Creates `<path>.part`; the header is written once the tracks are known.
    pub fn create(path: PathBuf) -> std::io::Result<ParticipantFile> {
        // Readable too: the Duration written in the header is found again by reading it back.
        let (path, part, file) = super::files::create_unique(&path, true)?;
        let file = BufWriter::new(file);
        Ok(ParticipantFile {
            done: Default::default(),
            path: path.clone(),
            muxer: Arc::new(Mutex::new(Muxer {
                writer: Some(WebmWriter::new(file)),
                part,
                path,
                tracks: Vec::new(),
                pending: Vec::new(),
                created: Instant::now(),
                zero: None,
                cluster_start: None,
                cluster: Vec::new(),
                end_ms: 0,
                duration_at: None,
                written: 0,
                error: None,
            })),
        })
    }

    /// A sink for one more of the participant's tracks; `None` once the file has started
    /// (a track published later is not in it) or for a codec WebM does not carry.
    pub fn track_sink(&self, meta: &TrackMeta) -> Option<Box<dyn MediaSink>> {
        if !supports(meta.codec) {
            return None;
        }
        let mut m = self.muxer.lock().unwrap_or_else(|e| e.into_inner());
        // One-byte track numbers in the blocks: at most 126 tracks.
        if m.zero.is_some() || m.tracks.len() >= 126 {
            return None;
        }
        m.tracks.push(TrackInfo {
            codec: meta.codec,
            clock_rate: meta.clock_rate,
            channels: meta.channels,
            size: None,
            first: None,
            captured: None,
            origin: None,
            latest: None,
            last_ms: None,
            finished: false,
        });
        Some(Box::new(TrackSink {
            file: self.clone(),
            track: m.tracks.len() - 1,
        }))
    }

    /// Where the file goes when complete.
    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Whether every track's sink has finished (the file is complete or gone). Read without
    /// the muxer's lock, which a writer may hold through a slow disk write.
    pub fn is_done(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::Acquire)
    }
}

struct TrackSink {
    file: ParticipantFile,
    track: usize,
}

impl MediaSink for TrackSink {
    fn frame(&mut self, frame: &Frame<'_>) -> std::io::Result<()> {
        let mut m = self.file.muxer.lock().unwrap_or_else(|e| e.into_inner());
        m.frame(self.track, frame).map_err(std::io::Error::other)
    }

    fn finish(self: Box<Self>) -> std::io::Result<Option<PathBuf>> {
        let mut m = self.file.muxer.lock().unwrap_or_else(|e| e.into_inner());
        m.tracks[self.track].finished = true;
        if m.tracks.iter().all(|t| t.finished) {
            let finished = m.finish();
            self.file
                .done
                .store(true, std::sync::atomic::Ordering::Release);
            finished.map_err(std::io::Error::other)
        } else {
            Ok(None) // the last track to finish completes the file
        }
    }
}

impl Muxer {
    fn frame(&mut self, track: usize, frame: &Frame<'_>) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let t = &mut self.tracks[track];
        if t.first.is_none() {
            t.first = Some((frame.timestamp, frame.capture_time, frame.arrival));
        }
        if let Some(capture) = frame.capture_time {
            t.captured = Some((frame.timestamp, capture));
        }
        if t.size.is_none() && frame.keyframe && t.codec == Codec::Vp8 {
            t.size = super::files::vp8_size(frame.data);
        }
        // A track whose first frame comes after the file started: placed now.
        if let Some((zero, by_capture)) = self.zero
            && self.tracks[track].origin.is_none()
        {
            let now = (self.tracks.iter().filter_map(|t| t.latest)).fold(0.0, f64::max);
            self.tracks[track].origin = Some(match (by_capture, frame.capture_time) {
                (true, Some(capture)) => capture - zero,
                _ => now,
            });
        }
        let pending = Pending {
            track,
            timestamp: frame.timestamp,
            keyframe: frame.keyframe,
            data: frame.data.to_vec(),
        };
        self.queue(pending);
        if self.zero.is_none() {
            let waited = self.created.elapsed().as_secs_f64();
            let all_reported = self.tracks.iter().all(|t| t.captured.is_some());
            if waited < SETTLE_SECONDS && !(all_reported && self.tracks.len() >= 2) {
                return Ok(());
            }
            self.start().inspect_err(|e| self.error = Some(e.clone()))?;
        }
        self.write_due(false)
            .inspect_err(|e| self.error = Some(e.clone()))
    }

    /// A frame's place on the timeline (seconds from the file's zero), once it started.
    fn time_of(&self, track: usize, timestamp: u64) -> Option<f64> {
        let t = &self.tracks[track];
        let origin = t.origin?;
        let (first_ts, ..) = t.first?;
        Some(origin + (timestamp as f64 - first_ts as f64) / t.clock_rate.max(1) as f64)
    }

    /// Fixes each track's place on one timeline and writes the header.
    fn start(&mut self) -> Result<(), String> {
        let by_capture = self
            .tracks
            .iter()
            .all(|t| t.first.is_none() || t.captured.is_some());
        let base = self.created;
        // Where the track's first frame is: its capture time, back-computed along the track's
        // own RTP clock from a frame that has one; or its arrival.
        let place = |t: &TrackInfo| -> Option<f64> {
            let (first_ts, _, arrival) = t.first?;
            if by_capture {
                let (ts, capture) = t.captured?;
                Some(capture - (ts as f64 - first_ts as f64) / t.clock_rate.max(1) as f64)
            } else {
                Some(arrival.saturating_duration_since(base).as_secs_f64())
            }
        };
        let places: Vec<f64> = self.tracks.iter().filter_map(place).collect();
        let earliest = places.iter().copied().fold(f64::INFINITY, f64::min);
        let first_picture = (self.tracks.iter())
            .filter(|t| t.codec.is_video())
            .filter_map(place)
            .fold(f64::INFINITY, f64::min);
        // The file starts with the first picture (a video track starts on a keyframe, so
        // nothing of it is ever cut): audio from before it is left out, unless that is more
        // than MAX_LEAD_SECONDS of it. Without video, at the first frame.
        let zero = if first_picture - earliest <= MAX_LEAD_SECONDS {
            first_picture
        } else {
            earliest
        };
        let zero = if zero.is_finite() { zero } else { 0.0 };
        for i in 0..self.tracks.len() {
            self.tracks[i].origin = place(&self.tracks[i]).map(|p| p - zero);
        }
        self.zero = Some((zero, by_capture));
        let clock = if by_capture {
            "capture clock"
        } else {
            "arrival"
        };
        tracing::debug!(path = %self.path.display(), tracks = self.tracks.len(), "participant file placed by {clock}");
        for (_, p) in std::mem::take(&mut self.pending) {
            self.queue(p);
        }
        self.write_header()
    }

    /// Puts a frame at its place on the timeline, or aside (NaN) until the file starts; a frame
    /// from before the file's start (a track's lead over the others) is left out.
    fn queue(&mut self, p: Pending) {
        match self.time_of(p.track, p.timestamp) {
            Some(at) if at < -0.000_5 => {}
            Some(at) => {
                let latest = &mut self.tracks[p.track].latest;
                *latest = Some(latest.map_or(at, |l: f64| l.max(at)));
                self.pending.push((at, p));
            }
            None => self.pending.push((f64::NAN, p)),
        }
    }

    fn write_header(&mut self) -> Result<(), String> {
        let mut entries = Vec::new();
        for (i, t) in self.tracks.iter().enumerate() {
            let number = i as u64 + 1;
            let mut entry = vec![
                MatroskaSpec::TrackNumber(number),
                MatroskaSpec::TrackUID(number),
                MatroskaSpec::FlagLacing(0),
            ];
            match t.codec {
                Codec::Opus => {
                    entry.push(MatroskaSpec::TrackType(2));
                    entry.push(MatroskaSpec::CodecID("A_OPUS".into()));
                    entry.push(MatroskaSpec::CodecPrivate(super::files::opus_head(
                        t.channels,
                    )));
                    entry.push(MatroskaSpec::CodecDelay(0));
                    entry.push(MatroskaSpec::SeekPreRoll(80_000_000));
                    entry.push(MatroskaSpec::Audio(Master::Full(vec![
                        MatroskaSpec::SamplingFrequency(48_000.0),
                        MatroskaSpec::Channels(t.channels.clamp(1, 2) as u64),
                    ])));
                }
                codec => {
                    entry.push(MatroskaSpec::TrackType(1));
                    let id = if codec == Codec::Vp9 {
                        "V_VP9"
                    } else {
                        "V_VP8"
                    };
                    entry.push(MatroskaSpec::CodecID(id.into()));
                    let (w, h) = t.size.unwrap_or((0, 0));
                    entry.push(MatroskaSpec::Video(Master::Full(vec![
                        MatroskaSpec::PixelWidth(w as u64),
                        MatroskaSpec::PixelHeight(h as u64),
                    ])));
                }
            }
            entries.push(MatroskaSpec::TrackEntry(Master::Full(entry)));
        }
        let w = self.writer.as_mut().ok_or("file closed")?;
        let header = MatroskaSpec::Ebml(Master::Full(vec![
            MatroskaSpec::EbmlVersion(1),
            MatroskaSpec::EbmlReadVersion(1),
            MatroskaSpec::EbmlMaxIdLength(4),
            MatroskaSpec::EbmlMaxSizeLength(8),
            MatroskaSpec::DocType("webm".into()),
            MatroskaSpec::DocTypeVersion(4),
            MatroskaSpec::DocTypeReadVersion(2),
        ]));
        w.write(&header).map_err(|e| e.to_string())?;
        w.write_advanced(
            &MatroskaSpec::Segment(Master::Start),
            WriteOptions::is_unknown_sized_element(),
        )
        .map_err(|e| e.to_string())?;
        let info = MatroskaSpec::Info(Master::Full(vec![
            MatroskaSpec::TimestampScale(1_000_000), // milliseconds
            MatroskaSpec::MuxingApp("switchboard".into()),
            MatroskaSpec::WritingApp("switchboard".into()),
            MatroskaSpec::Duration(DURATION_PLACEHOLDER), // last: its 8 bytes end the Info
        ]));
        w.write(&info).map_err(|e| e.to_string())?;
        // (Not `w.flush()`: that would close the open Segment.)
        self.duration_at = duration_offset(w.get_mut());
        w.write(&MatroskaSpec::Tracks(Master::Full(entries)))
            .map_err(|e| e.to_string())
    }

    /// Writes the pending frames that are due (all of them when `all`), in time order.
    fn write_due(&mut self, all: bool) -> Result<(), String> {
        if self.zero.is_none() {
            // Frames held until the file is placed: the oldest go past the bound.
            let over = self.pending.len().saturating_sub(MAX_PENDING_FRAMES);
            self.pending.drain(..over);
            return Ok(());
        }
        self.pending.sort_by(|a, b| a.0.total_cmp(&b.0));
        let newest = self.pending.last().map_or(0.0, |p| p.0);
        // Every track still sending has reached this time: nothing earlier can come.
        let reached = self
            .tracks
            .iter()
            .filter(|t| !t.finished)
            .filter_map(|t| t.latest)
            .fold(f64::INFINITY, f64::min);
        let due = if all {
            self.pending.len()
        } else {
            let until = reached.min(newest).max(newest - MAX_HOLD_SECONDS);
            // Frames whose timestamps do not advance would otherwise wait for ever.
            let over = self.pending.len().saturating_sub(MAX_PENDING_FRAMES);
            self.pending.partition_point(|p| p.0 <= until).max(over)
        };
        let frames: Vec<(f64, Pending)> = self.pending.drain(..due).collect();
        for (at, p) in frames {
            // Each track's timestamps grow: a frame later than the hold is written just after
            // its track's previous one.
            let ms = (at.max(0.0) * 1000.0).round() as u64;
            let last = &mut self.tracks[p.track].last_ms;
            let ms = last.map_or(ms, |l| ms.max(l + 1));
            *last = Some(ms);
            self.end_ms = self.end_ms.max(ms);
            let start = match self.cluster_start {
                Some(start) if ms >= start && ms - start < CLUSTER_MS => start,
                _ => {
                    self.close_cluster()?;
                    self.cluster_start = Some(ms);
                    self.cluster.push(MatroskaSpec::Timestamp(ms));
                    ms
                }
            };
            let mut block = Vec::with_capacity(p.data.len() + 4);
            block.push(0x80 | (p.track as u8 + 1)); // track number as a one-byte vint
            block.extend_from_slice(&((ms - start) as i16).to_be_bytes());
            block.push(if p.keyframe { 0x80 } else { 0 });
            block.extend_from_slice(&p.data);
            self.cluster.push(MatroskaSpec::SimpleBlock(block));
            self.written += 1;
        }
        Ok(())
    }

    fn close_cluster(&mut self) -> Result<(), String> {
        if self.cluster.is_empty() {
            return Ok(());
        }
        let blocks = std::mem::take(&mut self.cluster);
        let w = self.writer.as_mut().ok_or("file closed")?;
        w.write(&MatroskaSpec::Cluster(Master::Full(blocks)))
            .map_err(|e| e.to_string())
    }

    fn finish(&mut self) -> Result<Option<PathBuf>, String> {
        if self.zero.is_none() && self.error.is_none() && !self.pending.is_empty() {
            self.start()?;
        }
        self.write_due(true)?;
        self.close_cluster()?;
        let Some(writer) = self.writer.take() else {
            return Ok(None);
        };
        let file = writer.into_inner().map_err(|e| e.to_string())?;
        let mut file = file.into_inner().map_err(|e| e.to_string())?;
        if let Some(at) = self.duration_at {
            use std::io::{Seek, SeekFrom, Write};
            // One frame interval past the last timestamp is roughly where it ends.
            let duration = self.end_ms as f64 + 20.0;
            file.seek(SeekFrom::Start(at)).map_err(|e| e.to_string())?;
            file.write_all(&duration.to_be_bytes())
                .map_err(|e| e.to_string())?;
        }
        if self.written == 0 {
            drop(file);
            let _ = std::fs::remove_file(&self.part);
            return Ok(None);
        }
        file.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&self.part, &self.path).map_err(|e| e.to_string())?;
        Ok(Some(self.path.clone()))
    }
}

/// Where the header's Duration value is: the 8 bytes just written, if they hold the
/// placeholder (the EBML writer wrote it as a 64-bit float).
fn duration_offset(file: &mut BufWriter<File>) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let end = file.stream_position().ok()?;
    let file = file.get_mut();
    file.seek(SeekFrom::Start(end.checked_sub(8)?)).ok()?;
    let mut bytes = [0u8; 8];
    file.read_exact(&mut bytes).ok()?;
    file.seek(SeekFrom::Start(end)).ok()?;
    (f64::from_be_bytes(bytes) == DURATION_PLACEHOLDER).then_some(end - 8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sfu::forward::Codec;

    /// Video whose timestamps never advance while the audio went quiet: nothing is ever due
    /// by time, and the frames held stay bounded.
    #[test]
    fn frames_held_for_interleaving_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let file = ParticipantFile::create(dir.path().join("p.webm")).unwrap();
        let meta = |codec, clock_rate, channels| TrackMeta {
            room: "r".into(),
            user: "u".into(),
            track_id: "t".into(),
            codec,
            clock_rate,
            channels,
            started: std::time::SystemTime::now(),
        };
        let mut audio = file.track_sink(&meta(Codec::Opus, 48_000, 2)).unwrap();
        let mut video = file.track_sink(&meta(Codec::Vp8, 90_000, 0)).unwrap();
        let frame = |data: &'static [u8], keyframe, timestamp| Frame {
            data,
            timestamp,
            keyframe,
            capture_time: Some(1000.0),
            arrival: Instant::now(),
        };
        audio.frame(&frame(&[0xf8, 0xff, 0xfe], true, 0)).unwrap();
        // A VP8 keyframe header (320x240), then the same timestamp for ever.
        const KEY: &[u8] = &[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xf0, 0x00];
        video.frame(&frame(KEY, true, 0)).unwrap();
        // Ten seconds on, past the hold behind the newest frame, which never moves.
        for _ in 0..3 * MAX_PENDING_FRAMES {
            video
                .frame(&frame(&[0x11, 0x00, 0x00], false, 900_000))
                .unwrap();
        }
        let held = file.muxer.lock().unwrap().pending.len();
        assert!(held <= MAX_PENDING_FRAMES, "{held} frames held");
    }
}
