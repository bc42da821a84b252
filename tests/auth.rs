//! Access tokens (issue 9): the handshake through the real npm socket.io-client (valid,
//! expired, wrong key, wrong user, wrong room, RS256 minted by another service, a missing
//! grant, calls outside the room, the API's record grant; tests/interop/auth.mjs holds those
//! checks), and grants deciding who sends and who receives media (webrtc-rs peers).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::peer::{Options, TestPeer};
use common::{eventually, test_config};
use switchboard::Server;
use switchboard::auth::{Claims, Grant, mint};

const SECRET: &str = "correct horse battery staple";
const HOUR: Duration = Duration::from_secs(3600);

fn token(user: &str, room: &str, grants: Option<Vec<Grant>>) -> String {
    mint(SECRET, &Claims::new(user, Some(room), grants, HOUR)).unwrap()
}

fn node(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("node")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("node runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_valid_token_gets_in_and_only_as_what_it_says() {
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        interop.join("node_modules/socket.io-client").exists(),
        "run the README's test command (it runs `npm ci` in tests/interop)"
    );
    // Another service's key pair, made by node: it signs RS256 tokens, the server has the
    // public half.
    let keys = tempfile::tempdir().unwrap();
    let keys_dir = keys.path().to_str().unwrap().to_owned();
    let made = node(&interop, &["auth.mjs", "keypair", &keys_dir]);
    assert!(made.status.success(), "{made:?}");

    let mut config = test_config();
    config.auth.secret = SECRET.into();
    config.auth.public_key_file = keys.path().join("public.pem");
    let server = Server::start(config).await.expect("server starts");

    let mut expired = Claims::new("alice", Some("r1"), None, HOUR);
    expired.exp -= 2 * 3600;
    // From the command line, as an operator would mint one.
    let cli = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["token", "--user", "dave", "--room", "r1", "--ttl", "10m"])
        .env("SWITCHBOARD_AUTH__SECRET", SECRET)
        .output()
        .expect("switchboard token runs");
    assert!(cli.status.success(), "{cli:?}");
    let tokens = serde_json::json!({
        "alice": token("alice", "r1", None),
        "bob": token("bob", "r1", None),
        "carol": token("carol", "r2", None),
        "viewer": token("viewer", "r1", Some(vec![Grant::Subscribe])),
        "recorder": token("rec", "r1", Some(vec![Grant::Record])),
        "expired": mint(SECRET, &expired).unwrap(),
        "wrongKey": mint("another secret", &Claims::new("alice", Some("r1"), None, HOUR)).unwrap(),
        "cli": String::from_utf8(cli.stdout).unwrap().trim(),
    });
    let tokens_file = keys.path().join("tokens.json");
    std::fs::write(&tokens_file, tokens.to_string()).unwrap();

    let url = format!("http://{}", server.local_addr());
    let tokens_path = tokens_file.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        node(
            &interop,
            &["auth.mjs", "check", &url, &tokens_path, &keys_dir],
        )
    })
    .await
    .unwrap();
    common::assert_node_checks(&out, "12 passed, 0 failed");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_decide_who_sends_and_who_receives_media() {
    let mut config = test_config();
    config.auth.secret = SECRET.into();
    let server = Server::start(config).await.expect("server starts");
    let addr = server.local_addr();
    let with = |publish: bool, token: String| Options {
        publish,
        chat: publish,
        token: Some(token),
        ..Default::default()
    };
    let alice =
        TestPeer::join_with(addr, "alice", "R", 1, with(true, token("alice", "R", None))).await;
    // Sends, but may not receive.
    let sender_only = Some(vec![Grant::Publish, Grant::PublishData]);
    let blind = TestPeer::join_with(
        addr,
        "blind",
        "R",
        2,
        with(true, token("blind", "R", sender_only)),
    )
    .await;
    let viewer_only = Some(vec![Grant::Subscribe]);
    let viewer = TestPeer::join_with(
        addr,
        "viewer",
        "R",
        3,
        with(false, token("viewer", "R", viewer_only)),
    )
    .await;

    let both = || viewer.tracks_from("alice").len() == 2 && viewer.tracks_from("blind").len() == 2;
    assert!(
        eventually(Duration::from_secs(20), both).await,
        "{}",
        viewer.summary()
    );
    assert!(
        eventually(Duration::from_secs(10), || alice.tracks_from("blind").len()
            == 2)
        .await,
        "{}",
        alice.summary()
    );
    // Long after media flowed to everyone else, the member without `subscribe` has none.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(blind.live_tracks().is_empty(), "{}", blind.summary());
    assert!(
        blind.envelopes_of("error").is_empty(),
        "{}",
        blind.summary()
    );

    for peer in [alice, blind, viewer] {
        peer.close().await;
    }
    server.shutdown().await;
}

/// The binary: without a secret it says once, at start, that anyone can join; `--auth-secret`
/// turns tokens on (a handshake without one is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_says_when_auth_is_off_and_takes_the_secret_flag() {
    use switchboard::load::signaling::{Client, ClientError};
    let open = common::Process::spawn(&[], &[]);
    let _ = common::join(open.addr, "anyone", Some("r")).await;
    // (stderr is read by a thread of its own: give it a moment)
    eventually(Duration::from_secs(2), || {
        open.log().contains("auth is off")
    })
    .await;
    assert_eq!(
        open.log().matches("auth is off").count(),
        1,
        "{}",
        open.log()
    );

    let closed = common::Process::spawn(&["--auth-secret", SECRET], &[]);
    match Client::connect(closed.addr, &common::query("anyone", Some("r"))).await {
        Err(ClientError::Refused(msg)) => assert!(msg.contains("token is required"), "{msg}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("joined without a token"),
    }
    let token = token("anyone", "r", None);
    let query = format!("{}&token={token}", common::query("anyone", Some("r")));
    Client::connect(closed.addr, &query)
        .await
        .expect("a token gets in");
    assert!(!closed.log().contains("auth is off"), "{}", closed.log());
}
