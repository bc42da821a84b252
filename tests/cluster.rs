//! One room across nodes (issue 10, docs/CLUSTER.md): nodes on one real Redis, each with its
//! own media address on loopback, and webrtc-rs members spread over them.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;

use serde_json::{Value, json};
use switchboard::Server;

use common::peer::{MEDIA_WAIT, TestPeer, keeps_receiving, receives_exactly};
use common::{Redis, eventually, healthz, test_config};

/// A node on `redis` whose media port is on `media_ip` (each node its own loopback address).
async fn node(redis: &Redis, id: &str, media_ip: &str) -> Server {
    let mut c = test_config();
    c.redis.url = redis.url();
    c.server.node_id = id.to_owned();
    c.redis.heartbeat_ms = 500;
    c.redis.node_ttl_ms = 1500;
    c.media.ip = media_ip.parse().unwrap();
    Server::start(c).await.expect("node starts")
}

fn media(h: &Value, counter: &str) -> u64 {
    h["media"][counter]
        .as_u64()
        .unwrap_or_else(|| panic!("{counter} in {h}"))
}

fn track_ids(envelopes: &[Value]) -> Vec<String> {
    envelopes
        .iter()
        .map(|e| e["data"]["trackId"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_two_nodes_form_one_meeting_and_each_track_crosses_once() {
    let redis = Redis::start();
    let n1 = node(&redis, "n1", "127.0.0.2").await;
    let n2 = node(&redis, "n2", "127.0.0.3").await;
    let (a1, a2) = (n1.local_addr(), n2.local_addr());
    // Publishers on both nodes, and a receive-only member on each.
    let alice = TestPeer::join(a1, "alice", "R", 1, true).await;
    let bob = TestPeer::join(a2, "bob", "R", 2, true).await;
    let carol = TestPeer::join(a2, "carol", "R", 3, false).await;
    let dave = TestPeer::join(a1, "dave", "R", 4, false).await;

    let meeting = eventually(MEDIA_WAIT, || {
        receives_exactly(&alice, &[("bob", 2)])
            && receives_exactly(&bob, &[("alice", 1)])
            && receives_exactly(&carol, &[("alice", 1), ("bob", 2)])
            && receives_exactly(&dave, &[("alice", 1), ("bob", 2)])
    })
    .await;
    assert!(
        meeting,
        "alice: {}\nbob: {}\ncarol: {}\ndave: {}\nn1: {}\nn2: {}",
        alice.summary(),
        bob.summary(),
        carol.summary(),
        dave.summary(),
        healthz(a1).await["media"],
        healthz(a2).await["media"]
    );

    // Data channels cross: each publisher's three channels reach the other node's members with
    // the sender as protocol and the same reliability; messages arrive in order, byte for byte.
    for p in [&alice, &bob] {
        assert!(eventually(MEDIA_WAIT, || p.chat_open.load(Ordering::SeqCst)).await);
        let chat = p.chat.as_ref().unwrap();
        for i in 0..50 {
            chat.send_text(&format!("{} says {i} ✓", p.user))
                .await
                .unwrap();
        }
        chat.send(BytesMut::from(&[0u8, 1, 2, 255][..]))
            .await
            .unwrap();
    }
    let said = |user: &str| {
        (0..50)
            .map(|i| format!("{user} says {i} ✓"))
            .collect::<Vec<_>>()
    };
    let chat_from = |p: &TestPeer, from: &str| {
        let channels = p.observed.channels.lock().unwrap();
        channels.iter().any(|ch| {
            ch.label == "chat"
                && ch.protocol == from
                && ch.texts == said(from)
                && ch.binaries == [vec![0u8, 1, 2, 255]]
        })
    };
    let chatted = eventually(MEDIA_WAIT, || {
        chat_from(&alice, "bob")
            && chat_from(&bob, "alice")
            && chat_from(&carol, "alice")
            && chat_from(&carol, "bob")
            && chat_from(&dave, "alice")
            && chat_from(&dave, "bob")
    })
    .await;
    assert!(
        chatted,
        "carol: {:?}\nalice: {:?}",
        carol.observed.channels.lock().unwrap(),
        alice.observed.channels.lock().unwrap()
    );
    let copies = carol.observed.channels.lock().unwrap().clone();
    let state = copies
        .iter()
        .find(|c| c.label == "state" && c.protocol == "alice")
        .expect("alice's state channel on the other node");
    assert!(
        !state.ordered && state.max_retransmits == Some(2),
        "{state:?}"
    );
    let cursor = copies
        .iter()
        .find(|c| c.label == "cursor" && c.protocol == "alice")
        .expect("alice's cursor channel on the other node");
    assert!(
        cursor.ordered && cursor.max_packet_life_time == Some(150),
        "{cursor:?}"
    );

    // Each node sends its publisher's packets once to the other node, although two members
    // there receive them: what crossed is about what the node received, not twice that.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (from, to) in [(a1, a2), (a2, a1)] {
        let (sender, receiver) = (healthz(from).await, healthz(to).await);
        let (received, relayed) = (
            media(&sender, "mediaReceived"),
            media(&sender, "relayedOut"),
        );
        assert!(
            relayed > 100 && relayed * 10 < received * 12,
            "{from} received {received} packets and relayed {relayed}"
        );
        let arrived = media(&receiver, "relayedIn");
        assert!(
            arrived > 100 && arrived <= relayed + 10,
            "{arrived} of {relayed} arrived"
        );
    }

    // `tracks` lists the whole room on either node.
    carol.emit("tracks", json!({}));
    let listed = eventually(MEDIA_WAIT, || {
        carol
            .observed
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|(name, list)| {
                let mut ids: Vec<&str> = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t["trackId"].as_str())
                    .collect();
                ids.sort();
                name == "tracks" && ids == ["alice-audio", "alice-video", "bob-audio", "bob-video"]
            })
    })
    .await;
    assert!(listed, "{:?}", carol.observed.events.lock().unwrap());

    // Mute crosses: bob's audio stops reaching alice (other node) and resumes.
    let audio_from_bob = |p: &TestPeer| {
        p.tracks_from("bob")
            .iter()
            .find(|r| r.track_id == "bob-audio")
            .map_or(0, |r| r.packets)
    };
    bob.emit("mute", json!({"trackId": "bob-audio", "muted": true}));
    assert!(eventually(MEDIA_WAIT, || !alice.envelopes_of("trackMuted").is_empty()).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = audio_from_bob(&alice);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        audio_from_bob(&alice),
        frozen,
        "no audio across while muted"
    );
    bob.emit("mute", json!({"trackId": "bob-audio", "muted": false}));
    assert!(
        eventually(MEDIA_WAIT, || audio_from_bob(&alice) > frozen + 5).await,
        "audio resumes across after unmute"
    );

    // Alice leaves: her tracks end on the other node too; bob's keep flowing to dave.
    alice.close().await;
    let gone = eventually(MEDIA_WAIT, || {
        carol.tracks_from("alice").is_empty()
            && bob.tracks_from("alice").is_empty()
            && dave.tracks_from("alice").is_empty()
    })
    .await;
    assert!(gone, "carol: {}\nbob: {}", carol.summary(), bob.summary());
    let mut unpublished = track_ids(&carol.envelopes_of("trackUnpublished"));
    unpublished.sort();
    assert_eq!(unpublished, ["alice-audio", "alice-video"]);
    assert!(keeps_receiving(&dave, "bob").await, "{}", dave.summary());

    for p in [bob, carol, dave] {
        p.close().await;
    }
    n1.shutdown().await;
    n2.shutdown().await;
}
