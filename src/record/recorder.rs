//! A recorded track: the media loop's handle (a bounded queue) and the writer thread behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::rtp;
use tracing::{info, warn};

use super::frames::FrameAssembler;
use super::sink::{Frame, MediaSink, TrackMeta};
use crate::sfu::forward::RtpHeader;

/// A packet on its way to the writer: the header fields frames need and the shared payload.
struct Queued {
    sequence_number: u16,
    timestamp: u32,
    marker: bool,
    payload: Bytes,
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
    writer: Option<JoinHandle<Summary>>,
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
            writer: Some(writer),
        })
    }

    /// Queues one forwarded packet; never blocks (a full queue drops and counts it).
    pub fn push(&mut self, header: &RtpHeader, payload: &Bytes) {
        let queued = Queued {
            sequence_number: header.sequence_number,
            timestamp: header.timestamp,
            marker: header.marker,
            payload: payload.clone(),
        };
        match self.queue.try_send(queued) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether the writer asked for a keyframe since the last call.
    pub fn take_keyframe_request(&self) -> bool {
        self.wants_keyframe.swap(false, Ordering::Relaxed)
    }

    /// Ends the recording (the writer finishes what is queued) and returns the writer's
    /// handle, to be joined off the media loop.
    pub fn finish(mut self) -> Option<JoinHandle<Summary>> {
        self.writer.take()
    }
}

/// The writer thread: packets in, frames out to every sink, until the queue closes.
fn write(
    meta: &TrackMeta,
    mut sinks: Vec<Box<dyn MediaSink>>,
    rx: Receiver<Queued>,
    wants_keyframe: &AtomicBool,
    dropped: &AtomicU64,
) -> Summary {
    let mut assembler = FrameAssembler::new(meta.codec);
    let mut summary = Summary::default();
    let mut first_last: Option<(u64, u64)> = None;
    let mut failed = vec![false; sinks.len()];
    while let Ok(q) = rx.recv() {
        let now = Instant::now();
        let packet = rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                marker: q.marker,
                sequence_number: q.sequence_number,
                timestamp: q.timestamp,
                ..Default::default()
            },
            payload: q.payload,
        };
        assembler.push(packet, now);
        while let Some(frame) = assembler.pop(now) {
            let f = Frame {
                data: &frame.data,
                timestamp: frame.timestamp,
                keyframe: frame.keyframe,
            };
            for (sink, failed) in sinks.iter_mut().zip(failed.iter_mut()) {
                if *failed {
                    continue;
                }
                if let Err(e) = sink.frame(&f) {
                    warn!(room = %meta.room, user = %meta.user, track = %meta.track_id, "recording failed: {e}");
                    summary.errors.push(e.to_string());
                    *failed = true;
                }
            }
            summary.frames += 1;
            summary.bytes += frame.data.len() as u64;
            let (first, _) = first_last.get_or_insert((frame.timestamp, frame.timestamp));
            first_last = Some((*first, frame.timestamp));
        }
        if assembler.needs_keyframe() {
            wants_keyframe.store(true, Ordering::Relaxed);
        }
    }
    summary.skipped_frames = assembler.skipped_frames;
    if summary.frames == 0 {
        summary
            .errors
            .push("no media arrived: nothing was written".into());
    }
    summary.dropped_packets = dropped.load(Ordering::Relaxed);
    if let Some((first, last)) = first_last {
        summary.duration =
            Duration::from_secs_f64((last - first) as f64 / meta.clock_rate.max(1) as f64);
    }
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
