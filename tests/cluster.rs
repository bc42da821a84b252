//! One room across nodes (issue 10, docs/CLUSTER.md): nodes on one real Redis, each with its
//! own media address on loopback, and webrtc-rs members spread over them.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;

use serde_json::{Value, json};
use switchboard::Server;
use switchboard::cluster::{BusEvent, MediaEvent};

use common::peer::{MEDIA_WAIT, TestPeer, keeps_receiving, receives_exactly};
use common::{Process, Redis, eventually, healthz, test_config};

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
    // A third node with a member of another room only: it hears every announcement of room
    // R, and must get none of its media.
    let n3 = node(&redis, "n3", "127.0.0.4").await;
    let olga = TestPeer::join(n3.local_addr(), "olga", "other", 7, false).await;
    let (a1, a2) = (n1.local_addr(), n2.local_addr());
    // Publishers on both nodes, and a receive-only member on each.
    let alice = TestPeer::join(a1, "alice", "R", 1, true).await;
    let dave = TestPeer::join(a1, "dave", "R", 4, false).await;
    // n2 opens the room once alice's tracks are there (n1's answer lists them).
    assert!(eventually(MEDIA_WAIT, || receives_exactly(&dave, &[("alice", 1)])).await);
    let bob = TestPeer::join(a2, "bob", "R", 2, true).await;
    let carol = TestPeer::join(a2, "carol", "R", 3, false).await;

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
    // A node's pipe traffic reaches the loop that holds the room by itself (a socket connected
    // to the peer there), not handed over from another loop packet by packet.
    for addr in [a1, a2] {
        let before = healthz(addr).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = healthz(addr).await;
        let delta = |k: &str| media(&after, k) - media(&before, k);
        assert!(
            delta("relayedIn") > 40 && delta("handedOver") * 10 < delta("relayedIn"),
            "{addr}: {} handed over of {} relayed in",
            delta("handedOver"),
            delta("relayedIn")
        );
    }
    let bystander = healthz(n3.local_addr()).await;
    assert_eq!(media(&bystander, "relayedIn"), 0, "{bystander}");
    assert_eq!(media(&bystander, "unrouted"), 0, "{bystander}");

    // A keyframe request of a subscriber on the other node reaches the publisher (once the
    // throttle window of the requests the nodes made by themselves is over).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let plis = || alice.observed.plis_at_publisher.load(Ordering::SeqCst);
    let before = plis();
    assert!(carol.send_pli_for("alice").await);
    assert!(
        eventually(MEDIA_WAIT, || plis() > before).await,
        "carol's PLI reached alice on the other node"
    );

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

    // Bob connects again, to n1 (a reconnect through a load balancer) without leaving: his
    // connection on n2 is replaced, and his tracks now come from n1, to carol on n2 and dave
    // on n1, under the same ids.
    let relayed_by_n1 = media(&healthz(a1).await, "relayedOut");
    let bob_again = TestPeer::join(a1, "bob", "R", 2, true).await;
    let moved = eventually(MEDIA_WAIT, || {
        receives_exactly(&carol, &[("bob", 2)]) && receives_exactly(&dave, &[("bob", 2)])
    })
    .await;
    assert!(
        moved,
        "carol: {}\ndave: {}",
        carol.summary(),
        dave.summary()
    );
    assert!(keeps_receiving(&carol, "bob").await, "{}", carol.summary());
    assert!(keeps_receiving(&dave, "bob").await, "{}", dave.summary());
    let relayed_now = media(&healthz(a1).await, "relayedOut");
    assert!(relayed_now > relayed_by_n1 + 100, "n1 relays bob now");

    for p in [bob, bob_again, carol, dave, olga] {
        p.close().await;
    }
    n1.shutdown().await;
    n2.shutdown().await;
    n3.shutdown().await;
}

/// A node in its own process (so it can be killed, and its resources counted).
fn node_process(redis: &Redis, id: &str, media_ip: &str) -> Process {
    Process::spawn(
        &[
            "--redis",
            &redis.url(),
            "--node-id",
            id,
            "--media-ip",
            media_ip,
        ],
        &[
            ("SWITCHBOARD_REDIS__HEARTBEAT_MS", "500"),
            ("SWITCHBOARD_REDIS__NODE_TTL_MS", "1500"),
            ("RUST_LOG", "warn"),
        ],
    )
}

/// Packets of `publisher`'s tracks `peer` has received.
fn packets_from(peer: &TestPeer, publisher: &str) -> u64 {
    peer.tracks_from(publisher).iter().map(|r| r.packets).sum()
}

