//! The signaling budgets of one socket, token buckets: events, and bytes of the messages it
//! sends. An event over either is refused with a 429 envelope; a client that keeps sending
//! refused events is disconnected.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::config::SignalConfig;

/// The budget every socket gets (from `[signal]`).
#[derive(Debug, Clone, Copy)]
pub struct EventBudget {
    /// Events per second, sustained; 0: no limit.
    pub per_second: f64,
    /// Events at once.
    pub burst: f64,
    /// Refused events in a row after which the socket is disconnected.
    pub disconnect_after: u32,
}

impl EventBudget {
    pub fn from_config(c: &SignalConfig) -> Self {
        EventBudget {
            per_second: c.events_per_second,
            burst: c.event_burst.max(1) as f64,
            disconnect_after: c.disconnect_after_refused,
        }
    }

    /// The bytes budget: `signal.bytes_per_second`, with a burst that holds at least one
    /// message of the largest size allowed.
    pub fn bytes_from_config(c: &SignalConfig) -> Self {
        EventBudget {
            per_second: c.bytes_per_second as f64,
            burst: c.bytes_burst.max(c.max_message_bytes) as f64,
            disconnect_after: c.disconnect_after_refused,
        }
    }
}

/// Refusals so far, by kind (`/healthz` `refused`): each limit reached is counted.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Error envelopes by status: 400 malformed, 403 forbidden, 404 offline, 409 media
    /// conflicts and per-member limits, 413 too large, 429 over a budget.
    pub malformed: AtomicU64,
    pub forbidden: AtomicU64,
    pub not_found: AtomicU64,
    pub conflict: AtomicU64,
    pub too_large: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Handshakes refused: a token, a full room, a node at its room limit.
    pub handshakes: AtomicU64,
}

impl Refusals {
    pub fn count(&self, status: u16) {
        let counter = match status {
            403 | 401 => &self.forbidden,
            404 => &self.not_found,
            409 => &self.conflict,
            413 => &self.too_large,
            429 => &self.rate_limited,
            _ => &self.malformed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Over the budget; `abusive`: refused too often in a row, disconnect.
    Refused {
        abusive: bool,
    },
}

#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    last: Option<Instant>,
    refused_in_a_row: u32,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            tokens: f64::INFINITY, // full: capped to the burst on first use
            last: None,
            refused_in_a_row: 0,
        }
    }
}

impl Bucket {
    /// Spends `cost` tokens (one event, or its bytes) at `now`.
    pub fn take(&mut self, budget: &EventBudget, cost: f64, now: Instant) -> Verdict {
        if budget.per_second <= 0.0 {
            return Verdict::Accepted;
        }
        let refill = self.last.map_or(0.0, |last| {
            now.saturating_duration_since(last).as_secs_f64()
        }) * budget.per_second;
        self.tokens = (self.tokens + refill).min(budget.burst);
        self.last = Some(now);
        if self.tokens >= cost {
            self.tokens -= cost;
            self.refused_in_a_row = 0;
            return Verdict::Accepted;
        }
        self.refused_in_a_row = self.refused_in_a_row.saturating_add(1);
        Verdict::Refused {
            abusive: budget.disconnect_after > 0
                && self.refused_in_a_row >= budget.disconnect_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate_then_a_disconnect() {
        let budget = EventBudget {
            per_second: 10.0,
            burst: 5.0,
            disconnect_after: 3,
        };
        let mut b = Bucket::default();
        let t = Instant::now();
        for _ in 0..5 {
            assert_eq!(b.take(&budget, 1.0, t), Verdict::Accepted);
        }
        assert_eq!(b.take(&budget, 1.0, t), Verdict::Refused { abusive: false });
        // 100 ms later one more token.
        let later = t + Duration::from_millis(100);
        assert_eq!(b.take(&budget, 1.0, later), Verdict::Accepted);
        assert_eq!(
            b.take(&budget, 1.0, later),
            Verdict::Refused { abusive: false }
        );
        assert_eq!(
            b.take(&budget, 1.0, later),
            Verdict::Refused { abusive: false }
        );
        assert_eq!(
            b.take(&budget, 1.0, later),
            Verdict::Refused { abusive: true }
        );
        // A pause refills the burst, never more.
        let much_later = later + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(b.take(&budget, 1.0, much_later), Verdict::Accepted);
        }
        assert_eq!(
            b.take(&budget, 1.0, much_later),
            Verdict::Refused { abusive: false }
        );
        let unlimited = EventBudget {
            per_second: 0.0,
            ..budget
        };
        assert_eq!(b.take(&unlimited, 1.0, much_later), Verdict::Accepted);
    }
}
