//! A recorded track: the media loop's handle (a bounded queue) and the writer thread behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::rtp;
use tracing::{info, warn};

use super::frames::{AssembledFrame, FrameAssembler};
use super::sink::{Frame, MediaSink, TrackMeta};
use crate::sfu::forward::RtpHeader;

/// What goes to the writer: forwarded packets, and the publisher's sender reports.
enum Queued {
    /// The header fields frames need, the shared payload, and where it came from.
    Packet {
        sequence_number: u16,
        timestamp: u32,
        marker: bool,
        payload: Bytes,
        source_ssrc: u32,
        source_timestamp: u32,
        arrival: Instant,
    },
    /// A sender report of a source: its NTP time and the RTP timestamp it corresponds to.
    SenderReport { ssrc: u32, ntp: u64, rtp: u32 },
}

/// Maps frames to the publisher's capture clock through its sender reports.
#[derive(Default)]
struct CaptureClock {
    /// Per source: (NTP seconds, RTP timestamp) of its latest sender report.
    reports: Vec<(u32, f64, u32)>,
    /// The source of the latest packet, and its offset (forwarded timestamp - source's).
    current: Option<(u32, u32)>,
}

impl CaptureClock {
    fn report(&mut self, ssrc: u32, ntp: u64, rtp: u32) {
        let seconds = (ntp >> 32) as f64 + (ntp & 0xffff_ffff) as f64 / 4_294_967_296.0;
        self.reports.retain(|(s, ..)| *s != ssrc);
        self.reports.push((ssrc, seconds, rtp));
    }

    /// Capture time of a frame with forwarded timestamp `rtp`, if its source has reported.
    fn capture_time(&self, rtp: u32, clock_rate: u32) -> Option<f64> {
        let (ssrc, offset) = self.current?;
        let (_, ntp, sr_rtp) = self.reports.iter().find(|(s, ..)| *s == ssrc)?;
        let since = rtp.wrapping_sub(offset).wrapping_sub(*sr_rtp) as i32;
        Some(ntp + since as f64 / clock_rate.max(1) as f64)
    }
}

/// What a finished recording did, for logs, webhooks and tests.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub files: Vec<std::path::PathBuf>,
    pub frames: u64,
    pub bytes: u64,
    /// Packets the queue could not take (the writer fell behind).
    pub dropped_packets: u64,
    /// Video frames left out after a gap, until the next keyframe.
    pub skipped_frames: u64,
    /// Sinks that failed (and stopped), with why.
    pub errors: Vec<String>,
    /// First to last frame, by RTP timestamps.
    pub duration: Duration,
}

/// Called on the writer thread with the recording's summary once its sinks are finished.
pub type OnFinish = Box<dyn FnOnce(&TrackMeta, &Summary) + Send>;

/// The media loop's side of a recorded track. Dropping it ends the recording: the writer
/// drains the queue, finishes every sink and exits.
pub struct Recorder {
    /// Whether it writes files (members are told), not only an integrator's sinks.
    pub to_file: bool,
    queue: SyncSender<Queued>,
    dropped: Arc<AtomicU64>,
    /// Set by the writer when video needs a keyframe after a gap; the loop asks for one.
    wants_keyframe: Arc<AtomicBool>,
    writer: JoinHandle<Summary>,
}

impl Recorder {
    /// Starts the writer thread for `meta` with `sinks`; `queue_packets` bounds the queue.
    pub fn start(
        meta: TrackMeta,
        sinks: Vec<Box<dyn MediaSink>>,
        queue_packets: usize,
        to_file: bool,
        finished: OnFinish,
    ) -> std::io::Result<Recorder> {
        let (queue, rx) = sync_channel(queue_packets.max(1));
        let wants_keyframe = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (flag, counted) = (wants_keyframe.clone(), dropped.clone());
        let writer = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || {
                let summary = write(&meta, sinks, rx, &flag, &counted);
                finished(&meta, &summary);
                summary
            })?;
        Ok(Recorder {
            to_file,
            queue,
            dropped,
            wants_keyframe,
            writer,
        })
    }

    /// Queues one forwarded packet (`header` as rewritten, `source` as it came); never blocks
    /// (a full queue drops and counts it).
    pub fn push(&mut self, header: &RtpHeader, payload: &Bytes, source: &RtpHeader, now: Instant) {
        let queued = Queued::Packet {
            sequence_number: header.sequence_number,
            timestamp: header.timestamp,
            marker: header.marker,
            payload: payload.clone(),
            source_ssrc: source.ssrc,
            source_timestamp: source.timestamp,
            arrival: now,
        };
        // Full (the writer fell behind) or gone (it failed): dropped, counted.
        if self.queue.try_send(queued).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A sender report of one of the track's sources (lip sync of participant files).
    pub fn sender_report(&mut self, ssrc: u32, ntp: u64, rtp: u32) {
        let _ = self.queue.try_send(Queued::SenderReport { ssrc, ntp, rtp });
    }

    /// Whether the writer asked for a keyframe since the last call.
    pub fn take_keyframe_request(&self) -> bool {
        self.wants_keyframe.swap(false, Ordering::Relaxed)
    }

    /// Ends the recording (the writer finishes what is queued) and returns the writer's
    /// handle, to be joined off the media loop.
    pub fn finish(self) -> JoinHandle<Summary> {
        self.writer // the queue's sender is dropped with the rest: the writer drains and ends
    }
}

