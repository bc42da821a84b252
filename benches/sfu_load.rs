//! End-to-end media load: one webrtc-rs publisher and N webrtc-rs subscribers on loopback, the
//! server in its own process. Reports packets forwarded per second, loss, and the server's CPU
//! time per forwarded packet (from /proc, so only the server's own work counts).
//!
//!   cargo bench --bench sfu_load -- [--subs 20] [--burst 8] [--pad 1000] [--secs 10]
//!
//! The publisher sends 30 video frames/s of `burst` packets with `pad` bytes each, plus 50 small
//! audio packets/s. Run without `--bench` (as `cargo test` does) it makes a short smoke run with
//! three subscribers and fails if any of them receives nothing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use common::peer::{MediaShape, Options, TestPeer};
use common::{Process, eventually};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 20)]
    subs: usize,
    #[arg(long, default_value_t = 8)]
    burst: u32,
    #[arg(long, default_value_t = 1000)]
    pad: usize,
    #[arg(long, default_value_t = 10)]
    secs: u64,
    #[arg(long)]
    bench: bool,
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0 // USER_HZ
}

/// Packets each subscriber has received from the publisher so far.
fn received(subs: &[TestPeer]) -> Vec<u64> {
    subs.iter()
        .map(|s| s.tracks_from("pub").iter().map(|r| r.packets).sum::<u64>())
        .collect()
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    if !args.bench {
        (args.subs, args.burst, args.pad, args.secs) = (3, 2, 200, 2);
    }
    let node = Process::spawn(&[], &[("RUST_LOG", "warn")]);
    let addr = node.addr;
    let options = Options {
        publish: true,
        chat: false,
        hold_media: None,
        shape: MediaShape {
            video_burst: args.burst,
            pad: args.pad,
            skip_every: None,
        },
        accept_video: None,
        media_runtime: None,
        track_ids_of: None,
    };
    let publisher = TestPeer::join_with(addr, "pub", "load", 1, options).await;
    let mut subs = Vec::new();
    for i in 0..args.subs {
        subs.push(TestPeer::join(addr, &format!("sub{i}"), "load", 100, false).await);
    }
    let all = eventually(Duration::from_secs(30), || {
        subs.iter().all(|s| s.tracks_from("pub").len() == 2)
    })
    .await;
    assert!(all, "every subscriber receives the publisher");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (cpu0, got0, t0) = (
        cpu_seconds(node.child.id()),
        received(&subs),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let (cpu1, got1, wall) = (
        cpu_seconds(node.child.id()),
        received(&subs),
        t0.elapsed().as_secs_f64(),
    );

    let per_sub: Vec<u64> = got1.iter().zip(&got0).map(|(a, b)| a - b).collect();
    let forwarded = per_sub.iter().sum::<u64>() as f64;
    let least = per_sub.iter().min().copied().unwrap_or(0) as f64;
    let most = per_sub.iter().max().copied().unwrap_or(0) as f64;
    let cpu = cpu1 - cpu0;
    println!(
        "sfu_load subs={} video={}x{} B/frame at 30 fps + audio 50/s, {:.1} s",
        args.subs, args.burst, args.pad, wall
    );
    // The sender's timer catches up after stalls, so per-subscriber rates are compared with
    // each other (equal = nothing lost for anyone) rather than with the nominal rate.
    println!(
        "  forwarded {:.0} packets/s in all; per subscriber {:.0} to {:.0}/s (nominal {:.0}/s)",
        forwarded / wall,
        least / wall,
        most / wall,
        30.0 * args.burst as f64 + 50.0
    );
    println!(
        "  server CPU {:.2} cores, {:.1} us per forwarded packet",
        cpu / wall,
        cpu / forwarded.max(1.0) * 1e6
    );
    publisher.close().await;
    for s in subs {
        s.close().await;
    }
    if !args.bench {
        assert!(forwarded > 0.0, "nothing forwarded in the smoke run");
    }
}
