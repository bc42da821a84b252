//! `switchboard load`: an end-to-end load test of the media plane, and the clients it (and the
//! integration tests) use: a minimal socket.io client and webrtc-rs peer connections.
//!
//! Members join rooms over socket.io and WebRTC exactly as browsers do; publishers send paced
//! video (pre-built packets, no encoding) and optionally data-channel messages; every member
//! counts what it receives. The server's CPU time per forwarded packet is read from its process,
//! and `--floor` first measures a bare UDP sender on the same traffic, so the figure can be
//! quoted as a ratio to what the kernel alone costs.

pub mod cpu;
pub mod floor;
pub mod member;
pub mod peer;
pub mod sfu_client;
pub mod signaling;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use serde::Serialize;

use floor::FloorReport;
use member::{Member, Sending};
use peer::ClientFactory;

/// How publishers spread their packets.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pacing {
    /// Packets spread evenly in 2 ms steps, as a browser's pacer sends.
    Paced,
    /// A frame's packets at once, 30 frames per second.
    Burst,
}

/// The SRTP profiles the load clients offer.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Srtp {
    /// webrtc-rs's default list (AES-GCM first): the server picks AES-GCM.
    Any,
    /// Only AES_CM_128_HMAC_SHA1_80, as an old client would.
    AesCm,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// A running server (http://HOST:PORT); without it a server is started on loopback.
    #[arg(long)]
    pub url: Option<String>,
    /// Its process id, to read its CPU time (default: the pid its /healthz reports).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Extra flags for the server this starts (repeat for several), e.g. --server-arg=--media-loops=1.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Members per room that publish and, as in a meeting, receive every other publisher.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Receive-only members per room.
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Video packets per second per publisher.
    #[arg(long, default_value_t = 500.0)]
    pub pps: f64,
    /// Video bits per second per publisher (instead of --pps).
    #[arg(long)]
    pub bitrate: Option<f64>,
    /// RTP payload bytes per packet.
    #[arg(long, default_value_t = 1000)]
    pub payload_bytes: usize,
    #[arg(long, value_enum, default_value = "paced")]
    pub pacing: Pacing,
    /// Length of the measurement, after everyone is connected and a warm-up.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Data-channel messages per second per publisher (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub data_rate: f64,
    #[arg(long, value_enum, default_value = "any")]
    pub srtp: Srtp,
    /// Measure a bare UDP sender on the same traffic first, and report the ratio to it.
    #[arg(long)]
    pub floor: bool,
    /// The report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Relaying between nodes: start two servers on this Redis (media on 127.0.0.2 and
    /// 127.0.0.3), publishers on the first, subscribers on the second, and report each node's
    /// CPU per packet it relays or forwards.
    #[arg(long, conflicts_with = "url")]
    pub relay_redis: Option<String>,
}

/// The traffic of a run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub rooms: usize,
    pub publishers: usize,
    pub subscribers: usize,
    pub pps: f64,
    pub pacing: Pacing,
    /// Publishers receive the other publishers (a meeting); always true here.
    pub publishers_receive: bool,
}

impl Shape {
    pub fn receivers_per_room(&self) -> usize {
        self.publishers + self.subscribers
    }

    /// Packets per second that should reach receivers, in all.
    pub fn forwarded_per_second(&self) -> f64 {
        let receivers_each = self.publishers.saturating_sub(1) + self.subscribers;
        (self.rooms * self.publishers * receivers_each) as f64 * self.pps
    }

    /// Down-tracks (copies of a track) in all.
    pub fn down_tracks(&self) -> usize {
        self.rooms * self.publishers * (self.publishers.saturating_sub(1) + self.subscribers)
    }

    /// A sending step and how many packets it carries on average.
    pub fn schedule(&self) -> (Duration, f64) {
        schedule(self.pacing, self.pps)
    }

    /// When in the step publisher `index` (of all rooms) sends: spread evenly, as independent
    /// senders are.
    pub fn phase(&self, index: usize) -> Duration {
        let publishers = (self.rooms * self.publishers).max(1);
        self.schedule()
            .0
            .mul_f64((index % publishers) as f64 / publishers as f64)
    }
}

