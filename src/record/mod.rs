//! Server-side recording. A recorded track is a down-track without a network: the forwarding
//! core feeds it like any subscriber (keyframe gating, keyframe requests when it starts, the
//! highest simulcast layer), and it hands the rewritten packets to a writer thread through a
//! bounded queue, so a slow disk drops packets (counted) instead of slowing forwarding. The
//! writer reorders them within a small window, depacketizes them into frames
//! (`frames`), and gives every frame to its sinks (`sink::MediaSink`): the built-in file
//! writers (`files`), or an integrator's own.

pub mod files;
pub mod frames;
pub mod recorder;
pub mod rtp_out;
pub mod sink;
pub mod webm;

pub use recorder::{Recorder, Summary};
pub use sink::{Frame, MediaSink, SinkFactory, TrackMeta};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;

use tracing::warn;

use crate::config::{RecordingConfig, RecordingMode};
use crate::webhook::{Event, Webhooks};

/// What gets recorded, and the writers of recordings that ended but may still be writing.
pub struct Recordings {
    config: RecordingConfig,
    factories: Vec<SinkFactory>,
    webhooks: Webhooks,
    /// Recorded through the API: whole rooms (`None`) and single participants, on top of the
    /// rooms `recording.rooms` names.
    selected: Mutex<HashSet<(String, Option<String>)>>,
    /// Open participant files, by (room, user).
    participants: Mutex<HashMap<(String, String), webm::ParticipantFile>>,
    writers: Mutex<Vec<JoinHandle<Summary>>>,
}

impl Recordings {
    pub fn new(config: RecordingConfig, factories: Vec<SinkFactory>, webhooks: Webhooks) -> Self {
        Recordings {
            config,
            factories,
            webhooks,
            selected: Mutex::new(HashSet::new()),
            participants: Mutex::new(HashMap::new()),
            writers: Mutex::new(Vec::new()),
        }
    }

