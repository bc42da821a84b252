//! The floor: what sending the same datagrams costs with no WebRTC at all. A bare UDP sender
//! sends, on the publishers' schedule (the same as the load run's: independent publishers whose
//! steps are spread over the step interval), each of their packets to each of that room's
//! receivers: whatever is due when it wakes goes out in one `sendmmsg`, packets to one receiver
//! as a GSO run, the best batching a forwarder woken by those arrivals could do. Its thread's CPU time per datagram is
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
#[serde(rename_all = "camelCase")]
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

/// The sender: each publisher's steps on its own schedule; what is due at a wake-up goes out in
/// one batch.
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
    // The same spread of the publishers' steps as the load run's.
    let phase = |i: usize| shape.phase(i);
    let mut steps_done = vec![0u64; publishers.len()];
    let mut carry = vec![0.0f64; publishers.len()];
    let (mut measured_from, mut cpu0, mut sent0) = (None, Duration::ZERO, 0);
    let end = start + warmup + seconds;
    loop {
        // Sleep until the earliest publisher step, then send every step due by then in one
        // batch, as a forwarder woken by arrivals would.
        let next = (0..publishers.len())
            .map(|i| start + phase(i) + step * steps_done[i] as u32)
            .min()
            .expect("at least one publisher");
        if next >= end {
            break;
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        let now = Instant::now();
        if measured_from.is_none() && now >= start + warmup {
            measured_from = Some(now);
            cpu0 = thread_cpu();
            sent0 = batch.stats.datagrams;
        }
        for (i, &(room, publisher)) in publishers.iter().enumerate() {
            while start + phase(i) + step * steps_done[i] as u32 <= now {
                steps_done[i] += 1;
                carry[i] += per_step;
                let packets = carry[i].floor() as usize;
                carry[i] -= packets as f64;
                for (k, &to) in rooms[room].iter().enumerate() {
                    // Members that publish receive everyone but themselves.
                    if shape.publishers_receive && k == publisher {
                        continue;
                    }
                    for _ in 0..packets {
                        let mut buf = batch.buffer();
                        buf.resize(datagram_bytes, 0xAB);
                        batch.push((room * 1000 + k) as u32, to, buf);
                    }
                }
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