/// Paced: 2 ms steps; burst: a frame's packets every 1/30 s.
pub fn schedule(pacing: Pacing, pps: f64) -> (Duration, f64) {
    match pacing {
        Pacing::Paced => (Duration::from_millis(2), pps * 0.002),
        Pacing::Burst => (Duration::from_secs_f64(1.0 / 30.0), pps / 30.0),
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub rooms: usize,
    pub publishers: usize,
    pub subscribers: usize,
    pub pps: f64,
    pub payload_bytes: usize,
    pub pacing: Pacing,
    pub srtp: Srtp,
    pub seconds: f64,
    pub expected_per_second: f64,
    pub delivered_per_second: f64,
    pub loss_percent: f64,
    pub server_cpu_cores: f64,
    pub server_us_per_packet: f64,
    pub server_rss_mb: f64,
    pub rss_kb_per_down_track: f64,
    pub setup_ms_p50: f64,
    pub setup_ms_p99: f64,
    pub setup_ms_max: f64,
    pub first_packet_ms_p50: f64,
    pub first_packet_ms_p99: f64,
    pub data_sent: u64,
    pub data_delivered: u64,
    pub data_expected: u64,
    pub client_cpu_cores: f64,
    pub floor: Option<FloorReport>,
    /// Server CPU per forwarded packet over the floor's CPU per datagram.
    pub ratio_to_floor: Option<f64>,
    /// With `--relay-redis`: the two nodes' costs.
    pub relay: Option<RelayReport>,
}

/// Relaying between two nodes: the publishers' node sends each packet once to the
/// subscribers' node, which forwards it to its members.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayReport {
    pub relayed_per_second: f64,
    /// The publishers' node: CPU per packet it received and relayed.
    pub publisher_node_us_per_relayed_packet: f64,
    /// The subscribers' node: CPU per packet it forwarded to a member.
    pub subscriber_node_us_per_forwarded_packet: f64,
}

/// The server under test: started here, or a running one.
struct Server {
    addr: SocketAddr,
    pid: Option<u32>,
    child: Option<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The servers under test: one, or with `--relay-redis` the publishers' node and the
/// subscribers' node.
fn start_servers(args: &LoadArgs) -> anyhow::Result<Vec<Server>> {
    let Some(redis) = &args.relay_redis else {
        return Ok(vec![start_server(args, &[])?]);
    };
    [("load-n1", "127.0.0.2"), ("load-n2", "127.0.0.3")]
        .into_iter()
        .map(|(node, ip)| {
            let cluster = ["--redis", redis, "--node-id", node, "--media-ip", ip];
            start_server(args, &cluster)
        })
        .collect()
}

fn start_server(args: &LoadArgs, extra: &[&str]) -> anyhow::Result<Server> {
    if let Some(url) = &args.url {
        let addr: SocketAddr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .with_context(|| format!("--url {url}: expected http://HOST:PORT"))?;
        return Ok(Server {
            addr,
            pid: args.server_pid,
            child: None,
        });
    }
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["--listen", "127.0.0.1:0", "--udp-port", "0"])
        .args(&args.server_args)
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the server")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .with_context(|| format!("unexpected first line from the server: {line:?}"))?
        .parse()?;
    Ok(Server {
        addr,
        pid: Some(child.id()),
        child: Some(child),
    })
}

/// A server's /healthz document.
async fn healthz(addr: SocketAddr) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    serde_json::from_str(body.split_once("\r\n\r\n")?.1).ok()
}

/// The server's pid from its /healthz (a local server only: its /proc entry must exist).
async fn healthz_pid(addr: SocketAddr) -> Option<u32> {
    let pid = healthz(addr).await?["pid"].as_u64()? as u32;
    cpu::process_cpu(pid).map(|_| pid)
}

