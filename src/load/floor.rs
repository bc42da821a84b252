//! The floor: what sending the same datagrams costs with no WebRTC at all. A bare UDP sender
//! sends, on each publisher's schedule, each of its packets to each of that room's receivers
//! (one `sendmmsg` per publisher step, packets of one step to one receiver as a GSO run: the
//! best batching the SFU could do for that traffic), and its thread's CPU time per datagram is
//! the figure. On loopback that includes the receivers' kernel work, which loopback charges to
//! the sender, as it does for the SFU.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::sfu::io::{RecvBatch, SendBatch, gso_supported};

use super::Shape;
use super::cpu::thread_cpu;

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FloorReport {
    pub datagrams: u64,
    pub seconds: f64,
    pub cpu_seconds: f64,
    /// CPU per datagram sent, in microseconds.
    pub us_per_datagram: f64,
    pub received: u64,
}

/// Runs the floor sender for `seconds` (after `warmup`) on the shape of a load run.
pub fn measure(
    shape: &Shape,
    datagram_bytes: usize,
    warmup: Duration,
    seconds: Duration,
) -> std::io::Result<FloorReport> {
    // One receiving socket per receiving member, as many as the SFU run has.
    let mut rooms = Vec::new();
    let mut all_receivers = Vec::new();
    for _ in 0..shape.rooms {
        let mut room = Vec::new();
        for _ in 0..shape.receivers_per_room() {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.set_nonblocking(true)?;
            room.push(s.local_addr()?);
            all_receivers.push(s);
        }
        rooms.push(room);
    }
    let running = Arc::new(AtomicBool::new(true));
    let received = Arc::new(AtomicU64::new(0));
    let drain = {
        let (running, received) = (running.clone(), received.clone());
        std::thread::spawn(move || drain_receivers(all_receivers, &running, &received))
    };
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    // The same socket settings as the media port's.
    crate::sfu::io::port::set_dont_fragment(&sender, true);
    let result = send(&sender, shape, &rooms, datagram_bytes, warmup, seconds);
    running.store(false, Ordering::SeqCst);
    let _ = drain.join();
    let mut report = result?;
    report.received = received.load(Ordering::Relaxed);
    Ok(report)
}

/// The sender: each publisher's steps in time order.
fn send(
    socket: &UdpSocket,
    shape: &Shape,
    rooms: &[Vec<SocketAddr>],
    datagram_bytes: usize,
    warmup: Duration,
    seconds: Duration,
) -> std::io::Result<FloorReport> {
    let mut batch = SendBatch::new(gso_supported(socket));
    let start = Instant::now();
    // Publisher i of room r sends its k-th step at start + phase + k * step (phases spread the
    // publishers over a step, as independent senders are).
    let (step, per_step) = shape.schedule();
    let publishers: Vec<(usize, usize)> = (0..rooms.len())
        .flat_map(|r| (0..shape.publishers).map(move |p| (r, p)))
        .collect();
    let phase = |i: usize| step.mul_f64(i as f64 / publishers.len().max(1) as f64);
    let mut steps_done = vec![0u64; publishers.len()];
    let mut carry = vec![0.0f64; publishers.len()];
    let (mut measured_from, mut cpu0, mut sent0) = (None, Duration::ZERO, 0);
    let end = start + warmup + seconds;
    loop {
        // The publisher whose next step is earliest.
        let (i, due) = publishers
            .iter()
            .enumerate()
            .map(|(i, _)| (i, start + phase(i) + step * steps_done[i] as u32))
            .min_by_key(|(_, t)| *t)
            .expect("at least one publisher");
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if measured_from.is_none() && Instant::now() >= start + warmup {
            measured_from = Some(Instant::now());
            cpu0 = thread_cpu();
            sent0 = batch.stats.datagrams;
        }
        steps_done[i] += 1;
        carry[i] += per_step;
        let packets = carry[i].floor() as usize;
        carry[i] -= packets as f64;
        let (room, publisher) = publishers[i];
        for (k, &to) in rooms[room].iter().enumerate() {
            // Members that publish receive everyone but themselves.
            if shape.publishers_receive && k == publisher {
                continue;
            }
            for _ in 0..packets {
                let mut buf = batch.buffer();
                buf.resize(datagram_bytes, 0xAB);
                batch.push(k as u32, to, buf);
            }
        }
        batch.flush(socket);
    }
    let from = measured_from.unwrap_or(start);
    let cpu = thread_cpu().saturating_sub(cpu0).as_secs_f64();
    let datagrams = batch.stats.datagrams - sent0;
    Ok(FloorReport {
        datagrams,
        seconds: from.elapsed().as_secs_f64(),
        cpu_seconds: cpu,
        us_per_datagram: cpu * 1e6 / datagrams.max(1) as f64,
        received: 0,
    })
}

fn drain_receivers(sockets: Vec<UdpSocket>, running: &AtomicBool, received: &AtomicU64) {
    let mut batch = RecvBatch::new(32);
    while running.load(Ordering::SeqCst) {
        let mut any = false;
        for s in &sockets {
            while let Ok(n) = batch.recv(s) {
                if n == 0 {
                    break;
                }
                any = true;
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        if !any {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
