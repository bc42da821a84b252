//! PROTOCOL.md Part 2 with webrtc-rs clients over loopback: publishing, forwarding, data
//! channels, late joiners, leaving, selective subscription, mute, keyframe requests, teardown.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use std::sync::Arc;

use common::peer::{MEDIA_WAIT, MediaShape, Options, TestPeer, keeps_receiving, receives_exactly};
use common::{Process, eventually, healthz, start};

/// A runtime for one peer's connections: shutting it down makes them vanish without a goodbye
/// (a network failure) while the peer's signaling goes on.
fn own_media_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Alice publishes, bob only receives; returns once bob gets alice's audio and video.
async fn alice_publishing_to_bob(addr: std::net::SocketAddr) -> (TestPeer, TestPeer) {
    let a = TestPeer::join(addr, "alice", "R", 1, true).await;
    let b = TestPeer::join(addr, "bob", "R", 2, false).await;
    assert!(
        eventually(MEDIA_WAIT, || receives_exactly(&b, &[("alice", 1)])).await,
        "{}",
        b.summary()
    );
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_exchange_media_and_data_through_the_server() {
    let server = start().await;
    let addr = server.local_addr();
    let a = TestPeer::join(addr, "alice", "R", 1, true).await;
    let b = TestPeer::join(addr, "bob", "R", 2, true).await;
    let c = TestPeer::join(addr, "carol", "R", 3, true).await;

    let all_flowing = eventually(MEDIA_WAIT, || {
        receives_exactly(&a, &[("bob", 2), ("carol", 3)])
            && receives_exactly(&b, &[("alice", 1), ("carol", 3)])
            && receives_exactly(&c, &[("alice", 1), ("bob", 2)])
    })
    .await;
    assert!(
        all_flowing,
        "a: {}\nb: {}\nc: {}",
        a.summary(),
        b.summary(),
        c.summary()
    );

    // Data channels: one per sender on every other member, protocol = sender, bytes unchanged.
    for p in [&a, &b, &c] {
        assert!(
            eventually(MEDIA_WAIT, || p
                .chat_open
                .load(std::sync::atomic::Ordering::SeqCst))
            .await
        );
    }
    for p in [&a, &b, &c] {
        let chat = p.chat.as_ref().unwrap();
        chat.send_text(&format!("hello from {} ✓", p.user))
            .await
            .unwrap();
        chat.send(BytesMut::from(&[0u8, 1, 2, 255][..]))
            .await
            .unwrap();
    }
    let delivered = eventually(MEDIA_WAIT, || {
        [&a, &b, &c].iter().all(|p| {
            let channels = p.observed.channels.lock().unwrap();
            let others: Vec<&str> = ["alice", "bob", "carol"]
                .into_iter()
                .filter(|u| *u != p.user)
                .collect();
            others.iter().all(|o| {
                channels.iter().any(|ch| {
                    ch.label == "chat"
                        && ch.protocol == *o
                        && ch.texts == [format!("hello from {o} ✓")]
                        && ch.binaries == [vec![0u8, 1, 2, 255]]
                })
            }) && channels.len() == 6
        })
    })
    .await;
    assert!(
        delivered,
        "channels seen by alice: {:?}",
        a.observed.channels.lock().unwrap()
    );
    // Reliability settings are kept on the copies (this needs the rtc patch in vendor/rtc:
    // upstream 0.21.1 reports neither limit for a channel the remote side opened).
    let copies = a.observed.channels.lock().unwrap().clone();
    let state = copies
        .iter()
        .find(|c| c.label == "state" && c.protocol == "bob")
        .expect("bob's state channel");
    assert!(!state.ordered, "an unordered channel stays unordered");
    assert_eq!(state.max_retransmits, Some(2), "{state:?}");
    assert_eq!(state.max_packet_life_time, None, "{state:?}");
    let cursor = copies
        .iter()
        .find(|c| c.label == "cursor" && c.protocol == "bob")
        .expect("bob's cursor channel");
    assert!(cursor.ordered, "{cursor:?}");
    assert_eq!(cursor.max_packet_life_time, Some(150), "{cursor:?}");
    assert_eq!(cursor.max_retransmits, None, "{cursor:?}");
    let chat = copies
        .iter()
        .find(|c| c.label == "chat" && c.protocol == "bob")
        .unwrap();
    assert!(chat.ordered);
    assert_eq!(
        (chat.max_retransmits, chat.max_packet_life_time),
        (None, None)
    );

    // trackPublished reached every member for every track.
    let published = a.envelopes_of("trackPublished");
    assert!(published.len() >= 6, "{published:?}");
    assert!(
        published
            .iter()
            .any(|e| e["data"]["userId"] == "bob" && e["data"]["kind"] == "video")
    );

    for p in [a, b, c] {
        p.close().await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_gets_everything_and_leaving_removes_it_everywhere() {
    let server = start().await;
    let addr = server.local_addr();
    let a = TestPeer::join(addr, "alice", "R", 1, true).await;
    let b = TestPeer::join(addr, "bob", "R", 2, true).await;
    assert!(
        eventually(MEDIA_WAIT, || receives_exactly(&a, &[("bob", 2)])).await,
        "{}",
        a.summary()
    );

    // A late joiner that only receives: everything already published, and the channels (three
    // each from alice and bob).
    let d = TestPeer::join(addr, "dave", "R", 4, false).await;
    let late = eventually(MEDIA_WAIT, || {
        receives_exactly(&d, &[("alice", 1), ("bob", 2)])
            && d.observed.channels.lock().unwrap().len() == 6
    })
    .await;
    assert!(late, "{}", d.summary());
    // `tracks` lists what is published in the room.
    d.emit("tracks", serde_json::json!({}));
    let listed = eventually(MEDIA_WAIT, || {
        d.observed
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|(name, list)| {
                let ids: Vec<&str> = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t["trackId"].as_str())
                    .collect();
                name == "tracks"
                    && ids.len() == 4
                    && ["alice-audio", "alice-video", "bob-audio", "bob-video"]
                        .iter()
                        .all(|t| ids.contains(t))
            })
    })
    .await;
    assert!(listed, "{:?}", d.observed.events.lock().unwrap());

    // Bob leaves: his tracks end for everyone, the others keep flowing.
    b.close().await;
    let gone = eventually(MEDIA_WAIT, || {
        d.tracks_from("bob").is_empty()
            && a.tracks_from("bob").is_empty()
            && d.envelopes_of("trackUnpublished").len() == 2
    })
    .await;
    assert!(
        gone,
        "dave: {} / {:?}",
        d.summary(),
        d.envelopes_of("trackUnpublished")
    );
    let before = d
        .tracks_from("alice")
        .iter()
        .map(|r| r.packets)
        .sum::<u64>();
    assert!(
        eventually(MEDIA_WAIT, || d
            .tracks_from("alice")
            .iter()
            .map(|r| r.packets)
            .sum::<u64>()
            > before)
        .await,
        "alice still flows"
    );
    let unpublished: Vec<String> = d
        .envelopes_of("trackUnpublished")
        .iter()
        .map(|e| e["data"]["trackId"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        unpublished.contains(&"bob-audio".to_owned())
            && unpublished.contains(&"bob-video".to_owned())
    );
    a.close().await;
    d.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selective_subscription_and_mute() {
    let server = start().await;
    let addr = server.local_addr();
    let a = TestPeer::join(addr, "alice", "R", 1, true).await;
    let b = TestPeer::join(addr, "bob", "R", 2, true).await;
    assert!(
        eventually(MEDIA_WAIT, || receives_exactly(&b, &[("alice", 1)])).await,
        "{}",
        b.summary()
    );

    // Bob unsubscribes from alice's video: it is removed from his connection.
    b.emit(
        "subscribe",
        serde_json::json!({"trackIds": ["alice-video"], "subscribe": false}),
    );
    let dropped = eventually(MEDIA_WAIT, || {
        let t = b.tracks_from("alice");
        t.len() == 1 && t[0].track_id == "alice-audio"
    })
    .await;
    assert!(
        dropped,
        "{} / from alice: {:?}",
        b.summary(),
        b.tracks_from("alice")
    );
    // And back.
    b.emit(
        "subscribe",
        serde_json::json!({"trackIds": ["alice-video"], "subscribe": true}),
    );
    assert!(
        eventually(MEDIA_WAIT, || receives_exactly(&b, &[("alice", 1)])).await,
        "{}",
        b.summary()
    );

    // Alice mutes her audio: bob stops receiving it, the room hears trackMuted.
    let audio_packets = || {
        b.tracks_from("alice")
            .iter()
            .find(|r| r.track_id == "alice-audio")
            .map(|r| r.packets)
            .unwrap_or(0)
    };
    a.emit(
        "mute",
        serde_json::json!({"trackId": "alice-audio", "muted": true}),
    );
    assert!(eventually(MEDIA_WAIT, || !b.envelopes_of("trackMuted").is_empty()).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let frozen = audio_packets();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(audio_packets(), frozen, "no audio while muted");
    assert_eq!(b.envelopes_of("trackMuted")[0]["data"]["muted"], true);
    a.emit(
        "mute",
        serde_json::json!({"trackId": "alice-audio", "muted": false}),
    );
    assert!(
        eventually(MEDIA_WAIT, || audio_packets() > frozen + 5).await,
        "audio resumes after unmute"
    );

    // Bob cannot mute alice's track.
    b.emit(
        "mute",
        serde_json::json!({"trackId": "alice-video", "muted": true}),
    );
    assert!(
        eventually(MEDIA_WAIT, || b
            .envelopes_of("error")
            .iter()
            .any(|e| e["status"] == 403))
        .await
    );
    a.close().await;
    b.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribers_keyframe_request_reaches_the_publisher() {
    let server = start().await;
    let addr = server.local_addr();
    let (a, b) = alice_publishing_to_bob(addr).await;
    // Wait out the throttle window of any keyframe requests the server made by itself.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = a
        .observed
        .plis_at_publisher
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(b.send_pli_for("alice").await);
    let relayed = eventually(MEDIA_WAIT, || {
        a.observed
            .plis_at_publisher
            .load(std::sync::atomic::Ordering::SeqCst)
            > before
    })
    .await;
    assert!(relayed, "the PLI reached alice's publisher connection");
    a.close().await;
    b.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_joining_together_cost_each_subscriber_one_offer() {
    let server = start().await;
    let addr = server.local_addr();
    let watcher = TestPeer::join(addr, "watcher", "R", 9, false).await;
    // Let the watcher's session settle (it has nothing to receive yet: no offer).
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Three publishers connect; their media starts together, as when members join at once.
    let go = Arc::new(tokio::sync::Notify::new());
    let held = || Options {
        publish: true,
        chat: false,
        hold_media: Some(go.clone()),
        shape: Default::default(),
        accept_video: None,
        media_runtime: None,
        track_ids_of: None,
        encoded: None,
        token: None,
        without_msid: false,
    };
    let (x, y, z) = tokio::join!(
        TestPeer::join_with(addr, "x", "R", 1, held()),
        TestPeer::join_with(addr, "y", "R", 2, held()),
        TestPeer::join_with(addr, "z", "R", 3, held()),
    );
    // Once their connections are up, release the media of all three.
    let connected = |p: &TestPeer| {
        p.observed
            .states
            .lock()
            .unwrap()
            .iter()
            .any(|s| s == "publisher Connected")
    };
    assert!(eventually(MEDIA_WAIT, || [&x, &y, &z].into_iter().all(connected)).await);
    go.notify_waiters();
    assert!(
        eventually(MEDIA_WAIT, || receives_exactly(
            &watcher,
            &[("x", 1), ("y", 2), ("z", 3)]
        ))
        .await,
        "{}",
        watcher.summary()
    );
    let offers = watcher
        .observed
        .subscriber_offers
        .load(std::sync::atomic::Ordering::SeqCst);
    println!("subscriber offers to the watcher: {offers}");
    assert_eq!(offers, 1, "one re-offer for three joins");
    for p in [x, y, z, watcher] {
        p.close().await;
    }
    server.shutdown().await;
}

/// The server process's open file descriptors, resident memory (kB) and live tokio tasks.
async fn server_resources(node: &Process) -> (usize, u64, u64) {
    let pid = node.child.id();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let health = healthz(node.addr).await;
    (fds, rss, health["tasks"].as_u64().unwrap())
}

async fn media_sessions(node: &Process) -> u64 {
    healthz(node.addr).await["mediaSessions"].as_u64().unwrap()
}

/// The local ports of a process's UDP sockets (from /proc: its socket inodes, then the kernel's
/// UDP tables).
fn udp_ports_of(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && inodes.iter().any(|i| i == fields[9]) {
                let port = fields[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_media_goes_through_one_udp_port() {
    let node = Process::spawn(&["--media-loops", "2"], &[("RUST_LOG", "warn")]);
    let addr = node.addr;
    let a = TestPeer::join(addr, "alice", "R", 1, true).await;
    let b = TestPeer::join(addr, "bob", "R", 2, true).await;
    let c = TestPeer::join(addr, "carol", "R", 3, false).await;
    let flowing = eventually(MEDIA_WAIT, || {
        receives_exactly(&a, &[("bob", 2)])
            && receives_exactly(&b, &[("alice", 1)])
            && receives_exactly(&c, &[("alice", 1), ("bob", 2)])
    })
    .await;
    assert!(flowing, "{}\n{}\n{}", a.summary(), b.summary(), c.summary());
    let port = healthz(addr).await["media"]["port"].as_u64().unwrap() as u16;
    let ports = udp_ports_of(node.child.id());
    // One socket per event loop, and any a loop connected to one client: all on that port.
    assert!(ports.len() >= 2, "{ports:?}");
    assert!(
        ports.iter().all(|p| *p == port),
        "media port {port}, sockets on {ports:?}"
    );
    for p in [a, b, c] {
        p.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_join_leave_cycles_leave_nothing_behind() {
    // The server in its own process, so that only its own resources are counted.
    let log = std::env::var("SERVER_LOG").unwrap_or_else(|_| "warn".into());
    let node = Process::spawn(&[], &[("RUST_LOG", log.as_str())]);
    let addr = node.addr;
    let watcher = TestPeer::join(addr, "watcher", "R", 9, false).await;
    let cycle = |i: usize| {
        let (watcher, node) = (&watcher, &node);
        async move {
            let p = TestPeer::join(addr, &format!("p{i}"), "R", 1, true).await;
            // Published and forwarded to the watcher, then gone.
            let user = format!("p{i}");
            assert!(
                eventually(MEDIA_WAIT, || watcher.tracks_from(&user).len() == 2).await,
                "cycle {i}: {}",
                watcher.summary()
            );
            p.close().await;
            let deadline = tokio::time::Instant::now() + MEDIA_WAIT;
            while media_sessions(node).await != 1 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cycle {i}: session not ended"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    for i in 0..5 {
        cycle(i).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (fds0, rss0, tasks0) = server_resources(&node).await;
    let cycles: usize = std::env::var("LEAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    for i in 5..5 + cycles {
        cycle(i).await;
    }
    // Closed connections wind down within their own timeouts.
    let mut after = server_resources(&node).await;
    for _ in 0..50 {
        if after.0 <= fds0 && after.2 <= tasks0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = server_resources(&node).await;
    }
    let (fds1, rss1, tasks1) = after;
    if std::env::var("SERVER_LOG").is_ok() {
        eprintln!("{}", node.log());
    }
    println!(
        "server after 100 cycles: fds {fds0} -> {fds1}, tasks {tasks0} -> {tasks1}, rss {rss0} -> {rss1} kB"
    );
    assert!(fds1 <= fds0, "file descriptors {fds0} -> {fds1}");
    assert!(tasks1 <= tasks0, "tasks {tasks0} -> {tasks1}");
    assert!(
        rss1 < rss0 + 16 * 1024,
        "memory grew from {rss0} to {rss1} kB"
    );
    watcher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtcp_feedback_flows_both_ways() {
    let server = start().await;
    let addr = server.local_addr();
    // The publisher leaves out every 20th video packet: the server must NACK it upstream.
    let lossy = Options {
        publish: true,
        chat: false,
        hold_media: None,
        shape: MediaShape {
            skip_every: Some(20),
            ..Default::default()
        },
        accept_video: None,
        media_runtime: None,
        track_ids_of: None,
        encoded: None,
        token: None,
        without_msid: false,
    };
    let a = TestPeer::join_with(addr, "alice", "R", 1, lossy).await;
    let b = TestPeer::join(addr, "bob", "R", 2, false).await;
    assert!(
        eventually(MEDIA_WAIT, || b.tracks_from("alice").len() == 2).await,
        "{}",
        b.summary()
    );

    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    let o = &a.observed;
    // Upstream, from the server's own receive path: NACKs for the missing packets, receiver
    // reports that echo the publisher's sender reports, and TWCC feedback.
    let upstream = eventually(MEDIA_WAIT, || {
        count(&o.nacks_at_publisher) > 0
            && count(&o.reports_echoing_sr_at_publisher) > 0
            && count(&o.twcc_at_publisher) > 0
    })
    .await;
    assert!(
        upstream,
        "at alice: nacks {} receiver reports {} (echoing a sender report {}) twcc {}",
        count(&o.nacks_at_publisher),
        count(&o.receiver_reports_at_publisher),
        count(&o.reports_echoing_sr_at_publisher),
        count(&o.twcc_at_publisher)
    );
    // Only what was left out is asked for (every 20th video packet).
    let nacked = o.nacked_at_publisher.lock().unwrap().clone();
    assert!(
        nacked.iter().all(|seq| seq % 20 == 0),
        "NACKed packets that were sent: {nacked:?}"
    );
    // The publisher's media took the server's own receive path, and none of it was refused.
    let deadline = tokio::time::Instant::now() + MEDIA_WAIT;
    let media = loop {
        let media = healthz(addr).await["media"].clone();
        if media["mediaReceived"].as_u64().unwrap() > 100 || tokio::time::Instant::now() > deadline
        {
            break media;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(media["mediaReceived"].as_u64().unwrap() > 100, "{media}");
    assert_eq!(media["mediaRejected"].as_u64(), Some(0), "{media}");
    // Downstream: a sender report for each forwarded track.
    let reports = eventually(MEDIA_WAIT, || {
        b.tracks_from("alice").iter().all(|r| r.sender_reports > 0)
    })
    .await;
    assert!(
        reports,
        "{:?}",
        b.tracks_from("alice")
            .iter()
            .map(|r| r.sender_reports)
            .collect::<Vec<_>>()
    );
    // A subscriber's NACK is answered from the server's retransmission buffer.
    let repeated = || {
        b.tracks_from("alice")
            .iter()
            .map(|r| r.repeated)
            .sum::<u64>()
    };
    let before = repeated();
    assert!(b.nack_last_video_of("alice").await.is_some());
    assert!(
        eventually(MEDIA_WAIT, || repeated() > before).await,
        "no retransmission for the NACK"
    );
    a.close().await;
    b.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gets_a_track_only_in_a_codec_its_answer_accepts() {
    let server = start().await;
    let addr = server.local_addr();
    let a = TestPeer::join(addr, "alice", "R", 1, true).await; // Opus + VP8
    let h264_only = Options {
        publish: false,
        chat: false,
        hold_media: None,
        shape: Default::default(),
        accept_video: Some(vec!["video/H264"]),
        media_runtime: None,
        track_ids_of: None,
        encoded: None,
        token: None,
        without_msid: false,
    };
    let b = TestPeer::join_with(addr, "bob", "R", 2, h264_only).await;
    let c = TestPeer::join(addr, "carol", "R", 3, false).await;
    // Carol takes everything; bob gets alice's audio and never her VP8 video.
    assert!(
        eventually(MEDIA_WAIT, || c.tracks_from("alice").len() == 2).await,
        "{}",
        c.summary()
    );
    assert!(
        eventually(MEDIA_WAIT, || b.tracks_from("alice").len() == 1).await,
        "{}",
        b.summary()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = b.tracks_from("alice");
    assert_eq!(got.len(), 1, "{}", b.summary());
    assert_eq!(got[0].kind, "audio");
    a.close().await;
    b.close().await;
    c.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_media_port_and_the_advertised_address_follow_the_config() {
    let port = common::free_udp_port();
    let mut config = common::test_config();
    config.media.udp_port = port;
    // Advertised instead of the bound 127.0.0.1, as behind a 1:1 NAT (still loopback here).
    config.media.public_ip = "127.0.0.2".into();
    let server = switchboard::Server::start(config.clone()).await.unwrap();
    // A second server on the same port fails at start and says why, instead of silently taking
    // half of the first one's packets.
    let err = switchboard::Server::start(config)
        .await
        .err()
        .expect("the port is taken");
    assert!(
        format!("{err:#}").contains("in use"),
        "a clear message: {err:#}"
    );
    let a = TestPeer::join(server.local_addr(), "alice", "R", 1, true).await;
    let from_server = || {
        a.envelopes_of("candidate")
            .into_iter()
            .filter_map(|e| {
                e["data"]["candidate"]["candidate"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect::<Vec<String>>()
    };
    assert!(
        eventually(MEDIA_WAIT, || !from_server().is_empty()).await,
        "no candidate from the server"
    );
    for c in from_server() {
        let fields: Vec<&str> = c.split(' ').collect();
        assert_eq!(fields[4], "127.0.0.2", "{c}");
        assert_eq!(fields[5], port.to_string(), "{c}");
    }
    let answer = a.envelopes_of("answer");
    let sdp = answer[0]["data"]["sdp"]["sdp"].as_str().unwrap();
    assert!(
        !sdp.contains("127.0.0.1 "),
        "the bound address never shows: {sdp}"
    );
    a.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_connections_die_is_removed_everywhere() {
    let mut config = common::test_config();
    (config.media.ice_disconnected_ms, config.media.ice_failed_ms) = (500, 1500);
    let server = switchboard::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    // Alice's peer connections live on their own runtime; her signaling does not.
    let media = own_media_runtime();
    let doomed = Options {
        publish: true,
        chat: true,
        media_runtime: Some(media.handle().clone()),
        ..Default::default()
    };
    let a = TestPeer::join_with(addr, "alice", "R", 1, doomed).await;
    let b = TestPeer::join(addr, "bob", "R", 2, false).await;
    assert!(
        eventually(MEDIA_WAIT, || b.tracks_from("alice").len() == 2).await,
        "{}",
        b.summary()
    );

    // The network fails: alice's connections vanish without a goodbye; her socket stays.
    media.shutdown_background();
    let removed = eventually(MEDIA_WAIT, || {
        let gone: Vec<String> = b
            .envelopes_of("trackUnpublished")
            .iter()
            .filter_map(|e| e["data"]["trackId"].as_str().map(str::to_owned))
            .collect();
        gone.contains(&"alice-audio".to_owned()) && gone.contains(&"alice-video".to_owned())
    })
    .await;
    assert!(
        removed,
        "alice's tracks are unpublished once her connection fails: {:?}",
        b.envelopes_of("trackUnpublished")
    );
    assert!(
        eventually(MEDIA_WAIT, || b.tracks_from("alice").is_empty()).await,
        "{}",
        b.summary()
    );
    // Alice's signaling still works, and it tells her that her media session has ended.
    let ended = a.envelopes_of("mediaEnded");
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0]["data"]["reason"], "connection failed");
    assert_eq!(ended[0]["data"]["fromUid"], "sfu");
    b.close().await;
    drop(a);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mdns_candidate_is_ignored_without_an_error() {
    // Browsers hide private host addresses behind `.local` names; mDNS is off on the server, so
    // such a candidate is dropped quietly and the connection carries on.
    let server = start().await;
    let addr = server.local_addr();
    let (a, b) = alice_publishing_to_bob(addr).await;
    for pc in ["publisher", "subscriber"] {
        a.emit(
            "candidate",
            serde_json::json!({"targetUid": "sfu", "pc": pc, "candidate": {
                "candidate": "candidate:1 1 udp 2122260223 4f1c2a9e-0b7d-4c55-9a51-5d0e8f1b2c3d.local 50000 typ host generation 0",
                "sdpMid": "0", "sdpMLineIndex": 0}}),
        );
    }
    assert!(keeps_receiving(&b, "alice").await, "{}", b.summary());
    assert_eq!(a.envelopes_of("error"), Vec::<serde_json::Value>::new());
    a.close().await;
    b.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_are_limited_in_size_and_number() {
    let server = start().await;
    let addr = server.local_addr();
    let (a, b) = alice_publishing_to_bob(addr).await;
    let candidate = |port: u32, pad: usize| {
        serde_json::json!({"targetUid": "sfu", "pc": "publisher", "candidate": {
            "candidate": format!("candidate:{port} 1 udp 2122260223 127.0.0.1 {port} typ host{}", " ".repeat(pad)),
            "sdpMid": "0", "sdpMLineIndex": 0}})
    };
    a.emit("candidate", candidate(40000, 2000));
    for port in 40001..40071 {
        a.emit("candidate", candidate(port, 0));
    }
    let refused = |why: &str| {
        a.envelopes_of("error")
            .iter()
            .filter(|e| e["msg"].as_str().unwrap_or("").contains(why))
            .count()
    };
    assert!(
        eventually(MEDIA_WAIT, || refused("more than 64") > 0).await,
        "{:?}",
        a.envelopes_of("error")
    );
    assert_eq!(refused("longer than 1024 bytes"), 1);
    // The client's own candidates were among the first; media keeps flowing.
    assert!(keeps_receiving(&b, "alice").await, "{}", b.summary());
    a.close().await;
    b.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_that_fails_part_way_does_not_block_the_next_one() {
    let server = start().await;
    let addr = server.local_addr();
    let mut c = common::join(addr, "carol", Some("R")).await;
    let good = common::peer::sample_offer().await;
    // Parses, but its media section has no mid: webrtc fails after entering have-remote-offer.
    let bad: String = good
        .lines()
        .filter(|l| !l.starts_with("a=mid:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    let offer = |sdp: &str| serde_json::json!({"targetUid": "sfu", "pc": "publisher", "sdp": {"type": "offer", "sdp": sdp}});
    c.emit("offer", &offer(&bad)).unwrap();
    let refused = c
        .recv_msg_type("error", MEDIA_WAIT)
        .await
        .expect("an error");
    assert_eq!(refused["status"], 400, "{refused}");
    // A candidate that overtakes the next offer waits for it, as before the failed one.
    c.emit(
        "candidate",
        &serde_json::json!({"targetUid": "sfu", "pc": "publisher", "candidate": {
            "candidate": "candidate:1 1 udp 2122260223 127.0.0.1 40000 typ host",
            "sdpMid": "0", "sdpMLineIndex": 0}}),
    )
    .unwrap();
    c.emit("offer", &offer(&good)).unwrap();
    // Everything that comes back until a while after the answer: an answer, and no error.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + MEDIA_WAIT;
    let mut until = deadline;
    while let Ok(switchboard::load::signaling::Packet::Event { args, .. }) = c
        .recv_event(
            "msg",
            until.saturating_duration_since(tokio::time::Instant::now()),
        )
        .await
    {
        let envelope = args.into_iter().next().unwrap_or_default();
        if envelope["type"] == "answer" && until == deadline {
            until = tokio::time::Instant::now() + Duration::from_millis(300);
        }
        seen.push(envelope);
    }
    let answered = seen.iter().any(|a| {
        a["type"] == "answer"
            && a["data"]["fromUid"] == "sfu"
            && a["data"]["sdp"]["sdp"]
                .as_str()
                .unwrap_or("")
                .contains("a=mid:")
    });
    assert!(answered, "{seen:?}");
    assert!(
        !seen.iter().any(|m| m["type"] == "error"),
        "the candidate that overtook the offer was held for it: {seen:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_subscriber_misses_data_messages_instead_of_growing_memory() {
    let mut config = common::test_config();
    config.media.data_channel_buffer_bytes = 64 * 1024;
    let server = switchboard::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    // Bob's peer connections live on their own runtime, which stops: his SCTP acknowledges
    // nothing from then on, as a subscriber on a dead link would.
    let media = own_media_runtime();
    let lagging = Options {
        media_runtime: Some(media.handle().clone()),
        ..Default::default()
    };
    let a = TestPeer::join(addr, "alice", "R", 1, true).await;
    let b = TestPeer::join_with(addr, "bob", "R", 2, lagging).await;
    let c = TestPeer::join(addr, "carol", "R", 3, false).await;
    let alice_chat_binaries = |p: &TestPeer| {
        p.observed
            .channels
            .lock()
            .unwrap()
            .iter()
            .find(|ch| ch.label == "chat" && ch.protocol == "alice")
            .map(|ch| ch.binaries.len())
    };
    let chat = a.chat.clone().unwrap();
    let chat_open = || a.chat_open.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        eventually(MEDIA_WAIT, || chat_open()
            && alice_chat_binaries(&b).is_some()
            && alice_chat_binaries(&c).is_some())
        .await,
        "alice's chat open: {}\n{}\n{}\n{}",
        chat_open(),
        a.summary(),
        b.summary(),
        c.summary()
    );
    chat.send(BytesMut::from(&b"ping"[..])).await.unwrap();
    assert!(
        eventually(MEDIA_WAIT, || alice_chat_binaries(&b) == Some(1)
            && alice_chat_binaries(&c) == Some(1))
        .await,
        "both get alice's chat"
    );
    media.shutdown_background();

    // 256 KiB, paced so that carol keeps up, through a 64 KiB budget for bob: carol gets all
    // of it, bob's copy fills up and the rest of his share is dropped.
    const MESSAGES: usize = 32;
    for i in 0..MESSAGES {
        chat.send(BytesMut::from(&vec![i as u8; 8 * 1024][..]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        eventually(MEDIA_WAIT, || alice_chat_binaries(&c) == Some(1 + MESSAGES)).await,
        "carol got {:?} of {MESSAGES}",
        alice_chat_binaries(&c)
    );
    let health = healthz(addr).await;
    let dropped = health["dataMessagesDropped"].as_u64().unwrap();
    assert!(
        dropped > 0 && dropped < MESSAGES as u64,
        "bob's copy holds at most 64 KiB, the rest is dropped: {health}"
    );
    a.close().await;
    c.close().await;
    drop(b);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_track_id_another_member_publishes_is_refused() {
    let server = start().await;
    let addr = server.local_addr();
    let (a, b) = alice_publishing_to_bob(addr).await;
    // Mallory publishes tracks with alice's ids.
    let copycat = Options {
        publish: true,
        track_ids_of: Some("alice".into()),
        ..Default::default()
    };
    let m = TestPeer::join_with(addr, "mallory", "R", 3, copycat).await;
    let refused = eventually(MEDIA_WAIT, || {
        m.envelopes_of("error")
            .iter()
            .filter(|e| e["status"] == 409 && e["data"]["event"] == "offer")
            .count()
            == 2
    })
    .await;
    assert!(refused, "{:?}", m.envelopes_of("error"));
    // Bob still gets exactly alice's two tracks, and nothing from mallory; alice is unaffected.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receives_exactly(&b, &[("alice", 1)]), "{}", b.summary());
    assert!(b.tracks_from("mallory").is_empty(), "{}", b.summary());
    assert!(
        !b.envelopes_of("trackPublished")
            .iter()
            .any(|e| e["data"]["userId"] == "mallory"),
        "no trackPublished for the refused tracks"
    );
    a.close().await;
    b.close().await;
    m.close().await;
    server.shutdown().await;
}

/// A member publishing more tracks or data channels than allowed: the extra ones are refused
/// with an error envelope naming the limit and counted; the rest is forwarded as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_past_the_member_limits_is_refused_and_counted() {
    let mut config = common::test_config();
    config.media.max_tracks_per_member = 1;
    config.media.max_data_channels_per_member = 2;
    let server = switchboard::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    // Alice publishes two tracks and three channels ("state", "cursor", "chat").
    let a = TestPeer::join(addr, "alice", "R", 1, true).await;
    let b = TestPeer::join(addr, "bob", "R", 2, false).await;
    let refusals = |needle: &str| {
        (a.envelopes_of("error").iter())
            .filter(|e| e["status"] == 409 && e["data"]["event"] == "offer")
            .filter(|e| e["msg"].as_str().is_some_and(|m| m.contains(needle)))
            .count()
    };
    let refused = eventually(MEDIA_WAIT, || {
        refusals("max_tracks_per_member") == 1 && refusals("max_data_channels_per_member") == 1
    })
    .await;
    assert!(refused, "{:?}", a.envelopes_of("error"));
    let forwarded = eventually(MEDIA_WAIT, || {
        let tracks = b.tracks_from("alice");
        let channels = b.observed.channels.lock().unwrap().len();
        tracks.len() == 1 && tracks[0].packets >= 5 && channels == 2
    })
    .await;
    assert!(forwarded, "{}", b.summary());
    let media = &healthz(addr).await["media"];
    assert_eq!(
        (
            media["tracksRefused"].as_u64(),
            media["channelsRefused"].as_u64()
        ),
        (Some(1), Some(1)),
        "{media}"
    );
    a.close().await;
    b.close().await;
    server.shutdown().await;
}

/// A client that leaves `a=msid` out (some that are not browsers do): its tracks go by their
/// mid, and an offer that changes nothing keeps them published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracks_without_msid_go_by_their_mid_and_survive_renegotiation() {
    let server = start().await;
    let addr = server.local_addr();
    let options = Options {
        publish: true,
        chat: true,
        without_msid: true,
        ..Default::default()
    };
    let a = TestPeer::join_with(addr, "alice", "R", 1, options).await;
    let b = TestPeer::join(addr, "bob", "R", 2, false).await;
    let ids = || {
        let mut ids: Vec<String> = (b.tracks_from("alice").into_iter())
            .filter(|t| t.packets >= 5)
            .map(|t| t.track_id)
            .collect();
        ids.sort();
        ids
    };
    let by_mid = eventually(MEDIA_WAIT, || ids() == ["alice-mid0", "alice-mid1"]).await;
    assert!(by_mid, "{}", b.summary());
    a.offer_again().await;
    assert!(
        eventually(MEDIA_WAIT, || a.envelopes_of("answer").len() >= 2).await,
        "{}",
        a.summary()
    );
    assert!(keeps_receiving(&b, "alice").await, "{}", b.summary());
    assert_eq!(ids(), ["alice-mid0", "alice-mid1"], "{}", b.summary());
    assert!(
        b.envelopes_of("trackUnpublished").is_empty(),
        "{:?}",
        b.envelopes_of("trackUnpublished")
    );
    a.close().await;
    b.close().await;
    server.shutdown().await;
}