/// The survivor's file descriptors, tasks and heap bytes in use.
async fn resources(node: &Process) -> (usize, u64, u64) {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", node.child.id()))
        .map(|d| d.count())
        .unwrap_or(0);
    let h = healthz(node.addr).await;
    (
        fds,
        h["tasks"].as_u64().unwrap(),
        h["memory"]["heapInUse"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_costs_the_others_only_its_members_and_rejoins_cleanly() {
    let redis = Redis::start();
    let n1 = node_process(&redis, "n1", "127.0.0.2");
    let n2 = node(&redis, "n2", "127.0.0.3").await;
    let alice = TestPeer::join(n1.addr, "alice", "R", 1, true).await;
    let bob = TestPeer::join(n2.local_addr(), "bob", "R", 2, true).await;
    assert!(
        eventually(MEDIA_WAIT, || receives_exactly(&alice, &[("bob", 2)])
            && receives_exactly(&bob, &[("alice", 1)]))
        .await,
        "alice: {}\nbob: {}",
        alice.summary(),
        bob.summary()
    );

    // Each life of a third node: carol joins the meeting late on it, everyone gets everything;
    // then the node is killed.
    let mut before = None;
    for life in 0..4 {
        let n3 = node_process(&redis, "n3", "127.0.0.4");
        let carol = TestPeer::join(n3.addr, "carol", "R", 3, true).await;
        let joined = eventually(MEDIA_WAIT, || {
            receives_exactly(&carol, &[("alice", 1), ("bob", 2)])
                && receives_exactly(&alice, &[("bob", 2), ("carol", 3)])
                && receives_exactly(&bob, &[("alice", 1), ("carol", 3)])
        })
        .await;
        assert!(
            joined,
            "life {life}\ncarol: {}\nalice: {}\nbob: {}",
            carol.summary(),
            alice.summary(),
            bob.summary()
        );
        let unpublished_before = bob.envelopes_of("trackUnpublished").len();
        n3.signal("-KILL");
        // The survivors' media between themselves never stops: more arrives every 200 ms.
        let mut last = (packets_from(&alice, "bob"), packets_from(&bob, "alice"));
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = (packets_from(&alice, "bob"), packets_from(&bob, "alice"));
            assert!(
                now.0 > last.0 && now.1 > last.1,
                "life {life}: media between survivors paused ({last:?} -> {now:?})"
            );
            last = now;
        }
        // Carol's tracks are unpublished on both survivors within the dead-node timeout.
        let gone = eventually(Duration::from_secs(8), || {
            alice.tracks_from("carol").is_empty()
                && bob.tracks_from("carol").is_empty()
                && bob.envelopes_of("trackUnpublished").len() == unpublished_before + 2
        })
        .await;
        assert!(
            gone,
            "life {life}\nalice: {}\nbob: {}\n{:?}",
            alice.summary(),
            bob.summary(),
            bob.envelopes_of("trackUnpublished")
        );
        drop(carol);
        // Nothing of a dead node stays on a survivor: measured after the first life, again
        // after three more.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = resources(&n1).await;
        match before {
            None => before = Some(now),
            Some((fds, tasks, heap)) if life == 3 => {
                println!(
                    "survivor after 3 node deaths: fds {fds} -> {}, tasks {tasks} -> {}, heap {heap} -> {} bytes",
                    now.0, now.1, now.2
                );
                assert!(now.0 <= fds, "file descriptors {fds} -> {}", now.0);
                assert!(now.1 <= tasks, "tasks {tasks} -> {}", now.1);
                assert!(now.2 < heap + 512 * 1024, "heap {heap} -> {}", now.2);
            }
            Some(_) => {}
        }
    }
    assert!(keeps_receiving(&alice, "bob").await);
    alice.close().await;
    bob.close().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_node_missed_is_caught_up_and_a_false_death_heals() {
    let mut redis = Redis::start();
    let n1 = node(&redis, "n1", "127.0.0.2").await;
    let n2 = node(&redis, "n2", "127.0.0.3").await;
    let alice = TestPeer::join(n1.local_addr(), "alice", "R", 1, true).await;
    let carol = TestPeer::join(n2.local_addr(), "carol", "R", 3, false).await;
    assert!(
        eventually(MEDIA_WAIT, || receives_exactly(&carol, &[("alice", 1)])).await,
        "{}",
        carol.summary()
    );

    // While Redis is down, alice leaves and erin publishes on n1: n2 hears of neither then
    // (n1 holds its announcements; whether n2 gets them depends on who reconnects first).
    redis.stop();
    alice.close().await;
    let erin = TestPeer::join(n1.local_addr(), "erin", "R", 5, true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();

    // Once the bus is back, n2 asks again: alice's tracks are gone there, erin's arrive.
    let caught_up = eventually(Duration::from_secs(30), || {
        carol.tracks_from("alice").is_empty() && receives_exactly(&carol, &[("erin", 5)])
    })
    .await;
    assert!(caught_up, "{}", carol.summary());

    // Announcements lost for good: Redis drops the subscriptions (as it does with a
    // subscriber that falls behind), and erin leaves at once, while they reconnect: her
    // tracks' end is published to nobody. n2 asks again once subscribed.
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut redis.conn())
        .unwrap();
    erin.close().await;
    let frank = TestPeer::join(n1.local_addr(), "frank", "R", 6, true).await;
    let caught_up = eventually(Duration::from_secs(30), || {
        carol.tracks_from("erin").is_empty() && receives_exactly(&carol, &[("frank", 6)])
    })
    .await;
    assert!(caught_up, "{}", carol.summary());
    let mut unpublished = track_ids(&carol.envelopes_of("trackUnpublished"));
    unpublished.dedup();
    assert!(
        ["erin-audio", "erin-video"]
            .iter()
            .all(|t| unpublished.contains(&t.to_string())),
        "carol is told erin's tracks are gone: {unpublished:?}"
    );

    // Carol reloads: n2's room closes and opens again, and n1 relays to it afresh.
    carol.close().await;
    let carol = TestPeer::join(n2.local_addr(), "carol", "R", 3, false).await;
    let gina = TestPeer::join(n2.local_addr(), "gina", "R", 8, true).await;
    let both_ways = eventually(MEDIA_WAIT, || {
        receives_exactly(&carol, &[("frank", 6), ("gina", 8)])
            && receives_exactly(&frank, &[("gina", 8)])
    })
    .await;
    assert!(
        both_ways,
        "carol: {}\nfrank: {}",
        carol.summary(),
        frank.summary()
    );

    // Another node's registry takes n2 for dead by mistake (a stalled heartbeat): n1 drops
    // n2's tracks, n2 hears it about itself, draws new keys and asks again; the meeting heals.
    let frame = BusFrame {
        origin: "a-reaper".into(),
        event: BusEvent::Media(MediaEvent::NodeGone { node: "n2".into() }),
    };
    let _: i64 = redis::cmd("PUBLISH")
        .arg("switchboard:bus")
        .arg(rmp_serde::to_vec(&frame).unwrap())
        .query(&mut redis.conn())
        .unwrap();
    // n1 dropped gina's channels and opened them again: frank saw each one twice.
    let chats_from_gina = || {
        let channels = frank.observed.channels.lock().unwrap();
        channels
            .iter()
            .filter(|c| c.label == "chat" && c.protocol == "gina")
            .count()
    };
    assert!(
        eventually(MEDIA_WAIT, || chats_from_gina() == 2).await,
        "n1 took n2 for gone and back: {}",
        frank.summary()
    );
    let healed = eventually(MEDIA_WAIT, || {
        receives_exactly(&frank, &[("gina", 8)])
            && receives_exactly(&carol, &[("frank", 6), ("gina", 8)])
    })
    .await;
    assert!(
        healed,
        "frank: {}\ncarol: {}",
        frank.summary(),
        carol.summary()
    );
    assert!(keeps_receiving(&frank, "gina").await, "{}", frank.summary());
    assert!(
        keeps_receiving(&carol, "frank").await,
        "{}",
        carol.summary()
    );

    for p in [frank, carol, gina] {
        p.close().await;
    }
    n1.shutdown().await;
    n2.shutdown().await;
}

/// A frame on the bus as the nodes write it (origin, event), to speak for a node in a test.
#[derive(serde::Serialize)]
struct BusFrame {
    origin: String,
    event: BusEvent,
}

#[tokio::test]
async fn a_relay_address_the_media_socket_cannot_receive_on_is_refused_at_start() {
    let mut c = test_config();
    c.media.ip = "127.0.0.2".parse().unwrap();
    c.cluster.relay_ip = "127.0.0.9".into();
    let err = Server::start(c).await.err().expect("refused").to_string();
    assert!(err.contains("cluster.relay_ip 127.0.0.9"), "{err}");
    let mut c = test_config();
    c.cluster.relay_ip = "not-an-ip".into();
    let err = Server::start(c).await.err().expect("refused").to_string();
    assert!(
        err.contains("cluster.relay_ip must be an IP address"),
        "{err}"
    );
}
