//! Real encoded media for the recording tests: ffmpeg encodes a test pattern (VP8, a keyframe
//! every 30 frames) and a tone (Opus, 20 ms packets), and webrtc-rs's readers and payloader
//! turn them into RTP payloads a test publisher sends at the real rate.

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use rtc::media::io::ivf_reader::IVFReader;
use rtc::media::io::ogg_reader::OggReader;
use rtc::rtp::codec::vp8::Vp8Payloader;
use rtc::rtp::packetizer::Payloader;

/// Opus packets (20 ms each) and VP8 frames (30 per second), each frame as RTP payloads.
#[derive(Debug, Clone)]
pub struct EncodedMedia {
    pub audio: Vec<Bytes>,
    pub video: Vec<Vec<Bytes>>,
}

/// Encodes `seconds` of media into `dir` and packetizes it (a keyframe every 30 frames).
pub fn encode(dir: &Path, seconds: u32) -> EncodedMedia {
    encode_with_keyframes_every(dir, seconds, 30)
}

/// [`encode`] with a keyframe every `gop` frames.
pub fn encode_with_keyframes_every(dir: &Path, seconds: u32, gop: u32) -> EncodedMedia {
    std::fs::create_dir_all(dir).unwrap();
    let (ivf, ogg) = (dir.join("source.ivf"), dir.join("source.ogg"));
    let (t, g) = (seconds.to_string(), gop.to_string());
    run_ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=320x240:rate=30",
        "-t",
        &t,
        "-c:v",
        "libvpx",
        "-g",
        &g,
        "-b:v",
        "300k",
        "-deadline",
        "realtime",
        "-f",
        "ivf",
        ivf.to_str().unwrap(),
    ]);
    run_ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        &t,
        "-ac",
        "2",
        "-c:a",
        "libopus",
        "-frame_duration",
        "20",
        "-page_duration",
        "20000",
        "-f",
        "ogg",
        ogg.to_str().unwrap(),
    ]);
    let (mut reader, _) = IVFReader::new(std::fs::File::open(&ivf).unwrap()).unwrap();
    let mut payloader = Vp8Payloader::default();
    let mut video = Vec::new();
    while let Ok((frame, _)) = reader.parse_next_frame() {
        video.push(payloader.payload(1200, &frame.freeze()).unwrap());
    }
    let (mut reader, _) = OggReader::new(std::fs::File::open(&ogg).unwrap(), true).unwrap();
    let mut audio = Vec::new();
    while let Ok((page, _)) = reader.parse_next_page() {
        if !page.starts_with(b"OpusTags") && !page.is_empty() {
            audio.push(page.freeze());
        }
    }
    assert!(video.len() as u32 >= seconds * 29, "{} frames", video.len());
    assert!(
        audio.len() as u32 >= seconds * 49,
        "{} packets",
        audio.len()
    );
    EncodedMedia { audio, video }
}

fn run_ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .output()
        .expect("ffmpeg runs (tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