/// Packets a node has sent on pipes to other nodes.
async fn relayed_out(addr: SocketAddr) -> u64 {
    healthz(addr)
        .await
        .and_then(|h| h["media"]["relayedOut"].as_u64())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// What every member has received so far, per (member, publisher): (packets, highest seq).
type Snapshot = std::collections::HashMap<(usize, String), (u64, u64)>;

fn snapshot(members: &[Member]) -> Snapshot {
    let mut out = Snapshot::new();
    for (i, m) in members.iter().enumerate() {
        let streams = m.stats.streams.lock().unwrap_or_else(|e| e.into_inner());
        for (publisher, c) in streams.iter() {
            let counts = (
                c.received.load(Ordering::Relaxed),
                c.highest.load(Ordering::Relaxed),
            );
            out.insert((i, publisher.clone()), counts);
        }
    }
    out
}

/// (delivered, expected) between two snapshots: expected from the sequence numbers' advance.
fn delivered(before: &Snapshot, after: &Snapshot) -> (u64, u64) {
    let (mut got, mut expected) = (0, 0);
    for (key, &(received, highest)) in after {
        let (received0, highest0) = before.get(key).copied().unwrap_or((received, highest));
        got += received - received0;
        expected += highest - highest0;
    }
    (got, expected)
}

/// Runs a load test and returns its report (printing progress on stderr).
pub async fn run(args: LoadArgs) -> anyhow::Result<Report> {
    let pps = match args.bitrate {
        Some(bits) => bits / 8.0 / args.payload_bytes as f64,
        None => args.pps,
    };
    let shape = Shape {
        rooms: args.rooms,
        publishers: args.publishers,
        subscribers: args.subscribers,
        pps,
        pacing: args.pacing,
        publishers_receive: true,
    };
    anyhow::ensure!(shape.publishers > 0, "at least one publisher per room");
    let floor = if args.floor {
        eprintln!("floor: a bare UDP sender on the same traffic");
        // An RTP header and the AES-GCM tag around the payload: what the SFU sends.
        let bytes = 12 + args.payload_bytes + 16;
        let report = tokio::task::spawn_blocking(move || {
            floor::measure(
                &shape,
                bytes,
                Duration::from_secs(1),
                Duration::from_secs(args.seconds.clamp(1, 10)),
            )
        })
        .await??;
        eprintln!(
            "floor: {:.0} datagrams/s, {:.2} us CPU per datagram",
            report.datagrams as f64 / report.seconds,
            report.us_per_datagram
        );
        Some(report)
    } else {
        None
    };

    let servers = start_servers(&args)?;
    let mut pids = Vec::new();
    for server in &servers {
        pids.push(match server.pid {
            Some(pid) => Some(pid),
            None => healthz_pid(server.addr).await,
        });
    }
    // Publishers join the first server, subscribers the last (the same one but with
    // --relay-redis).
    let (first, last) = (&servers[0], &servers[servers.len() - 1]);
    let rss_of = |pids: &[Option<u32>]| {
        pids.iter()
            .flatten()
            .filter_map(|p| cpu::rss_kb(*p))
            .sum::<u64>()
    };
    let rss_before = rss_of(&pids);
    let factory = match args.srtp {
        Srtp::Any => ClientFactory::new([127, 0, 0, 1].into()),
        Srtp::AesCm => ClientFactory::new([127, 0, 0, 1].into())
            .with_srtp_profiles(&[SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80]),
    };
    let epoch = Instant::now();
    let sending = |index: usize| Sending {
        pps,
        payload_bytes: args.payload_bytes,
        pacing: args.pacing,
        data_rate: args.data_rate,
        epoch,
        phase: shape.phase(index),
    };
    // Everyone joins at once, as at the start of a meeting.
    let mut joins = Vec::new();
    for r in 0..args.rooms {
        let room = format!("load{r}");
        for p in 0..args.publishers {
            joins.push((
                format!("r{r}p{p}"),
                room.clone(),
                Some(sending(r * args.publishers + p)),
            ));
        }
        for s in 0..args.subscribers {
            joins.push((format!("r{r}s{s}"), room.clone(), None));
        }
    }
    let joined = futures_util::future::join_all(joins.iter().map(|(user, room, sending)| {
        let server = if sending.is_some() { first } else { last };
        Member::join(server.addr, &factory, user, room, *sending)
    }))
    .await;
    let members: Vec<Member> = joined.into_iter().collect::<anyhow::Result<_>>()?;
    let expect_from = |m: &Member| args.publishers - usize::from(m.publishes);
    let all_flowing = async {
        loop {
            if members
                .iter()
                .all(|m| m.stats.receiving_from() >= expect_from(m))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), all_flowing)
        .await
        .is_err()
    {
        let short: Vec<String> = members
            .iter()
            .filter(|m| m.stats.receiving_from() < expect_from(m))
            .map(|m| {
                format!(
                    "{} ({} of {})",
                    m.user,
                    m.stats.receiving_from(),
                    expect_from(m)
                )
            })
            .collect();
        anyhow::bail!("not every member receives every publisher after 60 s: {short:?}");
    }
    eprintln!(
        "{} members connected; warming up {} s",
        members.len(),
        args.warmup
    );
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;

    let cpu_of = |pid: Option<u32>| pid.and_then(cpu::process_cpu).unwrap_or_default();
    let server_cpu = || pids.iter().map(|p| cpu_of(*p)).sum::<Duration>();
    let (relay_cpu0, relayed0) = (cpu_of(pids[0]), relayed_out(first.addr).await);
    let own_cpu = || cpu::process_cpu(std::process::id()).unwrap_or_default();
    let data =
        |f: fn(&member::MemberStats) -> u64| members.iter().map(|m| f(&m.stats)).sum::<u64>();
    let (start, cpu0, own0, snap0) = (Instant::now(), server_cpu(), own_cpu(), snapshot(&members));
    let (data_sent0, data_got0) = (
        data(|s| s.data_sent.load(Ordering::Relaxed)),
        data(|s| s.data_received.load(Ordering::Relaxed)),
    );
    let mut last = (start, cpu0, snap0.clone());
    for _ in 0..args.seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (now, cpu, snap) = (Instant::now(), server_cpu(), snapshot(&members));
        let (got, expected) = delivered(&last.2, &snap);
        let secs = now.duration_since(last.0).as_secs_f64();
        let cpu_s = cpu.saturating_sub(last.1).as_secs_f64();
        eprintln!(
            "{:>4.0} s  delivered {:>7.0}/s  loss {:>5.2}%  server {:.2} cores, {:.2} us/packet",
            now.duration_since(start).as_secs_f64(),
            got as f64 / secs,
            100.0 * (1.0 - got as f64 / expected.max(1) as f64).max(0.0),
            cpu_s / secs,
            cpu_s * 1e6 / got.max(1) as f64,
        );
        last = (now, cpu, snap);
    }
    let (end, cpu1, own1, snap1) = (Instant::now(), server_cpu(), own_cpu(), snapshot(&members));
    let (relay_cpu1, relayed1) = (cpu_of(pids[0]), relayed_out(first.addr).await);
    let (data_sent1, data_got1) = (
        data(|s| s.data_sent.load(Ordering::Relaxed)),
        data(|s| s.data_received.load(Ordering::Relaxed)),
    );
    let secs = end.duration_since(start).as_secs_f64();
    let (got, expected) = delivered(&snap0, &snap1);
    let server_cpu_s = cpu1.saturating_sub(cpu0).as_secs_f64();
    let rss = rss_of(&pids);
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let mut setups: Vec<f64> = members
        .iter()
        .flat_map(|m| {
            let s = &m.stats;
            [
                ms(*s.publisher_setup.lock().unwrap_or_else(|e| e.into_inner())),
                ms(*s.subscriber_setup.lock().unwrap_or_else(|e| e.into_inner())),
            ]
        })
        .flatten()
        .collect();
    setups.sort_by(f64::total_cmp);
    let mut firsts: Vec<f64> = members
        .iter()
        .filter_map(|m| {
            ms(*m
                .stats
                .first_packet
                .lock()
                .unwrap_or_else(|e| e.into_inner()))
        })
        .collect();
    firsts.sort_by(f64::total_cmp);
    let server_us = server_cpu_s * 1e6 / got.max(1) as f64;
    // Every other member of the room receives each data message.
    let receivers_each = (args.publishers - 1 + args.subscribers) as u64;
    let report = Report {
        rooms: args.rooms,
        publishers: args.publishers,
        subscribers: args.subscribers,
        pps,
        payload_bytes: args.payload_bytes,
        pacing: args.pacing,
        srtp: args.srtp,
        seconds: secs,
        expected_per_second: shape.forwarded_per_second(),
        delivered_per_second: got as f64 / secs,
        loss_percent: 100.0 * (1.0 - got as f64 / expected.max(1) as f64).max(0.0),
        server_cpu_cores: server_cpu_s / secs,
        server_us_per_packet: server_us,
        server_rss_mb: rss as f64 / 1024.0,
        rss_kb_per_down_track: rss.saturating_sub(rss_before) as f64
            / shape.down_tracks().max(1) as f64,
        setup_ms_p50: percentile(&setups, 0.5),
        setup_ms_p99: percentile(&setups, 0.99),
        setup_ms_max: setups.last().copied().unwrap_or(f64::NAN),
        first_packet_ms_p50: percentile(&firsts, 0.5),
        first_packet_ms_p99: percentile(&firsts, 0.99),
        data_sent: data_sent1 - data_sent0,
        data_delivered: data_got1 - data_got0,
        data_expected: (data_sent1 - data_sent0) * receivers_each,
        client_cpu_cores: own1.saturating_sub(own0).as_secs_f64() / secs,
        floor,
        ratio_to_floor: floor.map(|f| server_us / f.us_per_datagram),
        relay: args.relay_redis.is_some().then(|| {
            let publisher_node_s = relay_cpu1.saturating_sub(relay_cpu0).as_secs_f64();
            let relayed = relayed1.saturating_sub(relayed0);
            RelayReport {
                relayed_per_second: relayed as f64 / secs,
                publisher_node_us_per_relayed_packet: publisher_node_s * 1e6
                    / relayed.max(1) as f64,
                subscriber_node_us_per_forwarded_packet: (server_cpu_s - publisher_node_s) * 1e6
                    / got.max(1) as f64,
            }
        }),
    };
    for m in members {
        m.close().await;
    }
    drop(servers);
    Ok(report)
}

