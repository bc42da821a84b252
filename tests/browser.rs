//! End to end in headless Chromium (Debian's `chromium`, driven by npm `playwright-core`):
//! three users on the demo page see and hear each other through the server and chat over data
//! channels; and four of them on two nodes of one room. The servers and the browser run in a
//! fresh network namespace that has only loopback (`unshare -n`), so nothing leaves the machine.

mod common;

use std::path::Path;
use std::process::Command;

/// Runs `script` (in tests/interop) with the server binary, in a network namespace with only
/// loopback, and checks its summary line.
fn run_in_loopback_namespace(script: &str, summary: &str) {
    // One browser at a time: two at once on a small machine would time each other's set-up.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "run the README's test command (it runs `npm ci` in tests/interop)"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "run the README's test command (it installs Debian's chromium)"
    );
    let out = Command::new("unshare")
        .args([
            "-n",
            "sh",
            "-c",
            "ip link set lo up && exec node \"$0\" \"$1\"",
            script,
        ])
        .arg(env!("CARGO_BIN_EXE_switchboard"))
        .current_dir(&dir)
        .output()
        .expect("unshare runs (needs root or user namespaces)");
    common::assert_node_checks(&out, summary);
}

#[test]
fn three_browsers_see_each_other_and_chat_through_the_demo_page() {
    run_in_loopback_namespace("browser.mjs", "27 passed, 0 failed");
}

/// One room across two nodes on one Redis (in the namespace): four browsers, two per node.
#[test]
fn four_browsers_on_two_nodes_form_one_meeting() {
    run_in_loopback_namespace("cluster.mjs", "19 passed, 0 failed");
}
