//! Recording: webrtc-rs publishers send real Opus and VP8 (encoded by ffmpeg) through a server
//! that records their room; every file must be complete and play, as `ffprobe` and `ffmpeg`
//! (independent tools) read it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::peer::{MediaShape, Options, TestPeer};
use common::{eventually, media, test_config};
use switchboard::Server;
use switchboard::record::{Frame, MediaSink, SinkFactory, TrackMeta};

const SECONDS: u32 = 4;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switchboard-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every file under `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// ffprobe's view of a file: (codec of each stream, duration in seconds).
fn probe(file: &Path) -> (Vec<String>, f64) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name:format=duration",
        ])
        .args(["-of", "json"])
        .arg(file)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let codecs = v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["codec_name"].as_str().unwrap_or_default().to_owned())
        .collect();
    let duration = v["format"]["duration"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0);
    (codecs, duration)
}

/// Each video packet's timestamp (timebase units) and whether it is a keyframe.
fn video_packets(file: &Path) -> Vec<(i64, bool)> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v",
            "-show_entries",
            "packet=pts,flags",
        ])
        .args(["-of", "csv=p=0"])
        .arg(file)
        .output()
        .expect("ffprobe runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (pts, flags) = l.split_once(',')?;
            Some((pts.parse().ok()?, flags.starts_with('K')))
        })
        .collect()
}

/// Decodes the whole file; returns ffmpeg's error output (empty: not a single error).
fn decode_errors(file: &Path) -> String {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    let mut errors = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        errors.push_str(&format!(" (exit {})", out.status));
    }
    errors
}

/// Joins `user` to `room`, sending `media` once the publisher connection is up (so the
/// recording sees it from its first frame).
async fn publish(
    server: &Server,
    user: &str,
    room: &str,
    index: u8,
    media: &Arc<media::EncodedMedia>,
    shape: MediaShape,
) -> TestPeer {
    let go = Arc::new(tokio::sync::Notify::new());
    let peer = TestPeer::join_with(
        server.local_addr(),
        user,
        room,
        index,
        Options {
            publish: true,
            hold_media: Some(go.clone()),
            encoded: Some(media.clone()),
            shape,
            ..Default::default()
        },
    )
    .await;
    let up = eventually(Duration::from_secs(10), || {
        let states = peer.observed.states.lock().unwrap();
        states.iter().any(|s| s == "publisher Connected")
    })
    .await;
    assert!(up, "{}", peer.summary());
    go.notify_one();
    peer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_tracks_are_files_that_play() {
    let dir = temp_dir("recording");
    let media = Arc::new(media::encode(&dir.join("source"), SECONDS));
    let mut config = test_config();
    config.recording.dir = dir.join("rec");
    config.recording.rooms = vec!["rec-*".into()];
    let server = Server::start(config).await.expect("server starts");

    // Her video reordered on the way: every third frame's packets arrive last first.
    let reordered = MediaShape {
        reverse_every: Some(3),
        ..Default::default()
    };
    let alice = publish(&server, "alice", "rec-1", 1, &media, reordered).await;
    // A room that is not recorded.
    let bob = publish(&server, "bob", "other", 2, &media, MediaShape::default()).await;
    // Still publishing when the server stops: its files must be complete all the same.
    let dave = publish(&server, "dave", "rec-2", 4, &media, MediaShape::default()).await;
    // A member joining the recorded room later is told it is recorded.
    let zed = TestPeer::join(server.local_addr(), "zed", "rec-1", 9, false).await;
    let told = |peer: &TestPeer, kind: &str| -> Vec<String> {
        let envelopes = peer.envelopes_of(kind);
        let rooms = envelopes.iter().map(|e| {
            assert_eq!(
                (e["status"].as_u64(), e["data"]["fromUid"].as_str()),
                (Some(200), Some("sfu"))
            );
            e["data"]["roomId"].as_str().unwrap_or_default().to_owned()
        });
        rooms.collect()
    };
    let started = eventually(Duration::from_secs(5), || {
        told(&alice, "recordingStarted") == ["rec-1"] && told(&zed, "recordingStarted") == ["rec-1"]
    })
    .await;
    assert!(
        started,
        "{:?} {:?}",
        told(&alice, "recordingStarted"),
        told(&zed, "recordingStarted")
    );
    // The media runs out after SECONDS; then both leave, which ends the recordings.
    tokio::time::sleep(Duration::from_secs(SECONDS as u64) + Duration::from_millis(700)).await;
    assert!(told(&zed, "recordingStopped").is_empty());
    assert!(
        told(&bob, "recordingStarted").is_empty(),
        "room 'other' is not recorded"
    );
    alice.close().await;
    bob.close().await;
    let stopped = eventually(Duration::from_secs(5), || {
        told(&zed, "recordingStopped") == ["rec-1"]
    })
    .await;
    assert!(stopped, "{:?}", told(&zed, "recordingStopped"));

    let rec = dir.join("rec");
    let complete = eventually(Duration::from_secs(10), || {
        let files = files_under(&rec.join("rec-1"));
        files.len() == 2 && files.iter().all(|f| f.extension().unwrap() != "part")
    })
    .await;
    let files = files_under(&rec.join("rec-1"));
    assert!(complete, "{files:?}");
    assert!(
        !rec.join("other").exists(),
        "a room not recorded was: {files:?}"
    );
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        assert_eq!(file.parent().unwrap(), rec.join("rec-1"));
        let (codecs, duration) = probe(file);
        let expected = if name.starts_with("alice-alice-audio-") {
            assert!(name.ends_with(".ogg"), "{name}");
            "opus"
        } else {
            assert!(name.starts_with("alice-alice-video-"), "{name}");
            assert!(name.ends_with(".ivf"), "{name}");
            // Every frame made it, the reordered ones and the last one too.
            let frames = video_packets(file).len();
            assert_eq!(frames, media.video.len(), "frames recorded of those sent");
            "vp8"
        };
        assert_eq!(codecs, vec![expected.to_owned()], "{name}");
        let sent = SECONDS as f64;
        assert!(
            (duration - sent).abs() <= sent * 0.1,
            "{name}: {duration} s recorded of {sent} s sent"
        );
        assert_eq!(decode_errors(file), "", "{name} does not decode cleanly");
    }

    // A graceful stop ends dave's recordings; when it returns, both files are complete.
    assert_eq!(files_under(&rec.join("rec-2")).len(), 2, "being written");
    server.shutdown().await;
    let files = files_under(&rec.join("rec-2"));
    assert_eq!(files.len(), 2, "{files:?}");
    for file in &files {
        assert_ne!(file.extension().unwrap(), "part", "{file:?}");
        let (codecs, duration) = probe(file);
        assert_eq!(codecs.len(), 1, "{file:?}");
        assert!(duration > 1.0, "{file:?}: {duration} s");
        assert_eq!(decode_errors(file), "", "{file:?} does not decode cleanly");
    }
    drop(dave);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Video packets lost on the way (never resent): the recording leaves out what it cannot
/// decode, up to the next keyframe, so the file still decodes without a single error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_with_lost_packets_still_decodes_cleanly() {
    let dir = temp_dir("recording-loss");
    // A keyframe every 10 frames: with a keyframe every 30, a loss inside one keyframe (its
    // packets are many) left a second of video or less, depending on when the publisher's
    // connection came up (a CI run kept 30 frames).
    let media = Arc::new(media::encode_with_keyframes_every(
        &dir.join("source"),
        SECONDS,
        10,
    ));
    let mut config = test_config();
    config.recording.dir = dir.join("rec");
    config.recording.rooms = vec!["*".into()];
    let server = Server::start(config).await.expect("server starts");
    let lossy = MediaShape {
        skip_every: Some(37),
        ..Default::default()
    };
    let carol = publish(&server, "carol", "lossy", 3, &media, lossy).await;
    tokio::time::sleep(Duration::from_secs(SECONDS as u64) + Duration::from_millis(700)).await;
    carol.close().await;
    let rec = dir.join("rec").join("lossy");
    let complete = eventually(Duration::from_secs(10), || {
        let files = files_under(&rec);
        files.len() == 2 && files.iter().all(|f| f.extension().unwrap() != "part")
    })
    .await;
    let files = files_under(&rec);
    assert!(complete, "{files:?}");
    let video = files
        .iter()
        .find(|f| f.extension().unwrap() == "ivf")
        .unwrap();
    let (codecs, duration) = probe(video);
    assert_eq!(codecs, vec!["vp8".to_owned()]);
    assert!(duration > 1.5, "{duration} s of video kept");
    // What was kept: runs of consecutive frames, each starting on a keyframe (a frame after a
    // gap without one would decode against a picture the file does not have).
    let packets = video_packets(video);
    assert!(packets.len() >= 45, "{packets:?}");
    assert!(
        packets.len() < 120,
        "no frame was left out: {}",
        packets.len()
    );
    assert!(packets[0].1, "starts on a keyframe");
    for pair in packets.windows(2) {
        let ((pts, _), (next, key)) = (pair[0], pair[1]);
        assert!(
            next - pts == 3000 || key,
            "a gap {pts} -> {next} resumes on a delta frame"
        );
    }
    assert_eq!(
        decode_errors(video),
        "",
        "the lossy recording does not decode cleanly"
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sink registered through the library: sees every frame of every track, in order, and a
/// graceful stop waits for it to finish (here, slowly).
#[derive(Clone, Default)]
struct Seen(
    Arc<std::sync::Mutex<Vec<(String, u64, bool)>>>,
    Arc<AtomicBool>,
);

struct CountingSink {
    track: String,
    seen: Seen,
}

impl MediaSink for CountingSink {
    fn frame(&mut self, frame: &Frame<'_>) -> std::io::Result<()> {
        let entry = (self.track.clone(), frame.timestamp, frame.keyframe);
        self.seen.0.lock().unwrap().push(entry);
        Ok(())
    }

    fn finish(self: Box<Self>) -> std::io::Result<Option<PathBuf>> {
        std::thread::sleep(Duration::from_millis(500));
        self.seen.1.store(true, Ordering::SeqCst);
        Ok(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_media_sink_sees_every_frame() {
    let dir = temp_dir("recording-sink");
    let media = Arc::new(media::encode(&dir.join("source"), SECONDS));
    let seen = Seen::default();
    let for_factory = seen.clone();
    let factory: SinkFactory = Arc::new(move |meta: &TrackMeta| {
        Some(Box::new(CountingSink {
            track: meta.track_id.clone(),
            seen: for_factory.clone(),
        }) as Box<dyn MediaSink>)
    });
    // No room is recorded to files: only the registered sink gets the media.
    let mut config = test_config();
    config.recording.dir = dir.join("rec");
    let server = Server::start_with(config, vec![factory])
        .await
        .expect("server starts");
    let erin = publish(&server, "erin", "hooks", 5, &media, MediaShape::default()).await;
    tokio::time::sleep(Duration::from_secs(SECONDS as u64) + Duration::from_millis(700)).await;
    // Stopped while erin still publishes: shutdown returns once the sink has finished.
    server.shutdown().await;
    assert!(
        seen.1.load(Ordering::SeqCst),
        "shutdown did not wait for the sink"
    );
    assert!(
        !dir.join("rec").exists(),
        "files written though no room is recorded"
    );
    let frames = seen.0.lock().unwrap().clone();
    for (track, expected, step) in [
        ("erin-audio", media.audio.len(), 960),
        ("erin-video", media.video.len(), 3000),
    ] {
        let stamps: Vec<u64> = frames
            .iter()
            .filter(|f| f.0 == track)
            .map(|f| f.1)
            .collect();
        // Every frame sent, bar the last (a frame is complete when the next one starts).
        assert!(
            stamps.len() + 1 >= expected,
            "{track}: {} of {expected}",
            stamps.len()
        );
        assert!(
            stamps.windows(2).all(|w| w[1] - w[0] == step),
            "{track}: {stamps:?}"
        );
        assert_eq!(stamps.first(), Some(&0));
    }
    let first_video = frames.iter().find(|f| f.0 == "erin-video").unwrap();
    assert!(first_video.2, "video starts on a keyframe");
    drop(erin);
    let _ = std::fs::remove_dir_all(&dir);
}

/// POST `body` to the API with `key` (if any); returns the status and the JSON answer.
async fn api(
    server: &Server,
    path: &str,
    key: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let url = format!("http://{}{path}", server.local_addr());
    let mut request = reqwest::Client::new().post(url).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("the API answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_start_and_stop_through_the_api() {
    let dir = temp_dir("recording-api");
    // A keyframe every 5 frames: a recording started at any moment has video within 170 ms
    // (this publisher, unlike a browser, cannot answer the server's keyframe request).
    let source = dir.join("source");
    let media = Arc::new(media::encode_with_keyframes_every(&source, SECONDS, 5));
    // Without a key the API is off, whatever is sent.
    let closed = Server::start(test_config()).await.expect("server starts");
    let room = serde_json::json!({"roomId": "live"});
    let (status, answer) = api(&closed, "/api/recordings/start", Some("any"), room.clone()).await;
    assert_eq!(status, 403, "{answer}");
    closed.shutdown().await;

    let mut config = test_config();
    config.api.key = "the key".into();
    config.recording.dir = dir.join("rec");
    let server = Server::start(config).await.expect("server starts");
    for key in [None, Some("not the key"), Some("the key2"), Some("")] {
        let (status, _) = api(&server, "/api/recordings/start", key, room.clone()).await;
        assert_eq!(status, 401, "{key:?}");
    }
    let garbage = serde_json::json!({"room": "live"});
    let (status, answer) = api(&server, "/api/recordings/start", Some("the key"), garbage).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("roomId"),
        "{answer}"
    );

    let alice = publish(&server, "alice", "live", 1, &media, MediaShape::default()).await;
    let bob = TestPeer::join(server.local_addr(), "bob", "live", 2, false).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // alice's tracks are published
    assert!(
        bob.envelopes_of("recordingStarted").is_empty(),
        "not recorded yet"
    );

    // The room: both of alice's tracks, from now on.
    let (status, answer) = api(
        &server,
        "/api/recordings/start",
        Some("the key"),
        room.clone(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["recordedTracks"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    let told = eventually(Duration::from_secs(5), || {
        !bob.envelopes_of("recordingStarted").is_empty()
    })
    .await;
    assert!(told, "bob is told");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, answer) = api(
        &server,
        "/api/recordings/stop",
        Some("the key"),
        room.clone(),
    )
    .await;
    assert_eq!(
        (status, answer["recordedTracks"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{answer}"
    );
    let told = eventually(Duration::from_secs(5), || {
        !bob.envelopes_of("recordingStopped").is_empty()
    })
    .await;
    assert!(told, "bob is told it stopped");

    // One participant.
    let alice_only = serde_json::json!({"roomId": "live", "userId": "alice"});
    let (_, answer) = api(
        &server,
        "/api/recordings/start",
        Some("the key"),
        alice_only.clone(),
    )
    .await;
    assert_eq!(
        answer["recordedTracks"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    // The room is told that one participant is recorded (the first time: the whole room).
    let told = eventually(Duration::from_secs(5), || {
        let started = bob.envelopes_of("recordingStarted");
        started.len() == 2
            && started[0]["data"].get("userId").is_none()
            && started[1]["data"]["userId"] == "alice"
    })
    .await;
    assert!(told, "{:?}", bob.envelopes_of("recordingStarted"));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, answer) = api(&server, "/api/recordings/stop", Some("the key"), alice_only).await;
    assert_eq!(
        answer["recordedTracks"].as_array().map(Vec::len),
        Some(0),
        "{answer}"
    );

    let rec = dir.join("rec").join("live");
    let complete = eventually(Duration::from_secs(10), || {
        let files = files_under(&rec);
        files.len() == 4 && files.iter().all(|f| f.extension().unwrap() != "part")
    })
    .await;
    let files = files_under(&rec);
    assert!(complete, "{files:?}");
    for file in &files {
        let (codecs, duration) = probe(file);
        assert_eq!(codecs.len(), 1, "{file:?}");
        assert!(duration > 0.5, "{file:?}: {duration} s");
        assert_eq!(decode_errors(file), "", "{file:?}");
    }
    alice.close().await;
    bob.close().await;
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Four free UDP ports in a row on loopback, the first even (RTP and RTCP for two tracks).
fn free_port_run() -> u16 {
    for _ in 0..200 {
        let first = 20_000 + 2 * (rand_u16() % 10_000);
        let bound: Vec<_> = (first..first + 4)
            .map(|p| std::net::UdpSocket::bind(("127.0.0.1", p)))
            .collect();
        if bound.iter().all(Result::is_ok) {
            return first;
        }
    }
    panic!("no four free UDP ports in a row");
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.subsec_nanos() ^ std::process::id()) as u16
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtp_egress_reaches_ffmpeg_through_the_generated_sdp() {
    let dir = temp_dir("egress");
    let source = dir.join("source");
    let media = Arc::new(media::encode_with_keyframes_every(&source, SECONDS, 5));
    let mut config = test_config();
    config.api.key = "k".into();
    let server = Server::start(config).await.expect("server starts");
    let alice = publish(&server, "alice", "out", 1, &media, MediaShape::default()).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // her tracks are published

    let port = free_port_run();
    let request =
        serde_json::json!({"roomId": "out", "userId": "alice", "host": "127.0.0.1", "port": port});
    let (status, answer) = api(&server, "/api/egress/start", Some("k"), request).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["tracks"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    let sdp = dir.join("alice.sdp");
    std::fs::write(&sdp, answer["sdp"].as_str().unwrap()).unwrap();

    // ffmpeg receives from the SDP alone, decodes two seconds, one checksum line per frame.
    let sdp_path = sdp.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args([
                "20",
                "ffmpeg",
                "-v",
                "error",
                "-protocol_whitelist",
                "file,udp,rtp",
                "-i",
            ])
            .arg(&sdp_path)
            .args(["-t", "2", "-f", "framecrc", "-"])
            .output()
            .expect("ffmpeg runs")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ffmpeg: {} {stderr}", out.status);
    assert_eq!(stderr, "", "decode errors");
    let frames = String::from_utf8_lossy(&out.stdout);
    let count = |stream: &str| frames.lines().filter(|l| l.starts_with(stream)).count();
    let (audio, video) = (count("0,"), count("1,"));
    assert!(
        audio >= 50 && video >= 30,
        "audio {audio} video {video} frames decoded:\n{frames}"
    );

    let stop = serde_json::json!({"roomId": "out"});
    let (status, _) = api(&server, "/api/egress/stop", Some("k"), stop).await;
    assert_eq!(status, 200);
    let nowhere = serde_json::json!({"roomId": "empty", "host": "127.0.0.1", "port": port});
    let (status, _) = api(&server, "/api/egress/start", Some("k"), nowhere).await;
    assert_eq!(status, 404, "no tracks there");
    alice.close().await;
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// ffprobe's streams of a file: (codec, start time in seconds) each.
fn stream_starts(file: &Path) -> Vec<(String, f64)> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name,start_time",
            "-of",
            "json",
        ])
        .arg(file)
        .output()
        .expect("ffprobe runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let start = s["start_time"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .unwrap_or(f64::NAN);
            (
                s["codec_name"].as_str().unwrap_or_default().to_owned(),
                start,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_file_holds_its_audio_and_video_together() {
    let dir = temp_dir("recording-participant");
    let media = Arc::new(media::encode(&dir.join("source"), SECONDS));
    let mut config = test_config();
    config.recording.dir = dir.join("rec");
    config.recording.rooms = vec!["av".into()];
    config.recording.mode = switchboard::config::RecordingMode::Both;
    let server = Server::start(config).await.expect("server starts");
    let alice = publish(&server, "alice", "av", 1, &media, MediaShape::default()).await;
    tokio::time::sleep(Duration::from_secs(SECONDS as u64) + Duration::from_millis(700)).await;
    alice.close().await;
    let rec = dir.join("rec").join("av");
    let complete = eventually(Duration::from_secs(10), || {
        let files = files_under(&rec);
        files.len() == 3 && files.iter().all(|f| f.extension().unwrap() != "part")
    })
    .await;
    let files = files_under(&rec);
    assert!(
        complete,
        "two track files and one participant file: {files:?}"
    );
    let webm = files
        .iter()
        .find(|f| f.extension().unwrap() == "webm")
        .unwrap();
    let name = webm.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("alice-av-"), "{name}");
    let (codecs, duration) = probe(webm);
    assert_eq!(codecs, ["opus", "vp8"], "{name}");
    let sent = SECONDS as f64;
    assert!(
        (duration - sent).abs() <= sent * 0.1,
        "{duration} s of {sent}"
    );
    let starts = stream_starts(webm);
    assert!(
        (starts[0].1 - starts[1].1).abs() <= 0.1,
        "streams start apart: {starts:?}"
    );
    assert_eq!(decode_errors(webm), "", "{name} does not decode cleanly");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a participant file from 2 s of audio and 50 video frames whose capture starts
/// `video_after` seconds after the audio's (negative: before); returns it and the number of
/// audio packets in it.
fn participant_file_with_video_after(name: &str, video_after: f64) -> (PathBuf, usize) {
    use switchboard::record::webm::ParticipantFile;
    use switchboard::sfu::forward::Codec;
    let dir = temp_dir(name);
    let meta = |track: &str, codec: Codec, clock_rate: u32, channels: u16| TrackMeta {
        room: "r".into(),
        user: "u".into(),
        track_id: track.into(),
        codec,
        clock_rate,
        channels,
        started: std::time::SystemTime::now(),
    };
    let source = media::encode(&dir.join("source"), 2);
    // The VP8 frames again, whole (the payloads without their one-byte descriptors).
    let frames: Vec<Vec<u8>> = (source.video.iter())
        .map(|packets| packets.iter().flat_map(|p| p[1..].to_vec()).collect())
        .collect();
    let path = dir.join("u-av.webm");
    let file = ParticipantFile::create(path.clone()).unwrap();
    let mut audio = file.track_sink(&meta("a", Codec::Opus, 48_000, 2)).unwrap();
    let mut video = file.track_sink(&meta("v", Codec::Vp8, 90_000, 0)).unwrap();
    let arrival = std::time::Instant::now();
    let capture = 3_900_000_000.0; // some NTP time
    for n in 0..100u64 {
        let audio_frame = Frame {
            data: &source.audio[n as usize],
            timestamp: n * 960,
            keyframe: true,
            capture_time: Some(capture + n as f64 * 0.02),
            arrival,
        };
        audio.frame(&audio_frame).unwrap();
        if n < 50 {
            let video_frame = Frame {
                data: &frames[n as usize],
                timestamp: n * 3000,
                keyframe: n % 30 == 0,
                capture_time: Some(capture + video_after + n as f64 / 30.0),
                arrival,
            };
            video.frame(&video_frame).unwrap();
        }
    }
    assert_eq!(
        audio.finish().unwrap(),
        None,
        "the last track completes the file"
    );
    assert_eq!(video.finish().unwrap(), Some(path.clone()));
    let audio_packets = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "a",
            "-show_entries",
            "packet=pts",
        ])
        .args(["-of", "csv=p=0"])
        .arg(&path)
        .output()
        .unwrap()
        .stdout;
    let audio_packets = String::from_utf8_lossy(&audio_packets).lines().count();
    assert_eq!(decode_errors(&path), "", "{name}");
    (path, audio_packets)
}

/// The participant file's timeline comes from the capture clock, whatever the RTP timestamps
/// and arrival times say: when the video's first frame was captured 300 ms after the audio's,
/// the file starts with the audio captured at that moment (the first 300 ms of audio are left
/// out); when it was captured 200 ms before, the video starts the file and the audio follows
/// 200 ms later, nothing cut (a file starting with frames that need a keyframe it lacks would
/// not decode cleanly).
#[test]
fn participant_files_place_tracks_by_their_capture_time() {
    let (path, audio_packets) = participant_file_with_video_after("webm-video-later", 0.3);
    let starts = stream_starts(&path);
    let codecs: Vec<&str> = starts.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(codecs, ["opus", "vp8"]);
    assert!(
        starts.iter().all(|s| s.1.abs() < 0.01),
        "both start at 0: {starts:?}"
    );
    assert_eq!(
        audio_packets,
        100 - 15,
        "the audio captured before the first picture is left out"
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());

    let (path, audio_packets) = participant_file_with_video_after("webm-video-first", -0.2);
    let starts = stream_starts(&path);
    assert!(
        (starts[0].1 - 0.2).abs() < 0.01 && starts[1].1.abs() < 0.01,
        "{starts:?}"
    );
    assert_eq!(audio_packets, 100, "no audio left out");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
