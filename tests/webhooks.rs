//! Webhooks against real HTTP receivers started here: every event arrives, in order, signed;
//! a failing receiver gets it again until it takes it; a dead one delays neither signaling nor
//! media.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::peer::TestPeer;
use common::{eventually, free_port, healthz, test_config};
use serde_json::Value;
use switchboard::Server;

const SECRET: &str = "a shared secret";

/// (signature header, body) of each request taken.
type Requests = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// What one receiver got, and how many requests it should fail first.
#[derive(Clone, Default)]
struct Receiver {
    got: Requests,
    fail_first: Arc<Mutex<u32>>,
}

impl Receiver {
    /// Starts it on a free loopback port; returns its URL.
    async fn start(&self) -> String {
        async fn hook(
            State(r): State<Receiver>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> StatusCode {
            {
                let mut fail = r.fail_first.lock().unwrap();
                if *fail > 0 {
                    *fail -= 1;
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
            }
            let signature = headers
                .get("x-switchboard-signature")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            r.got.lock().unwrap().push((signature, body.to_vec()));
            StatusCode::NO_CONTENT
        }
        let app = axum::Router::new()
            .route("/hook", post(hook))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn events(&self) -> Vec<Value> {
        let got = self.got.lock().unwrap();
        got.iter()
            .map(|(_, body)| serde_json::from_slice(body).unwrap())
            .collect()
    }

    fn names(&self) -> Vec<String> {
        let events = self.events();
        events
            .iter()
            .map(|e| e["event"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn position(events: &[Value], name: &str, user: Option<&str>) -> usize {
    events
        .iter()
        .position(|e| e["event"] == name && user.is_none_or(|u| e["userId"] == u))
        .unwrap_or_else(|| panic!("no {name} {user:?} in {events:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_every_receiver_in_order_and_signed() {
    let (good, flaky) = (Receiver::default(), Receiver::default());
    *flaky.fail_first.lock().unwrap() = 3;
    let (good_url, flaky_url) = (good.start().await, flaky.start().await);
    // Nothing listens there: every attempt fails at once.
    let dead_url = format!("http://127.0.0.1:{}/hook", free_port());
    let dir = std::env::temp_dir().join(format!("switchboard-webhooks-{}", std::process::id()));
    let mut config = test_config();
    config.webhook.urls = vec![dead_url, good_url, flaky_url];
    config.webhook.secret = SECRET.into();
    config.webhook.attempts = 8;
    config.recording.rooms = vec!["hooks".into()];
    config.recording.dir = dir.clone();
    let server = Server::start(config).await.expect("server starts");
    let addr = server.local_addr();

    // A call goes on while the dead receiver is being retried.
    let alice = TestPeer::join(addr, "alice", "hooks", 1, true).await;
    let bob = TestPeer::join(addr, "bob", "hooks", 2, false).await;
    let flowing = eventually(Duration::from_secs(20), || {
        let tracks = bob.tracks_from("alice");
        tracks.len() == 2 && tracks.iter().all(|r| r.packets >= 20)
    })
    .await;
    assert!(flowing, "{}", bob.summary());
    alice.close().await;
    bob.close().await;

    let expected = [
        "room_started",
        "participant_joined",
        "participant_joined",
        "recording_started",
        "recording_started",
        "track_published",
        "track_published",
        "track_unpublished",
        "track_unpublished",
        "participant_left",
        "participant_left",
        "room_finished",
        "recording_finished",
        "recording_finished",
    ];
    let all_in = |r: &Receiver| {
        let mut names = r.names();
        names.sort();
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.sort();
        names == want
    };
    let arrived = eventually(Duration::from_secs(20), || all_in(&good) && all_in(&flaky)).await;
    assert!(
        arrived,
        "good {:?}\nflaky {:?}",
        good.names(),
        flaky.names()
    );

    // Signed: HMAC-SHA256 of the body under the secret.
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    for (signature, body) in good.got.lock().unwrap().iter() {
        let hex = signature.strip_prefix("sha256=").expect("sha256=<hex>");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert!(
            ring::hmac::verify(&key, body, &bytes).is_ok(),
            "bad signature on {}",
            String::from_utf8_lossy(body)
        );
    }

    // In order: what happened first was sent first.
    let events = good.events();
    let at = |name, user| position(&events, name, user);
    assert!(at("room_started", None) < at("participant_joined", Some("alice")));
    assert!(at("participant_joined", Some("alice")) < at("participant_joined", Some("bob")));
    assert!(at("participant_joined", Some("alice")) < at("track_published", Some("alice")));
    assert!(at("track_published", Some("alice")) < at("track_unpublished", Some("alice")));
    assert!(at("track_unpublished", Some("alice")) < at("participant_left", Some("alice")));
    assert!(at("recording_started", Some("alice")) < at("recording_finished", Some("alice")));
    let last_left = at("participant_left", Some("alice")).max(at("participant_left", Some("bob")));
    assert!(last_left < at("room_finished", None));
    for e in &events {
        assert_eq!(e["room"], "hooks", "{e}");
        assert!(e["id"].as_str().is_some_and(|id| id.len() == 16), "{e}");
        assert!(
            e["createdAt"]
                .as_u64()
                .is_some_and(|t| t > 1_700_000_000_000),
            "{e}"
        );
    }
    let ids: std::collections::HashSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "event ids are unique");
    // The same events, in the same order, reached the receiver that failed at first.
    let flaky_ids: Vec<Value> = flaky.events().iter().map(|e| e["id"].clone()).collect();
    let good_ids: Vec<Value> = events.iter().map(|e| e["id"].clone()).collect();
    assert_eq!(flaky_ids, good_ids);
    // What a recording did.
    for e in events.iter().filter(|e| e["event"] == "recording_finished") {
        let r = &e["recording"];
        let path = r["path"].as_str().expect("a path");
        assert!(std::path::Path::new(path).exists(), "{e}");
        assert!(
            r["bytes"].as_u64() > Some(0) && r["frames"].as_u64() > Some(0),
            "{e}"
        );
        assert_eq!(r["droppedPackets"], 0, "{e}");
        assert!(r["error"].is_null(), "{e}");
    }

    let stats = &healthz(addr).await["webhooks"];
    // The flaky receiver's three failures, and the dead one still retrying its first event
    // (the others got everything meanwhile).
    assert!(stats["retried"].as_u64() >= Some(3 + 1), "{stats}");
    assert_eq!(stats["failed"], 0, "nothing given up yet: {stats}");
    assert_eq!(stats["dropped"], 0, "{stats}");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A recording that cannot be written fails alone: the call goes on, and the webhook says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_recording_fails_alone_and_the_webhook_says_why() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    // A file where the recording directory should be: nothing can be created under it.
    let blocker =
        std::env::temp_dir().join(format!("switchboard-not-a-dir-{}", std::process::id()));
    std::fs::write(&blocker, b"a file").unwrap();
    let mut config = test_config();
    config.webhook.urls = vec![url];
    config.webhook.secret = SECRET.into();
    config.recording.rooms = vec!["*".into()];
    config.recording.dir = blocker.clone();
    let server = Server::start(config).await.expect("server starts");
    let addr = server.local_addr();
    let alice = TestPeer::join(addr, "alice", "disk", 1, true).await;
    let bob = TestPeer::join(addr, "bob", "disk", 2, false).await;
    let flowing = eventually(Duration::from_secs(20), || {
        let tracks = bob.tracks_from("alice");
        tracks.len() == 2 && tracks.iter().all(|r| r.packets >= 20)
    })
    .await;
    assert!(flowing, "the call goes on: {}", bob.summary());
    let failed = eventually(Duration::from_secs(10), || {
        let events = receiver.events();
        let failures = events.iter().filter(|e| e["event"] == "recording_finished");
        failures
            .filter(|e| e["recording"]["path"].is_null() && e["recording"]["error"].is_string())
            .count()
            == 2
    })
    .await;
    assert!(failed, "{:#?}", receiver.events());
    assert!(!receiver.names().contains(&"recording_started".to_owned()));
    assert!(
        bob.envelopes_of("recordingStarted").is_empty(),
        "nothing is being recorded"
    );
    alice.close().await;
    bob.close().await;
    server.shutdown().await;
    let _ = std::fs::remove_file(&blocker);
}

/// A disk that fills up during a call: the recording stops with the reason in its webhook, and
/// the call goes on. The server runs with its recording directory on a 64 KiB tmpfs of its own
/// (a private mount namespace, gone with the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_recording_alone_and_the_webhook_says_why() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let dir = std::env::temp_dir().join(format!("switchboard-full-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A keyframe every 5 frames: bob's video starts within 170 ms of his joining.
    let source = dir.join("source");
    let media = Arc::new(common::media::encode_with_keyframes_every(&source, 4, 5));
    let mount_point = dir.join("rec");
    std::fs::create_dir_all(&mount_point).unwrap();
    let mount = format!(
        "mount -t tmpfs -o size=64k tmpfs '{}' && exec \"$@\"",
        mount_point.display()
    );
    let urls = format!("[\"{url}\"]");
    let server = common::Process::spawn_under(
        &["unshare", "-m", "sh", "-c", &mount, "sh"],
        &["--record-dir", mount_point.to_str().unwrap()],
        &[
            ("SWITCHBOARD_WEBHOOK__URLS", &urls),
            ("SWITCHBOARD_WEBHOOK__SECRET", SECRET),
            ("SWITCHBOARD_RECORDING__ROOMS", "[\"*\"]"),
        ],
    );
    let go = Arc::new(tokio::sync::Notify::new());
    let options = common::peer::Options {
        publish: true,
        hold_media: Some(go.clone()),
        encoded: Some(media.clone()),
        ..Default::default()
    };
    let alice = TestPeer::join_with(server.addr, "alice", "full", 1, options).await;
    let bob = TestPeer::join(server.addr, "bob", "full", 2, false).await;
    let up = eventually(Duration::from_secs(10), || {
        let states = alice.observed.states.lock().unwrap();
        states.iter().any(|s| s == "publisher Connected")
    })
    .await;
    assert!(up, "{}", alice.summary());
    go.notify_one();
    // 4 s of 300 kbit/s video: the 64 KiB are full after about 2 s; bob gets it all the same
    // (bar the first few frames before his subscription is up).
    let all = media.video.iter().map(Vec::len).sum::<usize>() as u64;
    let delivered = eventually(Duration::from_secs(15), || {
        let video = bob
            .tracks_from("alice")
            .into_iter()
            .find(|r| r.kind == "video");
        video.is_some_and(|v| v.packets >= all * 85 / 100)
    })
    .await;
    assert!(delivered, "the call goes on: {}", bob.summary());
    alice.close().await;
    let told = eventually(Duration::from_secs(10), || {
        receiver.events().iter().any(|e| {
            e["event"] == "recording_finished"
                && e["recording"]["path"].is_null()
                && e["recording"]["error"]
                    .as_str()
                    .is_some_and(|m| m.contains("space"))
        })
    })
    .await;
    assert!(told, "{:#?}\n{}", receiver.events(), server.log());
    bob.close().await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
