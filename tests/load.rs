//! `switchboard load`, the media load tool, end to end: it starts a server, joins members that
//! publish and receive over WebRTC, and reports what was delivered and what it cost.

mod common;

use std::process::Command;

/// Runs `switchboard load ARGS --json`; its report, and its stderr (progress lines).
fn load(args: &[&str]) -> (serde_json::Value, String) {
    common::logs();
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("load")
        .args(args)
        .arg("--json")
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (
        serde_json::from_str(&stdout).expect("a JSON report"),
        stderr,
    )
}

#[test]
fn the_load_tool_measures_a_lossless_run_and_its_floor() {
    let (r, stderr) = load(&[
        "--publishers",
        "2",
        "--subscribers",
        "2",
        "--pps",
        "200",
        "--seconds",
        "2",
        "--warmup",
        "1",
        "--data-rate",
        "10",
        "--floor",
    ]);
    let num = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    // 2 publishers x 3 receivers each (the other publisher and 2 subscribers) x 200/s.
    assert_eq!(num("expectedPerSecond"), 1200.0, "{r}");
    assert!(num("deliveredPerSecond") > 1100.0, "{r}\n{stderr}");
    assert!(num("lossPercent") < 1.0, "{r}");
    assert!(
        num("serverUsPerPacket") > 0.0 && num("serverCpuCores") > 0.0,
        "{r}"
    );
    assert!(r["floor"]["usPerDatagram"].as_f64().unwrap() > 0.0, "{r}");
    assert!(num("ratioToFloor") > 0.0, "{r}");
    assert!(
        num("setupMsP50") > 0.0 && num("firstPacketMsP50") > 0.0,
        "{r}"
    );
    // Each data message reaches the three other members.
    let (sent, delivered) = (num("dataSent"), num("dataDelivered"));
    assert!(sent > 0.0 && delivered > 0.0, "{r}");
    assert!(delivered <= sent * 3.0, "{r}");
}

/// `--relay-redis`: publishers on one node, subscribers on another; the publishers' node sends
/// each packet once, whatever the number of subscribers on the other node.
#[test]
fn the_load_tool_measures_relaying_between_two_nodes() {
    let redis = common::Redis::start();
    let (r, stderr) = load(&[
        "--publishers",
        "1",
        "--subscribers",
        "3",
        "--pps",
        "200",
        "--seconds",
        "2",
        "--warmup",
        "1",
        "--relay-redis",
        &redis.url(),
    ]);
    let relay = |k: &str| {
        r["relay"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {r}"))
    };
    assert!(
        r["deliveredPerSecond"].as_f64().unwrap() > 550.0,
        "{r}\n{stderr}"
    );
    // 200 packets/s cross once, not once per subscriber (600/s).
    let relayed = relay("relayedPerSecond");
    assert!((150.0..=250.0).contains(&relayed), "{r}");
    assert!(relay("publisherNodeUsPerRelayedPacket") > 0.0, "{r}");
    assert!(relay("subscriberNodeUsPerForwardedPacket") > 0.0, "{r}");
}
