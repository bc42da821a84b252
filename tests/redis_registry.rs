//! The Redis registry and several nodes, against a real redis-server started per test.

mod common;

use std::time::{Duration, Instant};

use common::{Process, QUIET, Redis, WAIT, eventually, join, start_with_redis};
use redis::Commands;
use serde_json::json;
use switchboard::load::signaling::Packet;

fn room_hash(redis: &Redis, room: &str) -> Vec<(String, String)> {
    redis
        .conn()
        .hgetall(format!("meeting-room::{room}"))
        .unwrap()
}

fn entry(user: &str, room: &str) -> (String, String) {
    (
        user.to_owned(),
        format!(r#"{{"userId":"{user}","roomId":"{room}"}}"#),
    )
}

#[tokio::test]
async fn writes_the_original_keys_on_join_and_removes_them_on_leave() {
    let redis = Redis::start();
    let server = start_with_redis(&redis.url(), "n1").await;
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("R")).await;
    let b = join(addr, "b", Some("R")).await;
    assert_eq!(
        room_hash(&redis, "R"),
        vec![entry("a", "R"), entry("b", "R")]
    );

    a.emit("roomUserList", &json!({"roomId": "R"})).unwrap();
    let Packet::Event { raw, .. } = a.recv_event("roomUserList", WAIT).await.unwrap() else {
        unreachable!()
    };
    assert_eq!(
        raw,
        r#"["roomUserList",{"a":"{\"userId\":\"a\",\"roomId\":\"R\"}","b":"{\"userId\":\"b\",\"roomId\":\"R\"}"}]"#
    );

    b.close();
    a.recv_msg_type("leave", WAIT).await.unwrap();
    assert_eq!(room_hash(&redis, "R"), vec![entry("a", "R")]);
    server.shutdown().await;
    assert!(
        room_hash(&redis, "R").is_empty(),
        "graceful shutdown removes the node's entries"
    );
}