/// The report as a table.
pub fn print_table(r: &Report) {
    let row = |name: &str, value: String| println!("  {name:<34} {value}");
    println!(
        "load: {} room(s) x ({} publisher(s) + {} subscriber(s)), {:.0} packets/s of {} B per publisher, {:?}, {:.1} s",
        r.rooms, r.publishers, r.subscribers, r.pps, r.payload_bytes, r.pacing, r.seconds
    );
    row(
        "delivered packets/s",
        format!(
            "{:.0} (expected {:.0})",
            r.delivered_per_second, r.expected_per_second
        ),
    );
    row("loss", format!("{:.3} %", r.loss_percent));
    row("server CPU", format!("{:.3} cores", r.server_cpu_cores));
    row(
        "server CPU per forwarded packet",
        format!("{:.2} us", r.server_us_per_packet),
    );
    if let (Some(f), Some(ratio)) = (r.floor, r.ratio_to_floor) {
        row(
            "floor (bare UDP) per datagram",
            format!("{:.2} us", f.us_per_datagram),
        );
        row("ratio to the floor", format!("{ratio:.2}"));
    }
    if let Some(relay) = r.relay {
        row(
            "relayed between nodes",
            format!("{:.0} packets/s", relay.relayed_per_second),
        );
        row(
            "publishers' node per relayed packet",
            format!("{:.2} us", relay.publisher_node_us_per_relayed_packet),
        );
        row(
            "subscribers' node per forwarded packet",
            format!("{:.2} us", relay.subscriber_node_us_per_forwarded_packet),
        );
    }
    row(
        "server RSS",
        format!(
            "{:.1} MB ({:.1} kB per down-track)",
            r.server_rss_mb, r.rss_kb_per_down_track
        ),
    );
    row(
        "connection set-up p50 / p99 / max",
        format!(
            "{:.0} / {:.0} / {:.0} ms",
            r.setup_ms_p50, r.setup_ms_p99, r.setup_ms_max
        ),
    );
    row(
        "first packet p50 / p99",
        format!(
            "{:.0} / {:.0} ms",
            r.first_packet_ms_p50, r.first_packet_ms_p99
        ),
    );
    if r.data_sent > 0 {
        row(
            "data messages delivered",
            format!("{} of {}", r.data_delivered, r.data_expected),
        );
    }
    row(
        "load clients' CPU",
        format!("{:.2} cores", r.client_cpu_cores),
    );
}
