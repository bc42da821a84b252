//! PROTOCOL.md Part 1 against the in-process server with the in-memory registry: every row of
//! the table, the exact envelopes, and every error case.

mod common;

use std::time::Duration;

use common::{QUIET, WAIT, healthz, join, query, start};
use serde_json::{Value, json};
use switchboard::load::signaling::{Client, ClientError, Packet};

fn raw_of(p: &Packet) -> &str {
    match p {
        Packet::Event { raw, .. } => raw,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test]
async fn join_is_announced_to_every_member_including_the_joiner() {
    let server = start().await;
    let addr = server.local_addr();
    let mut alice = Client::connect(addr, &query("alice", Some("R1")))
        .await
        .unwrap();
    let own = alice.recv_event("msg", WAIT).await.unwrap();
    assert_eq!(
        raw_of(&own),
        r#"["msg",{"type":"join","msg":"alice join then room","status":200,"data":{"userId":"alice","roomId":"R1"}}]"#
    );
    let _bob = join(addr, "bob", Some("R1")).await;
    let seen = alice.recv_event("msg", WAIT).await.unwrap();
    assert_eq!(
        raw_of(&seen),
        r#"["msg",{"type":"join","msg":"bob join then room","status":200,"data":{"userId":"bob","roomId":"R1"}}]"#
    );
    // Another room hears nothing of R1.
    let mut carol = join(addr, "carol", Some("R2")).await;
    let _dave = join(addr, "dave", Some("R1")).await;
    assert!(carol.expect_silence(QUIET).await.is_ok());
    server.shutdown().await;
}

#[tokio::test]
async fn msg_reaches_the_whole_room_byte_for_byte() {
    let server = start().await;
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("R")).await;
    let mut b = join(addr, "b", Some("R")).await;
    a.recv_msg_type("join", WAIT).await.unwrap(); // b's join
    let mut other = join(addr, "o", Some("elsewhere")).await;

    // Key order, unicode, escapes and numbers as a JS client would send them.
    let payload = r#"{"z":1,"a":"中文 ✓ \"q\" \\ \u0001","n":[-0.5,1e-7,9007199254740993,3],"nested":{"y":null,"x":true}}"#;
    a.send_raw(&format!(r#"2["msg",{payload}]"#)).unwrap();
    for c in [&mut a, &mut b] {
        let got = c.recv_event("msg", WAIT).await.unwrap();
        let text = raw_of(&got);
        let relayed = &text[r#"["msg","#.len()..text.len() - 1];
        let want: Value = serde_json::from_str(payload).unwrap();
        assert_eq!(serde_json::from_str::<Value>(relayed).unwrap(), want);
        assert!(
            relayed.starts_with(r#"{"z":1,"a":"中文 ✓"#),
            "key order and unicode kept: {relayed}"
        );
        assert!(
            relayed.contains("9007199254740993"),
            "integers stay exact: {relayed}"
        );
    }
    assert!(other.expect_silence(QUIET).await.is_ok());

    // Any payload, not only objects.
    a.emit("msg", &json!("just a string")).unwrap();
    let got = b.recv_event("msg", WAIT).await.unwrap();
    assert_eq!(raw_of(&got), r#"["msg","just a string"]"#);
    server.shutdown().await;
}

#[tokio::test]
async fn msg_keeps_binary_attachments() {
    let server = start().await;
    let addr = server.local_addr();
    let a = join(addr, "a", Some("R")).await;
    let mut b = join(addr, "b", Some("R")).await;
    let bytes: Vec<u8> = (0..=255).collect();
    a.emit_binary(
        "msg",
        &json!({"file": {"_placeholder": true, "num": 0}, "name": "f.bin"}),
        &[&bytes],
    )
    .unwrap();
    match b.recv_event("msg", WAIT).await.unwrap() {
        Packet::Event {
            args, attachments, ..
        } => {
            assert_eq!(attachments, vec![bytes]);
            assert_eq!(args[0]["file"]["_placeholder"], true);
            assert_eq!(args[0]["name"], "f.bin");
        }
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn room_user_list_lists_the_own_room_as_event_and_ack() {
    let server = start().await;
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("R")).await;
    let _b = join(addr, "b", Some("R")).await;
    let _c = join(addr, "c", Some("S")).await;
    a.recv_msg_type("join", WAIT).await.unwrap();

    let want =
        r#"{"a":"{\"userId\":\"a\",\"roomId\":\"R\"}","b":"{\"userId\":\"b\",\"roomId\":\"R\"}"}"#;
    a.emit("roomUserList", &json!({"roomId": "R"})).unwrap();
    let got = a.recv_event("roomUserList", WAIT).await.unwrap();
    assert_eq!(raw_of(&got), format!(r#"["roomUserList",{want}]"#));

    let id = a
        .emit_with_ack("roomUserList", &json!({"roomId": "R"}))
        .unwrap();
    let mut saw_event = false;
    let mut saw_ack = false;
    while !(saw_event && saw_ack) {
        match a.recv(WAIT).await.unwrap() {
            Packet::Ack {
                id: got_id, raw, ..
            } => {
                assert_eq!(got_id, id);
                assert_eq!(raw, format!("[{want}]"));
                saw_ack = true;
            }
            p if p.event_name() == Some("roomUserList") => saw_event = true,
            other => panic!("unexpected {other:?}"),
        }
    }

    // Another room: refused, as an envelope and to the ack.
    let id = a
        .emit_with_ack("roomUserList", &json!({"roomId": "S"}))
        .unwrap();
    let err = a.recv_msg_type("error", WAIT).await.unwrap();
    assert_eq!(err["status"], 403);
    assert_eq!(err["data"], json!({"event": "roomUserList", "roomId": "S"}));
    match a.recv(WAIT).await.unwrap() {
        Packet::Ack {
            id: got_id, args, ..
        } => {
            assert_eq!(got_id, id);
            assert_eq!(args[0]["status"], 403);
        }
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn directed_events_reach_the_target_with_the_original_strings() {
    let server = start().await;
    let addr = server.local_addr();
    let a = join(addr, "a", Some("R")).await;
    // The target may be in another room, or in none: the original allowed 1:1 calls.
    let mut b = join(addr, "b", None).await;
    for (event, text) in [
        ("call", "远程呼叫"),
        ("offer", "rtc offer"),
        ("answer", "rtc answer"),
        ("candidate", "ice candidate"),
    ] {
        a.send_raw(&format!(r#"2["{event}",{{"targetUid":"b","fromUid":"forged","sdp":{{"type":"x","sdp":"v=0\r\n"}},"n":1.5}}]"#))
            .unwrap();
        let got = b.recv_event("msg", WAIT).await.unwrap();
        assert_eq!(
            raw_of(&got),
            format!(
                r#"["msg",{{"type":"{event}","msg":"{text}","status":200,"data":{{"targetUid":"b","sdp":{{"type":"x","sdp":"v=0\r\n"}},"n":1.5,"fromUid":"a"}}}}]"#
            )
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn leave_is_announced_to_the_remaining_members() {
    let server = start().await;
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("R")).await;
    let b = join(addr, "b", Some("R")).await;
    a.recv_msg_type("join", WAIT).await.unwrap();
    b.close();
    let got = a.recv_event("msg", WAIT).await.unwrap();
    assert_eq!(
        raw_of(&got),
        r#"["msg",{"type":"leave","msg":"b leave the room ","status":200,"data":{"userId":"b","roomId":"R"}}]"#
    );
    a.emit("roomUserList", &json!({"roomId": "R"})).unwrap();
    let list = a.recv_event("roomUserList", WAIT).await.unwrap();
    assert_eq!(
        raw_of(&list),
        r#"["roomUserList",{"a":"{\"userId\":\"a\",\"roomId\":\"R\"}"}]"#
    );
    server.shutdown().await;
}

#[tokio::test]
async fn refused_handshakes_say_why() {
    let server = start().await;
    let addr = server.local_addr();
    let long = "x".repeat(129);
    for (q, why) in [
        ("roomId=R".to_owned(), "missing userId"),
        ("userId=&roomId=R".to_owned(), "userId is empty"),
        ("userId=sfu&roomId=R".to_owned(), "reserved"),
        ("userId=a%07b".to_owned(), "control characters"),
        (format!("userId={long}"), "longer than 128 bytes"),
        (format!("userId=u&roomId={long}"), "roomId is longer"),
    ] {
        match Client::connect(addr, &q).await {
            Err(ClientError::Refused(msg)) => assert!(msg.contains(why), "{q}: {msg}"),
            Err(e) => panic!("{q}: {e}"),
            Ok(_) => panic!("{q}: accepted"),
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_second_connection_replaces_the_first_without_leaving_the_room() {
    let server = start().await;
    let addr = server.local_addr();
    let mut watcher = join(addr, "w", Some("R")).await;
    let mut first = join(addr, "u", Some("R")).await;
    watcher.recv_msg_type("join", WAIT).await.unwrap();

    let mut second = join(addr, "u", Some("R")).await;
    let replaced = first.recv_event("msg", WAIT).await.unwrap();
    assert_eq!(
        raw_of(&replaced),
        r#"["msg",{"type":"replaced","msg":"signed in elsewhere","status":409,"data":null}]"#
    );
    assert!(matches!(
        first.recv(WAIT).await,
        Ok(Packet::Disconnect) | Err(ClientError::Closed)
    ));

    // The room saw u join again and never leave; u is listed once and still reachable.
    let rejoin = watcher.recv_msg_type("join", WAIT).await.unwrap();
    assert_eq!(rejoin["data"]["userId"], "u");
    assert!(
        watcher.expect_silence(QUIET).await.is_ok(),
        "no leave for the replaced connection"
    );
    watcher
        .emit("roomUserList", &json!({"roomId": "R"}))
        .unwrap();
    let list = watcher.recv_event("roomUserList", WAIT).await.unwrap();
    let Packet::Event { args, .. } = list else {
        unreachable!()
    };
    assert_eq!(
        args[0].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["w", "u"]
    );
    watcher.emit("call", &json!({"targetUid": "u"})).unwrap();
    assert_eq!(
        second.recv_msg_type("call", WAIT).await.unwrap()["data"]["fromUid"],
        "w"
    );

    // Replaced into another room: the old room hears a leave, the new one a join.
    let _third = join(addr, "u", Some("S")).await;
    let left = watcher.recv_msg_type("leave", WAIT).await.unwrap();
    assert_eq!(left["data"], json!({"userId": "u", "roomId": "R"}));
    server.shutdown().await;
}

#[tokio::test]
async fn bad_payloads_get_error_envelopes_and_the_connection_stays() {
    let server = start().await;
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("R")).await;
    let mut lonely = join(addr, "lonely", None).await;

    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "call",
            r#"2["call","not an object"]"#.into(),
            400,
            "expected an object",
        ),
        (
            "offer",
            r#"2["offer",{"sdp":"x"}]"#.into(),
            400,
            "missing targetUid",
        ),
        (
            "answer",
            r#"2["answer",{"targetUid":7}]"#.into(),
            400,
            "targetUid must be a string",
        ),
        (
            "candidate",
            r#"2["candidate",{"targetUid":"ghost"}]"#.into(),
            404,
            "ghost is not online",
        ),
        ("offer", r#"2["offer",{"targetUid":"sfu","sdp":{"type":"offer","sdp":"garbage"}}]"#.into(), 400, "bad session description"),
        ("answer", r#"2["answer",{"targetUid":"sfu","pc":"subscriber","sdp":{"type":"answer","sdp":"x"}}]"#.into(), 400, "bad session description"),
        ("offer", r#"2["offer",{"targetUid":"sfu","pc":"subscriber","sdp":{"type":"offer","sdp":"x"}}]"#.into(), 400, "publisher connection only"),
        ("candidate", r#"2["candidate",{"targetUid":"sfu","pc":"sideways","candidate":null}]"#.into(), 400, "pc must be"),
        ("mute", r#"2["mute",{"trackId":"nope","muted":true}]"#.into(), 404, "no track nope"),
        ("setQuality", r#"2["setQuality",{"trackId":"t","quality":"ultra"}]"#.into(), 400, "low, medium or high"),
        ("subscribe", r#"2["subscribe",{"trackIds":"t"}]"#.into(), 400, "malformed"),
        (
            "candidate",
            r#"2["candidate"]"#.into(),
            400,
            "expected an object",
        ),
        (
            "roomUserList",
            r#"2["roomUserList",[]]"#.into(),
            400,
            "expected an object",
        ),
        (
            "roomUserList",
            r#"2["roomUserList",{"roomId":1}]"#.into(),
            400,
            "roomId must be a string",
        ),
        (
            "whatever",
            r#"2["whatever",{}]"#.into(),
            400,
            "unknown event",
        ),
    ];
    for (event, packet, status, why) in cases {
        a.send_raw(&packet).unwrap();
        let err = a
            .recv_msg_type("error", WAIT)
            .await
            .unwrap_or_else(|e| panic!("{packet}: {e}"));
        assert_eq!(err["status"], status, "{packet}: {err}");
        assert_eq!(err["data"]["event"], event, "{packet}");
        assert!(
            err["msg"].as_str().unwrap().contains(why),
            "{packet}: {err}"
        );
    }

    // Answering the sfu before it offered anything: no subscriber connection yet.
    let mut fresh = join(addr, "fresh", Some("R")).await;
    fresh
        .send_raw(r#"2["answer",{"targetUid":"sfu","pc":"subscriber","sdp":{"type":"answer","sdp":"v=0"}}]"#)
        .unwrap();
    let err = fresh.recv_msg_type("error", WAIT).await.unwrap();
    assert_eq!(
        (err["status"].as_u64(), err["data"]["event"].as_str()),
        (Some(409), Some("answer"))
    );

    lonely.emit("msg", &json!({"hi": 1})).unwrap();
    let err = lonely.recv_msg_type("error", WAIT).await.unwrap();
    assert_eq!(
        (err["status"].as_u64(), err["data"]["event"].as_str()),
        (Some(403), Some("msg"))
    );

    // Oversized: refused with 413, and the same connection keeps working.
    let big = "x".repeat(2_000_000);
    a.emit("msg", &json!({ "blob": big })).unwrap();
    let err = a
        .recv_msg_type("error", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(err["status"], 413);
    assert_eq!(err["data"]["limit"], 1_000_000);
    a.emit("msg", &json!({"after": "413"})).unwrap();
    let echo = a.recv_event("msg", WAIT).await.unwrap();
    assert_eq!(raw_of(&echo), r#"["msg",{"after":"413"}]"#);
    server.shutdown().await;
}

#[tokio::test]
async fn garbage_packets_do_not_disturb_other_rooms() {
    let server = start().await;
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("calm")).await;
    let b = join(addr, "b", Some("calm")).await;
    a.recv_msg_type("join", WAIT).await.unwrap();
    for garbage in [
        r#"2not json"#,
        "2[]",
        "2[1,2]",
        "2{\"x\":1}",
        "9",
        "5x-[]",
        "2[\"msg\",{\"a\":",
    ] {
        let mut bad = join(addr, "vandal", Some("loud")).await;
        bad.send_raw(garbage).unwrap();
        let _ = bad.recv(Duration::from_millis(100)).await;
    }
    b.emit("msg", &json!({"still": "here"})).unwrap();
    let got = a.recv_event("msg", WAIT).await.unwrap();
    assert_eq!(raw_of(&got), r#"["msg",{"still":"here"}]"#);
    server.shutdown().await;
}

#[tokio::test]
async fn thousands_of_rapid_connects_and_disconnects_leave_nothing_behind() {
    let server = start().await;
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("steady")).await;
    let b = join(addr, "b", Some("steady")).await;
    a.recv_msg_type("join", WAIT).await.unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..20 {
        tasks.spawn(async move {
            for i in 0..100 {
                let q = query(
                    &format!("churn-{worker}-{}", i % 7),
                    Some(&format!("churn-{}", i % 5)),
                );
                let c = Client::connect(addr, &q)
                    .await
                    .expect("connects under churn");
                if i % 2 == 0 {
                    c.close(); // clean leave
                } else {
                    c.abort(); // the TCP connection just goes away
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    b.emit("msg", &json!("ok")).unwrap();
    assert_eq!(
        raw_of(&a.recv_event("msg", WAIT).await.unwrap()),
        r#"["msg","ok"]"#
    );

    let settled = async {
        loop {
            let v = healthz(addr).await;
            if v["connections"] == 2 {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let v = tokio::time::timeout(Duration::from_secs(20), settled)
        .await
        .expect("churned sessions are gone");
    assert_eq!(v["status"], "ok");
    server.shutdown().await;
}

/// A client flooding events gets 429 envelopes past its budget, is disconnected if it keeps
/// on, and a client in another room is not held up meanwhile.
#[tokio::test]
async fn a_flood_is_rate_limited_then_disconnected_and_others_go_on() {
    let mut config = common::test_config();
    config.signal.events_per_second = 20.0;
    config.signal.event_burst = 20;
    config.signal.disconnect_after_refused = 300;
    let server = switchboard::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let mut flooder = join(addr, "flood", Some("A")).await;
    let mut calm = join(addr, "calm", Some("B")).await;

    for n in 0..100 {
        flooder.emit("msg", &json!({ "n": n })).unwrap();
    }
    // Meanwhile the calm client's own message comes back as usual.
    let sent = std::time::Instant::now();
    calm.emit("msg", &json!("still here")).unwrap();
    calm.recv_event("msg", WAIT).await.unwrap();
    println!(
        "the calm client's round trip during the flood: {:?}",
        sent.elapsed()
    );

    let (mut echoed, mut limited) = (0, 0);
    while let Ok(Packet::Event { args, .. }) = flooder.recv(QUIET).await {
        match args.first() {
            Some(v) if v.get("n").is_some() => echoed += 1,
            Some(v) if v["type"] == "error" => {
                assert_eq!(
                    (v["status"].as_u64(), v["msg"].as_str()),
                    (Some(429), Some("rate limited"))
                );
                assert_eq!(v["data"]["event"], "msg");
                limited += 1;
            }
            _ => {}
        }
    }
    // The burst, plus what refilled while they were sent; every other one refused.
    assert!((20..=40).contains(&echoed), "{echoed} relayed");
    assert_eq!(echoed + limited, 100, "{echoed} relayed, {limited} refused");

    // After a pause the budget is back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    flooder.emit("msg", &json!({ "n": "again" })).unwrap();
    let again = flooder.recv_event("msg", WAIT).await.unwrap();
    assert!(matches!(&again, Packet::Event { args, .. } if args[0]["n"] == "again"));

    // Persistent abuse: disconnected.
    for n in 0..400 {
        if flooder.emit("msg", &json!({ "n": n })).is_err() {
            break;
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut closed = false;
    while tokio::time::Instant::now() < deadline {
        match flooder.recv(WAIT).await {
            Err(ClientError::Closed) => {
                closed = true;
                break;
            }
            Ok(Packet::Disconnect) => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    assert!(closed, "the flooder is disconnected");
    // The calm client goes on.
    calm.emit("msg", &json!("after")).unwrap();
    calm.recv_event("msg", WAIT).await.unwrap();
    server.shutdown().await;
}

/// A full room refuses one more member at the handshake, naming the limit; a member coming
/// back and other rooms are not affected.
#[tokio::test]
async fn a_full_room_refuses_one_more_member() {
    let mut config = common::test_config();
    config.signal.max_room_members = 2;
    let server = switchboard::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let _a = join(addr, "a", Some("R")).await;
    let _b = join(addr, "b", Some("R")).await;
    match Client::connect(addr, &query("c", Some("R"))).await {
        Err(ClientError::Refused(msg)) => {
            assert!(msg.contains("signal.max_room_members is 2"), "{msg}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a third member got into a room of two"),
    }
    // b again (a second connection replaces the first): not a new member.
    let _b_again = join(addr, "b", Some("R")).await;
    let _c_elsewhere = join(addr, "c", Some("S")).await;
    let health = healthz(addr).await;
    assert_eq!(health["connections"], 3);
    assert_eq!(health["refused"]["handshakes"], 1, "{health}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_node_at_its_room_limit_refuses_only_a_new_room() {
    let mut config = common::test_config();
    config.signal.max_rooms_per_node = 2;
    let server = switchboard::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let _a = join(addr, "a", Some("R1")).await;
    let b = join(addr, "b", Some("R2")).await;
    match Client::connect(addr, &query("c", Some("R3"))).await {
        Err(ClientError::Refused(msg)) => {
            assert!(msg.contains("signal.max_rooms_per_node is 2"), "{msg}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a third room opened on a node of two"),
    }
    // Rooms it hosts stay open, and so do calls without a room.
    let _d = join(addr, "d", Some("R1")).await;
    let _e = join(addr, "e", None).await;
    // Once a room is empty, another may take its place.
    b.close();
    let mut opened = false;
    for _ in 0..50 {
        if let Ok(c) = Client::connect(addr, &query("c", Some("R3"))).await {
            opened = true;
            c.close();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(opened, "R3 never opened after R2 emptied");
    server.shutdown().await;
}

/// An SDP over `media.max_sdp_bytes` is refused with 413 before anything parses it; the
/// connection stays and a normal offer is answered.
#[tokio::test]
async fn an_oversized_sdp_is_refused_with_413() {
    let mut config = common::test_config();
    config.media.max_sdp_bytes = 10_000;
    let server = switchboard::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("R")).await;
    let huge = format!("v=0\r\n{}", "a=x-filler\r\n".repeat(1000));
    for event in ["offer", "answer"] {
        let kind = if event == "offer" { "offer" } else { "answer" };
        let pc = if event == "offer" {
            "publisher"
        } else {
            "subscriber"
        };
        a.emit(
            event,
            &json!({"targetUid": "sfu", "pc": pc, "sdp": {"type": kind, "sdp": huge}}),
        )
        .unwrap();
        let refused = a.recv_msg_type("error", WAIT).await.unwrap();
        assert_eq!(refused["status"], 413, "{refused}");
        assert_eq!(refused["data"]["event"], event, "{refused}");
        assert!(
            refused["msg"]
                .as_str()
                .unwrap()
                .contains("media.max_sdp_bytes"),
            "{refused}"
        );
    }
    let offer = common::peer::sample_offer().await;
    a.emit(
        "offer",
        &json!({"targetUid": "sfu", "sdp": {"type": "offer", "sdp": offer}}),
    )
    .unwrap();
    let answer = a.recv_msg_type("answer", WAIT).await.unwrap();
    assert!(
        answer["data"]["sdp"]["sdp"]
            .as_str()
            .unwrap()
            .starts_with("v=0")
    );
    assert_eq!(healthz(addr).await["refused"]["tooLarge"], 2);
    server.shutdown().await;
}

/// A client looping `call` and `leave` gets a 429 past `media.max_session_starts_per_minute`;
/// other users start theirs as usual. The answer advertises the data-message limit.
#[tokio::test]
async fn media_session_starts_are_limited_per_user_and_minute() {
    let mut config = common::test_config();
    config.media.max_session_starts_per_minute = 3;
    config.media.max_data_message_bytes = 12_345;
    let server = switchboard::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("R")).await;
    let sessions = async |n: u64| {
        for _ in 0..100 {
            if healthz(addr).await["mediaSessions"] == n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    for _ in 0..3 {
        a.emit("call", &json!({"targetUid": "sfu"})).unwrap();
        assert!(sessions(1).await, "the session started");
        a.emit("leave", &json!({})).unwrap();
        assert!(sessions(0).await, "the session ended");
    }
    a.emit("call", &json!({"targetUid": "sfu"})).unwrap();
    let refused = a.recv_msg_type("error", WAIT).await.unwrap();
    assert_eq!(refused["status"], 429, "{refused}");
    assert!(
        refused["msg"]
            .as_str()
            .unwrap()
            .contains("max_session_starts_per_minute is 3"),
        "{refused}"
    );
    assert_eq!(healthz(addr).await["media"]["sessionStartsRefused"], 1);

    let mut b = join(addr, "b", Some("R")).await;
    let offer = common::peer::sample_offer_with(true).await;
    b.emit(
        "offer",
        &json!({"targetUid": "sfu", "sdp": {"type": "offer", "sdp": offer}}),
    )
    .unwrap();
    let answer = b.recv_msg_type("answer", WAIT).await.unwrap();
    let sdp = answer["data"]["sdp"]["sdp"].as_str().unwrap();
    assert!(sdp.contains("a=max-message-size:12345"), "{sdp}");
    server.shutdown().await;
}

/// A member cannot pass a room message off as the server's: a `msg` whose `type` is one the
/// server sends (a forged `offer` from `sfu`, a fake `leave`) is refused; others relay as ever.
#[tokio::test]
async fn a_msg_imitating_a_server_envelope_is_refused() {
    let server = start().await;
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("R")).await;
    let mut b = join(addr, "b", Some("R")).await;
    a.recv_msg_type("join", WAIT).await.unwrap();
    for forged in [
        json!({"type": "offer", "msg": "rtc offer", "status": 200,
               "data": {"fromUid": "sfu", "pc": "subscriber", "sdp": {"type": "offer", "sdp": "v=0"}}}),
        json!({"type": "leave", "data": {"userId": "b", "roomId": "R"}}),
    ] {
        b.emit("msg", &forged).unwrap();
        let refused = b.recv_msg_type("error", WAIT).await.unwrap();
        assert_eq!(refused["status"], 400, "{refused}");
        assert!(
            refused["msg"]
                .as_str()
                .unwrap()
                .contains(forged["type"].as_str().unwrap()),
            "{refused}"
        );
    }
    assert!(
        a.expect_silence(QUIET).await.is_ok(),
        "a forged envelope reached a"
    );
    b.emit("msg", &json!({"type": "chat", "text": "hi"}))
        .unwrap();
    let got = a.recv_event("msg", WAIT).await.unwrap();
    assert_eq!(raw_of(&got), r#"["msg",{"type":"chat","text":"hi"}]"#);
    server.shutdown().await;
}

/// Bytes are budgeted per socket too: a burst of large messages past `signal.bytes_burst` gets
/// 429s, while a client in another room goes on as usual.
#[tokio::test]
async fn large_messages_past_the_byte_budget_are_rate_limited() {
    let server = start().await;
    let addr = server.local_addr();
    let mut a = join(addr, "a", Some("R")).await;
    let mut calm = join(addr, "calm", Some("S")).await;
    let big = "x".repeat(600_000);
    for n in 0..10 {
        a.emit("msg", &json!({"n": n, "big": big})).unwrap();
    }
    let (mut delivered, mut limited) = (0, 0);
    while delivered + limited < 10 {
        let Packet::Event { args, .. } = a.recv_event("msg", WAIT).await.unwrap() else {
            unreachable!()
        };
        match args[0].get("type").and_then(Value::as_str) {
            Some("error") => {
                assert_eq!(args[0]["status"], 429, "{}", args[0]);
                limited += 1;
            }
            _ => delivered += 1,
        }
    }
    // 4 MiB of burst: six of the 600 kB messages, then refusals (a little refills meanwhile).
    assert!((6..=8).contains(&delivered), "{delivered} delivered");
    assert!(limited >= 2, "{limited} limited");
    assert_eq!(healthz(addr).await["refused"]["rateLimited"], limited);
    calm.emit("msg", &json!({"still": "fine"})).unwrap();
    let got = calm.recv_event("msg", WAIT).await.unwrap();
    assert_eq!(raw_of(&got), r#"["msg",{"still":"fine"}]"#);
    server.shutdown().await;
}
