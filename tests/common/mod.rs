//! Helpers shared by the integration tests: in-process servers on ephemeral loopback ports,
//! socket.io clients, and a real redis-server on a free port.
#![allow(dead_code)] // each test binary uses a different subset

pub mod media;
pub mod peer;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use switchboard::Server;
use switchboard::config::Config;
use switchboard::load::signaling::Client;

pub const WAIT: Duration = Duration::from_secs(5);
pub const QUIET: Duration = Duration::from_millis(300);

pub fn test_config() -> Config {
    logs();
    let mut c = Config::defaults();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.media.udp_port = 0; // any free port: tests run servers side by side
    c
}

/// Logs to the test output when RUST_LOG is set (e.g. RUST_LOG=switchboard=debug).
pub fn logs() {
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    }
}

pub async fn start() -> Server {
    logs();
    Server::start(test_config()).await.expect("server starts")
}

pub async fn start_with_redis(url: &str, node_id: &str) -> Server {
    let mut c = test_config();
    c.redis.url = url.to_owned();
    c.server.node_id = node_id.to_owned();
    c.redis.heartbeat_ms = 500;
    c.redis.node_ttl_ms = 1500;
    Server::start(c).await.expect("server starts")
}

pub fn query(user: &str, room: Option<&str>) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    match room {
        Some(r) => format!("userId={}&roomId={}", enc(user), enc(r)),
        None => format!("userId={}", enc(user)),
    }
}

/// Connects and consumes the client's own join envelope (when it has a room).
pub async fn join(addr: SocketAddr, user: &str, room: Option<&str>) -> Client {
    let mut c = Client::connect(addr, &query(user, room))
        .await
        .expect("connects");
    if room.is_some() {
        // With several nodes, another member's join can arrive (over the bus) just after this
        // client joined and before its own; skip those.
        loop {
            let j = c
                .recv_msg_type("join", WAIT)
                .await
                .expect("own join envelope");
            if j["data"]["userId"] == user {
                break;
            }
        }
    }
    c
}

/// A redis-server of its own on a free loopback port, stopped on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        let port = free_port();
        let mut r = Redis { port, child: None };
        r.spawn();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {bin} ({e}); the README's test command installs it")
            });
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Kills the server (data is lost: it runs without persistence).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers, a slow Redis.
    pub fn pause(&self) {
        self.kill_with("-STOP");
    }

    pub fn resume(&self) {
        self.kill_with("-CONT");
    }

    fn kill_with(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it is true or `wait` passes.
pub async fn eventually(wait: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real `switchboard` binary as a child process (for kill -9 and signal tests).
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Process {
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Process {
        Self::spawn_under(&[], args, env)
    }

    /// [`Process::spawn`] through `wrapper` (a command that ends by running the rest of its
    /// arguments, such as `unshare -m sh -c '... && exec "$@"' sh`).
    pub fn spawn_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Process {
        use std::io::{BufRead, BufReader};
        let binary = env!("CARGO_BIN_EXE_switchboard");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        cmd.args(["--listen", "127.0.0.1:0", "--udp-port", "0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("switchboard binary runs");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).expect("reads the first line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; stderr: {}",
                    stderr.lock().unwrap()
                )
            })
            .parse()
            .unwrap();
        Process {
            child,
            addr,
            stderr,
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny HTTP/1.1 GET over loopback, to avoid an HTTP client dependency in tests.
/// The server's `/healthz` document.
pub async fn healthz(addr: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&http_get(&format!("http://{addr}/healthz")).await).unwrap()
}

pub async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Checks the output of a node check script (tests/interop/*.mjs): it exited with success and
/// printed exactly `summary` ("N passed, 0 failed"), so a check that silently stopped running
/// is noticed too.
pub fn assert_node_checks(out: &std::process::Output, summary: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "node checks failed:\n{stdout}");
    assert!(stdout.lines().any(|l| l == summary), "{stdout}");
}
