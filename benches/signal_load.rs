//! End-to-end signaling load: N socket.io clients in M rooms send `msg` at a fixed total rate;
//! every receiver measures the delay from send to delivery. Reports deliveries per second, loss
//! and latency percentiles.
//!
//!   cargo bench --bench signal_load -- [--url 127.0.0.1:18080] [--redis redis://..] \
//!       [--clients 200] [--rooms 20] [--rate 1000] [--secs 10] [--payload 100]
//!
//! Without `--url` it starts a server in this process (in-memory, or on `--redis`). Run without
//! `--bench` (as `cargo test` does) it makes a short smoke run and fails on any loss.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use switchboard::load::signaling::{Client, Packet};

#[derive(Parser, Debug)]
struct Args {
    /// A running server to load; default: one started in this process.
    #[arg(long)]
    url: Option<SocketAddr>,
    /// Redis for the in-process server's registry.
    #[arg(long)]
    redis: Option<String>,
    #[arg(long, default_value_t = 200)]
    clients: usize,
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    /// Messages per second, all clients together.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Padding bytes per message.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Set by `cargo bench`; without it this is a smoke run.
    #[arg(long)]
    bench: bool,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    delivered: u64,
    latencies_us: Vec<u32>,
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    if !args.bench {
        // Smoke run under `cargo test`: small, short, and strict.
        (args.clients, args.rooms, args.rate, args.secs) = (20, 4, 200, 1);
    }
    let server = match args.url {
        Some(_) => None,
        None => {
            let mut cfg = switchboard::config::Config::defaults();
            cfg.server.listen = "127.0.0.1:0".parse().unwrap();
            if let Some(url) = &args.redis {
                cfg.redis.url = url.clone();
            }
            Some(
                switchboard::Server::start(cfg)
                    .await
                    .expect("server starts"),
            )
        }
    };
    let addr = args
        .url
        .unwrap_or_else(|| server.as_ref().unwrap().local_addr());
    let target = match (args.url, &args.redis) {
        (Some(url), _) => format!("server={url}"),
        (None, Some(_)) => "server=in-process registry=redis".to_owned(),
        (None, None) => "server=in-process registry=memory".to_owned(),
    };

    let mut clients = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let q = format!("userId=load-{i}&roomId=load-room-{}", i % args.rooms);
        clients.push(Client::connect(addr, &q).await.expect("connects"));
    }
    // Let every join envelope arrive before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let epoch = Instant::now();
    let measure_from = epoch + Duration::from_secs(1);
    let stop_sending = measure_from + Duration::from_secs(args.secs);
    let stop_all = stop_sending + Duration::from_secs(2);
    let per_client = Duration::from_secs_f64(args.clients as f64 / args.rate as f64);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let pad = "x".repeat(args.payload);

    let n_clients = args.clients;
    let mut tasks = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let tally = tally.clone();
        let pad = pad.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Tally::default();
            // Spread the senders evenly over one period.
            let offset = per_client.mul_f64(i as f64 / n_clients as f64);
            let mut tick = tokio::time::interval_at((epoch + offset).into(), per_client);
            loop {
                tokio::select! {
                    now = tick.tick(), if Instant::now() < stop_sending => {
                        let now = now.into_std();
                        let t = now.duration_since(epoch).as_micros() as u64;
                        let counted = now >= measure_from;
                        let _ = client.emit("msg", &json!({ "t": t, "c": counted, "pad": pad }));
                        if counted {
                            local.sent += 1;
                        }
                    }
                    p = client.recv(Duration::from_millis(100)) => match p {
                        Ok(Packet::Event { args, .. }) => {
                            let m = &args[0];
                            if m["c"] == true && let Some(t) = m["t"].as_u64() {
                                let now = epoch.elapsed().as_micros() as u64;
                                local.delivered += 1;
                                local.latencies_us.push(now.saturating_sub(t) as u32);
                            }
                        }
                        Ok(_) => {}
                        Err(_) if Instant::now() > stop_all => break,
                        Err(_) => {}
                    },
                }
            }
            let mut t = tally.lock().unwrap();
            t.sent += local.sent;
            t.delivered += local.delivered;
            t.latencies_us.extend(local.latencies_us);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let mut t = std::mem::take(&mut *tally.lock().unwrap());
    let room_size = args.clients / args.rooms;
    let expected = t.sent * room_size as u64;
    t.latencies_us.sort_unstable();
    let pct = |p: f64| {
        let v = &t.latencies_us;
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    let lost = expected.saturating_sub(t.delivered);
    println!(
        "signal_load {target} clients={} rooms={} rate={} msg/s payload={} B secs={}",
        args.clients, args.rooms, args.rate, args.payload, args.secs
    );
    println!(
        "  sent {} msgs, expected {expected} deliveries, delivered {} ({:.3}% lost): {:.0} deliveries/s",
        t.sent,
        t.delivered,
        100.0 * lost as f64 / expected.max(1) as f64,
        t.delivered as f64 / args.secs as f64,
    );
    println!(
        "  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    if let Some(s) = server {
        s.shutdown().await;
    }
    if !args.bench {
        assert!(
            t.sent > 0 && lost == 0,
            "smoke run lost {lost} of {expected} deliveries"
        );
    }
}
