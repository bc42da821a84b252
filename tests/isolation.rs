//! Isolation (issue 9): two rooms side by side under concurrent joins, leaves and chatter, on
//! one node and across two nodes sharing Redis: nothing of one room (joins, leaves, messages,
//! member lists) ever reaches a member of the other. And media: the tracks and data-channel
//! messages of one room never reach the other's members.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::peer::TestPeer;
use common::{Redis, eventually, query, start, start_with_redis};
use serde_json::{Value, json};
use switchboard::load::signaling::{Client, ClientError, Packet};

const ROUNDS: usize = 3;
const MEMBERS: usize = 6;
const MESSAGES: usize = 5;

/// One member's life: `ROUNDS` times connect, chat, list the room, and leave. Returns every
/// `msg` and `roomUserList` it received.
async fn member(nodes: Vec<SocketAddr>, user: String, room: &'static str) -> Vec<Value> {
    let mut seen = Vec::new();
    for round in 0..ROUNDS {
        // Each round on the next node: a member moves between nodes as it reconnects.
        let addr = nodes[(round + user.len()) % nodes.len()];
        let mut c = Client::connect(addr, &query(&user, Some(room)))
            .await
            .expect("connects");
        for n in 0..MESSAGES {
            c.emit("msg", &json!({"room": room, "from": user, "n": n}))
                .unwrap();
        }
        c.emit("roomUserList", &json!({"roomId": room})).unwrap();
        loop {
            match c.recv(Duration::from_millis(400)).await {
                Ok(Packet::Event { name, mut args, .. }) if !args.is_empty() => {
                    seen.push(json!({"event": name, "data": args.swap_remove(0)}));
                }
                Ok(_) => {}
                Err(ClientError::Timeout) => break,
                Err(e) => panic!("{user}: {e}"),
            }
        }
        c.close();
    }
    seen
}

/// Every member of both rooms at once; then checks what each one received.
async fn two_rooms_side_by_side(nodes: Vec<SocketAddr>) {
    let mut lives = Vec::new();
    for room in ["A", "B"] {
        for i in 0..MEMBERS {
            let user = format!("{room}{i}");
            let life = tokio::spawn(member(nodes.clone(), user.clone(), room));
            lives.push((room, user, life));
        }
    }
    for (room, user, life) in lives {
        let seen = life.await.unwrap();
        let mut from_others = 0;
        for item in &seen {
            let data = &item["data"];
            if item["event"] == "roomUserList" {
                let members = data.as_object().expect("a map of members");
                for (user, entry) in members {
                    assert!(user.starts_with(room), "{room} listed {user}: {item}");
                    assert!(
                        entry
                            .as_str()
                            .unwrap()
                            .contains(&format!("\"roomId\":\"{room}\""))
                    );
                }
            } else if data.get("type").is_some() {
                // An envelope: join, leave (or an error, which would be a bug here).
                assert!(
                    data["type"] == "join" || data["type"] == "leave",
                    "{room}: {item}"
                );
                assert_eq!(data["data"]["roomId"], room, "{item}");
            } else {
                assert_eq!(data["room"], room, "a message of another room: {item}");
                from_others += usize::from(data["from"] != user.as_str());
            }
        }
        assert!(
            from_others > 0,
            "{user}: no message of another member of {room}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rooms_on_one_node_never_see_each_other() {
    let server = start().await;
    two_rooms_side_by_side(vec![server.local_addr()]).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rooms_across_two_nodes_never_see_each_other() {
    let redis = Redis::start();
    let n1 = start_with_redis(&redis.url(), "n1").await;
    let n2 = start_with_redis(&redis.url(), "n2").await;
    two_rooms_side_by_side(vec![n1.local_addr(), n2.local_addr()]).await;
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_and_data_stay_in_their_room() {
    let server = start().await;
    let addr = server.local_addr();
    let a_pub = TestPeer::join(addr, "alice", "A", 1, true).await;
    let b_pub = TestPeer::join(addr, "bert", "B", 2, true).await;
    let a_sub = TestPeer::join(addr, "ann", "A", 3, false).await;
    let b_sub = TestPeer::join(addr, "bob", "B", 4, false).await;
    let receiving = eventually(Duration::from_secs(20), || {
        a_sub.tracks_from("alice").len() == 2 && b_sub.tracks_from("bert").len() == 2
    })
    .await;
    assert!(receiving, "{} / {}", a_sub.summary(), b_sub.summary());
    // Chat in both rooms: each subscriber's copy of the channel carries its room's only.
    for (publisher, text) in [(&a_pub, "in A"), (&b_pub, "in B")] {
        let chat = publisher.chat.as_ref().expect("a chat channel");
        assert!(
            eventually(Duration::from_secs(10), || publisher
                .chat_open
                .load(std::sync::atomic::Ordering::SeqCst))
            .await
        );
        for _ in 0..3 {
            chat.send_text(text).await.unwrap();
        }
    }
    let texts = |peer: &TestPeer| -> Vec<String> {
        let channels = peer.observed.channels.lock().unwrap();
        channels.iter().flat_map(|c| c.texts.clone()).collect()
    };
    let chatted = eventually(Duration::from_secs(10), || {
        !texts(&a_sub).is_empty() && !texts(&b_sub).is_empty()
    })
    .await;
    assert!(chatted, "{} / {}", a_sub.summary(), b_sub.summary());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        texts(&a_sub).iter().all(|t| t == "in A"),
        "{:?}",
        texts(&a_sub)
    );
    assert!(
        texts(&b_sub).iter().all(|t| t == "in B"),
        "{:?}",
        texts(&b_sub)
    );
    for (peer, other) in [
        (&a_sub, "bert"),
        (&b_sub, "alice"),
        (&a_pub, "bert"),
        (&b_pub, "alice"),
    ] {
        assert!(peer.tracks_from(other).is_empty(), "{}", peer.summary());
        let published = peer.envelopes_of("trackPublished");
        assert!(
            published.iter().all(|e| e["data"]["userId"] != other),
            "{published:?}"
        );
    }
    for peer in [a_pub, b_pub, a_sub, b_sub] {
        peer.close().await;
    }
    server.shutdown().await;
}
