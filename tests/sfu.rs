//! PROTOCOL.md Part 2 with webrtc-rs clients over loopback: publishing, forwarding, data
//! channels, late joiners, leaving, selective subscription, mute, keyframe requests, teardown.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::peer::{TestPeer, payload};
use common::{eventually, start};

const MEDIA_WAIT: Duration = Duration::from_secs(20);

/// Whether `peer` receives exactly the audio and video of each of `publishers`, with the
/// publisher's userId as stream id and the payloads as the publisher sent them.
fn receives_exactly(peer: &TestPeer, publishers: &[(&str, u8)]) -> bool {
    let live = peer.live_tracks();
    let flowing: Vec<_> = live.iter().filter(|r| r.packets >= 5).collect();
    if flowing.len() != publishers.len() * 2 {
        return false;
    }
    publishers.iter().all(|(user, index)| {
        let tracks = peer.tracks_from(user);
        tracks.len() == 2
            && tracks.iter().all(|r| {
                let video = r.kind == "video";
                let expected_id = if video {
                    format!("{user}-video")
                } else {
                    format!("{user}-audio")
                };
                r.track_id == expected_id
                    && r.first_payloads.iter().all(|p| {
                        // Same bytes as sent: marker byte for the user, then the counter.
                        let at = if video { 3 } else { 2 };
                        let n = u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
                        let keyframe = video && p[1] == 0x00;
                        *p == payload(*index, video, n, keyframe)
                    })
            })
    })
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
            }) && channels.len() == 2
        })
    })
    .await;
    assert!(
        delivered,
        "channels seen by alice: {:?}",
        a.observed.channels.lock().unwrap()
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