/// A track's sinks and what was given to them.
struct Outlets<'a> {
    meta: &'a TrackMeta,
    sinks: Vec<Box<dyn MediaSink>>,
    failed: Vec<bool>,
    summary: Summary,
    /// The last frame's timestamp (the first's is 0).
    last_timestamp: u64,
}

impl Outlets<'_> {
    /// One frame to every sink still working.
    fn give(&mut self, frame: &AssembledFrame, capture_time: Option<f64>, arrival: Instant) {
        let f = Frame {
            data: &frame.data,
            timestamp: frame.timestamp,
            keyframe: frame.keyframe,
            capture_time,
            arrival,
        };
        for (sink, failed) in self.sinks.iter_mut().zip(self.failed.iter_mut()) {
            if *failed {
                continue;
            }
            if let Err(e) = sink.frame(&f) {
                let m = self.meta;
                warn!(room = %m.room, user = %m.user, track = %m.track_id, "recording failed: {e}");
                self.summary.errors.push(e.to_string());
                *failed = true;
            }
        }
        self.summary.frames += 1;
        self.summary.bytes += frame.data.len() as u64;
        self.last_timestamp = frame.timestamp;
    }
}

/// The writer thread: packets in, frames out to every sink, until the queue closes.
fn write(
    meta: &TrackMeta,
    sinks: Vec<Box<dyn MediaSink>>,
    rx: Receiver<Queued>,
    wants_keyframe: &AtomicBool,
    dropped: &AtomicU64,
) -> Summary {
    let mut assembler = FrameAssembler::new(meta.codec);
    let mut out = Outlets {
        meta,
        failed: vec![false; sinks.len()],
        sinks,
        summary: Summary::default(),
        last_timestamp: 0,
    };
    let mut clock = CaptureClock::default();
    let mut arrival = Instant::now();
    while let Ok(q) = rx.recv() {
        let now = Instant::now();
        let packet = match q {
            Queued::SenderReport { ssrc, ntp, rtp } => {
                clock.report(ssrc, ntp, rtp);
                continue;
            }
            Queued::Packet {
                sequence_number,
                timestamp,
                marker,
                payload,
                source_ssrc,
                source_timestamp,
                arrival: at,
            } => {
                arrival = at;
                clock.current = Some((source_ssrc, timestamp.wrapping_sub(source_timestamp)));
                let header = rtp::header::Header {
                    version: 2,
                    marker,
                    sequence_number,
                    timestamp,
                    ..Default::default()
                };
                rtp::Packet { header, payload }
            }
        };
        assembler.push(packet, now);
        while let Some(frame) = assembler.pop(now) {
            let capture = clock.capture_time(frame.rtp_timestamp, meta.clock_rate);
            out.give(&frame, capture, arrival);
        }
        if assembler.needs_keyframe() {
            wants_keyframe.store(true, Ordering::Relaxed);
        }
    }
    // The queue closed: what the assembler still holds, the last frame included.
    for frame in assembler.finish(Instant::now()) {
        let capture = clock.capture_time(frame.rtp_timestamp, meta.clock_rate);
        out.give(&frame, capture, arrival);
    }
    let Outlets {
        sinks,
        failed,
        mut summary,
        last_timestamp,
        ..
    } = out;
    summary.skipped_frames = assembler.skipped_frames;
    if summary.frames == 0 {
        summary
            .errors
            .push("no media arrived: nothing was written".into());
    }
    summary.dropped_packets = dropped.load(Ordering::Relaxed);
    summary.duration =
        Duration::from_secs_f64(last_timestamp as f64 / meta.clock_rate.max(1) as f64);
    for (sink, failed) in sinks.into_iter().zip(failed) {
        match sink.finish() {
            Ok(Some(path)) if !failed => summary.files.push(path),
            Ok(_) => {}
            Err(e) => summary.errors.push(e.to_string()),
        }
    }
    info!(
        room = %meta.room, user = %meta.user, track = %meta.track_id,
        frames = summary.frames, bytes = summary.bytes, skipped = summary.skipped_frames,
        dropped = summary.dropped_packets,
        files = ?summary.files, "recording finished"
    );
    summary
}
