//! End to end in headless Chromium (Debian's `chromium`, driven by npm `playwright-core`):
//! three users on the demo page see and hear each other through the server and chat over data
//! channels. The server and the browser run in a fresh network namespace that has only
//! loopback (`unshare -n`), so nothing leaves the machine.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn three_browsers_see_each_other_and_chat_through_the_demo_page() {
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
            "ip link set lo up && exec node browser.mjs \"$0\"",
        ])
        .arg(env!("CARGO_BIN_EXE_switchboard"))
        .current_dir(&dir)
        .output()
        .expect("unshare runs (needs root or user namespaces)");
    common::assert_node_checks(&out, "27 passed, 0 failed");
}