#[tokio::test]
async fn two_nodes_relay_between_users_on_either() {
    let redis = Redis::start();
    let n1 = start_with_redis(&redis.url(), "n1").await;
    let n2 = start_with_redis(&redis.url(), "n2").await;
    let mut a = join(n1.local_addr(), "a", Some("R")).await;
    let mut b = join(n2.local_addr(), "b", Some("R")).await;
    let mut c = join(n2.local_addr(), "c", Some("other")).await;

    // Joins cross nodes.
    assert_eq!(
        a.recv_msg_type("join", WAIT).await.unwrap()["data"]["userId"],
        "b"
    );
    // Room broadcast from node 1 reaches node 2, byte for byte, and not another room.
    a.send_raw(r#"2["msg",{"k":"中","n":[1,2.5],"z":null}]"#)
        .unwrap();
    for client in [&mut a, &mut b] {
        // b may first see a's join: the bus can deliver it after b joined on its node.
        let raw = loop {
            let Packet::Event { raw, .. } = client.recv_event("msg", WAIT).await.unwrap() else {
                unreachable!()
            };
            if !raw.contains(r#""type":"join""#) {
                break raw;
            }
        };
        assert_eq!(raw, r#"["msg",{"k":"中","n":[1,2.5],"z":null}]"#);
    }
    assert!(c.expect_silence(QUIET).await.is_ok());

    // Binary attachments survive the bus.
    b.emit_binary(
        "msg",
        &json!({"bin": {"_placeholder": true, "num": 0}}),
        &[&[0, 1, 255]],
    )
    .unwrap();
    let Packet::Event { attachments, .. } = a.recv_event("msg", WAIT).await.unwrap() else {
        unreachable!()
    };
    assert_eq!(attachments, vec![vec![0, 1, 255]]);

    // Directed events to a user on the other node, both ways.
    a.emit("offer", &json!({"targetUid": "b", "sdp": "o"}))
        .unwrap();
    let offer = b.recv_msg_type("offer", WAIT).await.unwrap();
    assert_eq!(
        offer["data"],
        json!({"targetUid": "b", "sdp": "o", "fromUid": "a"})
    );
    c.emit("call", &json!({"targetUid": "a"})).unwrap();
    assert_eq!(
        a.recv_msg_type("call", WAIT).await.unwrap()["data"]["fromUid"],
        "c"
    );
    a.emit("call", &json!({"targetUid": "nobody"})).unwrap();
    assert_eq!(a.recv_msg_type("error", WAIT).await.unwrap()["status"], 404);

    // roomUserList from either node lists members of both.
    for client in [&mut a, &mut b] {
        client
            .emit("roomUserList", &json!({"roomId": "R"}))
            .unwrap();
        let Packet::Event { args, .. } = client.recv_event("roomUserList", WAIT).await.unwrap()
        else {
            unreachable!()
        };
        assert_eq!(
            args[0].as_object().unwrap().keys().collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    // A second connection on the other node replaces the first; the room sees no leave.
    let _a2 = join(n2.local_addr(), "a", Some("R")).await;
    assert_eq!(
        a.recv_msg_type("replaced", WAIT).await.unwrap()["status"],
        409
    );
    assert_eq!(
        b.recv_msg_type("join", WAIT).await.unwrap()["data"]["userId"],
        "a"
    );
    assert!(
        b.expect_silence(QUIET).await.is_ok(),
        "no leave after a replacement"
    );
    assert_eq!(
        room_hash(&redis, "R"),
        vec![entry("a", "R"), entry("b", "R")]
    );

    // Leave crosses nodes too.
    b.close();
    let mut watcher = join(n1.local_addr(), "w", Some("R")).await;
    drop(watcher.recv(Duration::from_millis(50)).await);
    n2.shutdown().await;
    assert_eq!(
        watcher.recv_msg_type("leave", WAIT).await.unwrap()["data"]["userId"],
        "a"
    );
    assert_eq!(room_hash(&redis, "R"), vec![entry("w", "R")]);
    n1.shutdown().await;
}

#[tokio::test]
async fn a_killed_node_is_cleaned_up_within_15_seconds_with_default_timings() {
    let redis = Redis::start();
    let url = redis.url();
    // The live node runs with the default heartbeat and TTL, as a deployment would.
    let mut cfg = common::test_config();
    cfg.redis.url = url.clone();
    cfg.server.node_id = "survivor".into();
    let survivor = switchboard::Server::start(cfg).await.unwrap();
    let mut watcher = join(survivor.local_addr(), "w", Some("R")).await;

    let victim = Process::spawn(&["--redis", &url, "--node-id", "victim"], &[]);
    let _doomed = join(victim.addr, "d", Some("R")).await;
    let _lonely = join(victim.addr, "l", None).await;
    watcher.recv_msg_type("join", WAIT).await.unwrap();
    assert_eq!(
        room_hash(&redis, "R"),
        vec![entry("w", "R"), entry("d", "R")]
    );

    victim.signal("-KILL");
    let killed = Instant::now();
    let leave = watcher
        .recv_msg_type("leave", Duration::from_secs(15))
        .await
        .expect("leave within 15 s");
    assert_eq!(leave["data"], json!({"userId": "d", "roomId": "R"}));
    assert!(killed.elapsed() < Duration::from_secs(15));
    assert_eq!(room_hash(&redis, "R"), vec![entry("w", "R")]);
    let users: Vec<String> = redis.conn().hkeys("switchboard:users").unwrap();
    assert_eq!(users, ["w"]);
    let nodes: Vec<String> = redis.conn().smembers("switchboard:nodes").unwrap();
    assert_eq!(nodes, ["survivor"]);
    survivor.shutdown().await;
}

#[tokio::test]
async fn sigterm_removes_the_nodes_entries_at_once() {
    let redis = Redis::start();
    let url = redis.url();
    let mut node = Process::spawn(&["--redis", &url, "--node-id", "graceful"], &[]);
    let _a = join(node.addr, "a", Some("R")).await;
    let _b = join(node.addr, "b", None).await;
    assert_eq!(room_hash(&redis, "R"), vec![entry("a", "R")]);
    node.signal("-TERM");
    let status = node.wait();
    assert!(status.success(), "{status}: {}", node.log());
    assert!(room_hash(&redis, "R").is_empty());
    let users: Vec<String> = redis.conn().hkeys("switchboard:users").unwrap();
    assert!(users.is_empty(), "{users:?}");
}

#[tokio::test]
async fn signaling_survives_a_redis_restart_and_the_hash_is_rewritten() {
    let mut redis = Redis::start();
    let url = redis.url();
    let env = [
        ("SWITCHBOARD_REDIS__HEARTBEAT_MS", "300"),
        ("SWITCHBOARD_REDIS__NODE_TTL_MS", "1500"),
    ];
    let n1 = Process::spawn(&["--redis", &url, "--node-id", "n1"], &env);
    let n2 = Process::spawn(&["--redis", &url, "--node-id", "n2"], &env);
    let mut a = join(n1.addr, "a", Some("R")).await;
    let mut b = join(n1.addr, "b", Some("R")).await;
    let mut far = join(n2.addr, "far", Some("R")).await;
    a.recv_msg_type("join", WAIT).await.unwrap();
    a.recv_msg_type("join", WAIT).await.unwrap();
    b.recv_msg_type("join", WAIT).await.unwrap();

    redis.stop();
    // Signaling between users of one node goes on, message after message.
    for i in 0..50 {
        a.emit("msg", &json!({ "i": i })).unwrap();
        assert!(
            recv_payload(&mut b, &json!({ "i": i })).await,
            "message {i} during the outage"
        );
    }
    a.emit("call", &json!({"targetUid": "b"})).unwrap();
    assert_eq!(
        b.recv_msg_type("call", WAIT).await.unwrap()["data"]["fromUid"],
        "a"
    );
    // Membership changes during the outage are kept in memory...
    let c = join(n1.addr, "c", Some("R")).await;
    b.close();
    assert_eq!(
        a.recv_msg_type("leave", WAIT).await.unwrap()["data"]["userId"],
        "b"
    );
    // From memory while Redis is away: this node's members only.
    a.emit("roomUserList", &json!({"roomId": "R"})).unwrap();
    let Packet::Event { args, .. } = a.recv_event("roomUserList", WAIT).await.unwrap() else {
        unreachable!()
    };
    assert_eq!(
        args[0].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["a", "c"]
    );

    // ...and written back when Redis returns (it restarted empty: no persistence).
    redis.restart();
    let rewritten = eventually(Duration::from_secs(10), || {
        let mut h = room_hash(&redis, "R");
        h.sort();
        h == vec![entry("a", "R"), entry("c", "R"), entry("far", "R")]
    })
    .await;
    assert!(
        rewritten,
        "hash after restart: {:?}",
        room_hash(&redis, "R")
    );

    // Cross-node delivery resumes once both nodes have resubscribed.
    let mut delivered = false;
    for _ in 0..50 {
        a.emit("call", &json!({"targetUid": "far", "probe": true}))
            .unwrap();
        if far
            .recv_msg_type("call", Duration::from_millis(200))
            .await
            .is_ok()
        {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "a call from n1 reaches n2 after the restart");

    // One warning per outage, not one per message.
    let log = n1.log();
    assert_eq!(log.matches("redis unavailable").count(), 1, "{log}");
    assert!(log.contains("redis available; room registry written"));
    drop(c);
}

#[tokio::test]
async fn a_frozen_redis_never_stalls_signaling_for_long() {
    let redis = Redis::start();
    let server = start_with_redis(&redis.url(), "n1").await;
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("R")).await;
    redis.pause();
    // Joining costs at most one command timeout (300 ms) while Redis hangs, then nothing.
    let started = Instant::now();
    let b = join(addr, "b", Some("R")).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "join took {:?}",
        started.elapsed()
    );
    a.recv_msg_type("join", WAIT).await.unwrap();
    let started = Instant::now();
    for i in 0..20 {
        b.emit("msg", &json!({ "i": i })).unwrap();
        assert!(recv_payload(&mut a, &json!({ "i": i })).await);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "20 messages took {:?}",
        started.elapsed()
    );
    redis.resume();
    let repaired = eventually(Duration::from_secs(10), || {
        room_hash(&redis, "R") == vec![entry("a", "R"), entry("b", "R")]
    })
    .await;
    assert!(
        repaired,
        "hash after the freeze: {:?}",
        room_hash(&redis, "R")
    );
    server.shutdown().await;
}

/// Waits for a relayed `msg` whose payload is `want`, skipping envelopes.
async fn recv_payload(
    c: &mut switchboard::load::signaling::Client,
    want: &serde_json::Value,
) -> bool {
    loop {
        match c.recv_event("msg", WAIT).await {
            Ok(Packet::Event { args, .. }) if &args[0] == want => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// b in room R; then Redis holds writes back for 700 ms and a connects to R: a's connection is
/// up (CONNECT received) while the server is still recording it.
async fn connect_while_redis_holds_writes_back() -> (
    Redis,
    switchboard::Server,
    switchboard::load::signaling::Client,
    switchboard::load::signaling::Client,
) {
    let redis = Redis::start();
    let mut config = common::test_config();
    config.redis.url = redis.url();
    config.redis.command_timeout_ms = 5000;
    let server = switchboard::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let b = join(addr, "b", Some("R")).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(700)
        .arg("WRITE")
        .query(&mut redis.conn())
        .unwrap();
    let a = switchboard::load::signaling::Client::connect(addr, &common::query("a", Some("R")))
        .await
        .unwrap();
    (redis, server, b, a)
}

/// socketioxide sends CONNECT before the connection handler runs, and a client may send at
/// once: its events wait until the connection is recorded and announced. Here recording takes
/// long (Redis holds writes back), and the member's first message still follows its join.
#[tokio::test]
async fn a_message_sent_at_once_after_connecting_follows_the_join() {
    // Kept to the end: dropping it stops redis-server.
    let (_redis, server, mut b, a) = connect_while_redis_holds_writes_back().await;
    a.emit("msg", &json!({"type": "chat", "n": 1})).unwrap();

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let Packet::Event { args, .. } = b.recv_event("msg", WAIT).await.unwrap() else {
            unreachable!()
        };
        seen.push(args[0]["type"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(seen, ["join", "chat"], "b sees a's join, then a's message");
    server.shutdown().await;
}

/// A client that leaves while its connection is still being recorded (Redis holds writes back)
/// leaves nothing behind: once recorded, the connection is removed again, and the room sees its
/// join, then its leave.
#[tokio::test]
async fn a_client_gone_before_its_connection_was_recorded_leaves_no_trace() {
    let (redis, server, mut b, a) = connect_while_redis_holds_writes_back().await;
    a.close();

    let join = b.recv_msg_type("join", WAIT).await.unwrap();
    assert_eq!(join["data"]["userId"], "a");
    let leave = b.recv_msg_type("leave", WAIT).await.unwrap();
    assert_eq!(leave["data"]["userId"], "a");
    assert!(
        eventually(WAIT, || room_hash(&redis, "R") == vec![entry("b", "R")]).await,
        "{:?}",
        room_hash(&redis, "R")
    );
    let users: Vec<String> = redis.conn().hkeys("switchboard:users").unwrap();
    assert_eq!(users, ["b"]);
    server.shutdown().await;
}

/// While Redis hangs, deliveries for other nodes wait in a queue bounded in bytes: big messages
/// past `redis.bus_queue_bytes` are dropped (counted), local delivery goes on, and the queue
/// drains once Redis is back.
#[tokio::test]
async fn the_bus_queue_is_bounded_in_bytes_while_redis_hangs() {
    let redis = Redis::start();
    let mut config = common::test_config();
    config.redis.url = redis.url();
    config.server.node_id = "n1".into();
    config.redis.bus_queue_bytes = 4_000_000;
    config.signal.bytes_per_second = 0; // 10 MB at once: this test is about the bus
    let server = switchboard::Server::start(config).await.expect("starts");
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("R")).await;
    let b = join(addr, "b", Some("R")).await;
    a.recv_msg_type("join", WAIT).await.unwrap();
    redis.pause();
    let big = "x".repeat(500_000);
    for i in 0..20 {
        let message = json!({ "i": i, "big": big });
        b.emit("msg", &message).unwrap();
        assert!(
            recv_payload(&mut a, &message).await,
            "local delivery goes on"
        );
    }
    let bus = common::healthz(addr).await["bus"].clone();
    let queued = bus["queuedBytes"].as_u64().unwrap();
    assert!(queued <= 4_000_000, "{bus}");
    assert!(queued >= 3_000_000, "the queue filled up: {bus}");
    assert!(bus["dropped"].as_u64().unwrap() >= 12, "{bus}");
    redis.resume();
    let mut queued = u64::MAX;
    for _ in 0..100 {
        queued = common::healthz(addr).await["bus"]["queuedBytes"]
            .as_u64()
            .unwrap();
        if queued == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queued, 0, "the queue drains once redis is back");
    server.shutdown().await;
}

/// Where a room's media must reach: the nodes with members in it, from the shared registry.
#[tokio::test]
async fn the_registry_names_the_nodes_of_a_room() {
    use switchboard::room::{Member, RedisRegistry, RoomRegistry};
    let redis = Redis::start();
    let config = common::test_config().redis;
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let n1 = RedisRegistry::start(&redis.url(), "n1", &config, tx.clone())
        .await
        .unwrap();
    let n2 = RedisRegistry::start(&redis.url(), "n2", &config, tx)
        .await
        .unwrap();
    let member = |user: &str, room: &str, token: &str| Member {
        user_id: user.into(),
        room_id: Some(room.into()),
        token: token.into(),
    };
    n1.join(&member("a", "R", "n1/1")).await;
    n2.join(&member("b", "R", "n2/1")).await;
    n2.join(&member("c", "S", "n2/2")).await;
    assert_eq!(n1.room_nodes("R").await, ["n1", "n2"]);
    assert_eq!(n1.room_nodes("S").await, ["n2"]);
    n2.leave(&member("b", "R", "n2/1")).await;
    assert_eq!(n2.room_nodes("R").await, ["n1"]);
    n1.shutdown().await;
    n2.shutdown().await;
}