    /// Starts recording a newly published track, if its room is recorded or a registered
    /// sink wants it; `None` otherwise (or if nothing could be opened).
    pub fn start(&self, meta: TrackMeta) -> Option<Recorder> {
        let mut sinks: Vec<Box<dyn MediaSink>> = Vec::new();
        let mut paths = Vec::new();
        if self.records(&meta.room, &meta.user) {
            let mode = self.config.mode;
            if mode != RecordingMode::Participants {
                let path = files::track_path(&self.config.dir, &meta);
                let open = || files::track_file(&path, &meta);
                sinks.extend(self.open_file(&meta, &path, open, &mut paths));
            }
            if mode != RecordingMode::Tracks && webm::supports(meta.codec) {
                let path = webm::participant_path(&self.config.dir, &meta);
                let open = || self.participant_sink(&meta, &path);
                sinks.extend(self.open_file(&meta, &path, open, &mut paths));
            }
        }
        let to_file = !sinks.is_empty();
        sinks.extend(self.factories.iter().filter_map(|make| make(&meta)));
        if sinks.is_empty() {
            return None;
        }
        let webhooks = self.webhooks.clone();
        let finished = move |meta: &TrackMeta, summary: &Summary| {
            if to_file {
                webhooks.emit(Event::RecordingFinished {
                    room: meta.room.clone(),
                    user: meta.user.clone(),
                    track_id: meta.track_id.clone(),
                    // A participant file is completed by its last track: the others name it.
                    path: summary.files.first().cloned().or_else(|| {
                        let ok = summary.errors.is_empty();
                        ok.then(|| paths.last().cloned()).flatten()
                    }),
                    files: if summary.errors.is_empty() {
                        paths.clone()
                    } else {
                        summary.files.clone()
                    },
                    duration: summary.duration,
                    bytes: summary.bytes,
                    frames: summary.frames,
                    dropped_packets: summary.dropped_packets,
                    error: summary.errors.first().cloned(),
                });
            }
        };
        match Recorder::start(
            meta,
            sinks,
            self.config.queue_packets,
            to_file,
            Box::new(finished),
        ) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!("cannot start a recording writer: {e}");
                None
            }
        }
    }

    /// Opens a file sink with `open`; says so (or why not) in a webhook.
    fn open_file(
        &self,
        meta: &TrackMeta,
        path: &Path,
        open: impl FnOnce() -> std::io::Result<(PathBuf, Box<dyn MediaSink>)>,
        paths: &mut Vec<PathBuf>,
    ) -> Option<Box<dyn MediaSink>> {
        match open() {
            Ok((path, sink)) => {
                self.webhooks.emit(Event::RecordingStarted {
                    room: meta.room.clone(),
                    user: meta.user.clone(),
                    track_id: meta.track_id.clone(),
                    path: path.clone(),
                });
                paths.push(path);
                Some(sink)
            }
            Err(e) => {
                warn!(
                    room = %meta.room, user = %meta.user, track = %meta.track_id,
                    dir = %self.config.dir.display(), "cannot record: {e}"
                );
                // The call goes on; whoever watches recordings hears why this one failed.
                self.webhooks.emit(Event::RecordingFinished {
                    room: meta.room.clone(),
                    user: meta.user.clone(),
                    track_id: meta.track_id.clone(),
                    path: None,
                    files: Vec::new(),
                    duration: Default::default(),
                    bytes: 0,
                    frames: 0,
                    dropped_packets: 0,
                    error: Some(format!("cannot open {}: {e}", path.display())),
                });
                None
            }
        }
    }

    /// The user's participant file (the open one, or a new one) and a sink for this track.
    fn participant_sink(
        &self,
        meta: &TrackMeta,
        path: &Path,
    ) -> std::io::Result<(PathBuf, Box<dyn MediaSink>)> {
        let mut files = self.participants.lock().unwrap_or_else(|e| e.into_inner());
        files.retain(|_, f| !f.is_done());
        let key = (meta.room.clone(), meta.user.clone());
        if let Some(file) = files.get(&key)
            && let Some(sink) = file.track_sink(meta)
        {
            return Ok((file.path(), sink));
        }
        let file = webm::ParticipantFile::create(path.to_path_buf())?;
        let sink = file
            .track_sink(meta)
            .ok_or_else(|| std::io::Error::other("codec not supported in WebM"))?;
        let path = file.path();
        files.insert(key, file);
        Ok((path, sink))
    }

    /// Whether the whole room is recorded (by config or through the API), not only some of its
    /// participants.
    pub fn records_room(&self, room: &str) -> bool {
        self.config.records(room)
            || (self.selected.lock().unwrap_or_else(|e| e.into_inner()))
                .contains(&(room.to_owned(), None))
    }

    /// Whether `user`'s tracks in `room` are recorded to files (by config or through the API).
    pub fn records(&self, room: &str, user: &str) -> bool {
        self.records_room(room)
            || (self.selected.lock().unwrap_or_else(|e| e.into_inner()))
                .contains(&(room.to_owned(), Some(user.to_owned())))
    }

    /// Records a room (`user` `None`) or one participant from now on (`start`), or stops doing
    /// so. Tracks already published are started or stopped by their loop.
    pub fn select(&self, room: &str, user: Option<&str>, start: bool) {
        let key = (room.to_owned(), user.map(str::to_owned));
        let mut selected = self.selected.lock().unwrap_or_else(|e| e.into_inner());
        if start {
            selected.insert(key);
        } else {
            selected.remove(&key);
            if user.is_none() {
                // Stopping a room stops its participants' recordings too.
                selected.retain(|(r, _)| r != room);
            }
        }
    }

    /// The webhooks recordings (and the media plane) report to.
    pub fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }

    /// A recording ended: its writer finishes in the background (joined at shutdown).
    pub fn finished(&self, recorder: Recorder) {
        let writer = recorder.finish();
        let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        writers.retain(|w| !w.is_finished());
        writers.push(writer);
    }

    /// Waits for every writer to finish its file (graceful shutdown).
    pub fn wait(&self) {
        let writers = std::mem::take(&mut *self.writers.lock().unwrap_or_else(|e| e.into_inner()));
        for writer in writers {
            let _ = writer.join();
        }
    }
}
