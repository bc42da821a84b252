//! CPU time and memory of processes and threads, from the kernel (Linux).

use std::time::Duration;

/// CPU time (user + system) of the calling thread.
pub fn thread_cpu() -> Duration {
    // SAFETY: clock_gettime writes one timespec.
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time (user + system, all threads) of process `pid`; `None` if it cannot be read. In
/// nanoseconds from the scheduler's per-thread accounting where available (the tick-based
/// figure moves in 10 ms steps, coarse for a server that uses a few percent of a core).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    scheduler_runtime(pid).or_else(|| ticks_cpu(pid))
}

/// The sum of the threads' `sum_exec_runtime` (`/proc/PID/task/*/schedstat`, nanoseconds).
fn scheduler_runtime(pid: u32) -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread that just ended has no file any more: skip it.
        let Ok(s) = std::fs::read_to_string(path) else {
            continue;
        };
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

fn ticks_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) are in parentheses' wake.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Resident memory of process `pid` in kB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_and_thread_use_some_cpu() {
        let t0 = thread_cpu();
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu() > t0);
        let me = std::process::id();
        let (a, b) = (scheduler_runtime(me).unwrap(), ticks_cpu(me).unwrap());
        // The same quantity by two clocks: within a few ticks of each other.
        assert!(a.abs_diff(b) < Duration::from_millis(200), "{a:?} vs {b:?}");
        assert!(rss_kb(std::process::id()).unwrap() > 0);
        assert!(process_cpu(u32::MAX).is_none());
    }
}
