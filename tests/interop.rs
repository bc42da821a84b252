//! The real npm `socket.io-client` 4.x against the in-process server, over websocket, polling
//! and the polling-to-websocket upgrade (tests/interop/signaling.mjs holds the checks).

mod common;

use std::path::Path;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_socket_io_client_speaks_part_1_over_every_transport() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join("node_modules/socket.io-client").exists(),
        "run the README's test command (it runs `npm ci` in tests/interop)"
    );
    let server = common::start().await;
    let url = format!("http://{}", server.local_addr());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("signaling.mjs")
            .arg(url)
            .current_dir(dir)
            .output()
    })
    .await
    .unwrap()
    .expect("node runs");
    common::assert_node_checks(&out, "9 passed, 0 failed");
    server.shutdown().await;
}
