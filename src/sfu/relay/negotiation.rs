//! When a member's subscriber connection is offered again: one offer at a time, changes that
//! come close together make one offer, and an offer nobody answers is given up.

use std::time::{Duration, Instant};

/// An offer waits until no change came for this long (changes close together make one offer)...
pub const COALESCE: Duration = Duration::from_millis(50);
/// ...but never longer than this after the first change.
pub const COALESCE_MAX: Duration = Duration::from_millis(300);
/// An offer without an answer for this long is given up (pending changes are offered again).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// A subscriber offer that could not be made is tried again this often, this many times.
pub const OFFER_RETRY_DELAY: Duration = Duration::from_secs(1);
pub const OFFER_RETRIES: u32 = 3;

#[derive(Debug, Default)]
pub struct Negotiation {
    /// The first and the latest change not offered yet.
    first_change: Option<Instant>,
    last_change: Option<Instant>,
    /// An offer is out; given up at this instant.
    awaiting_until: Option<Instant>,
    retry_at: Option<Instant>,
    offer_failures: u32,
    /// Answers in a row that failed after webrtc had applied them.
    pub failed_answers: u32,
}

impl Negotiation {
    /// The set of tracks or channels changed.
    pub fn changed(&mut self, now: Instant) {
        self.first_change.get_or_insert(now);
        self.last_change = Some(now);
    }

    /// When something is due: the answer timeout, or the coalesced offer.
    pub fn deadline(&self) -> Option<Instant> {
        if let Some(t) = self.awaiting_until {
            return Some(t);
        }
        let (first, last) = (self.first_change?, self.last_change?);
        let at = (last + COALESCE).min(first + COALESCE_MAX);
        Some(self.retry_at.map_or(at, |r| at.max(r)))
    }

    /// Whether an offer is to be made now. An unanswered offer past its timeout is given up.
    pub fn offer_due(&mut self, now: Instant) -> bool {
        if let Some(until) = self.awaiting_until {
            if now < until {
                return false;
            }
            tracing::warn!("no answer to the subscriber offer; offering again if needed");
            self.awaiting_until = None;
        }
        self.deadline().is_some_and(|at| at <= now)
    }

    pub fn awaiting_answer(&self) -> bool {
        self.awaiting_until.is_some()
    }

    pub fn offered(&mut self, now: Instant) {
        self.first_change = None;
        self.last_change = None;
        self.retry_at = None;
        self.offer_failures = 0;
        self.awaiting_until = Some(now + ANSWER_TIMEOUT);
    }

    /// The offer could not be made: the change stays pending and is tried again a few times,
    /// then given up (the next change tries afresh).
    pub fn offer_failed(&mut self, now: Instant) {
        self.offer_failures += 1;
        if self.offer_failures <= OFFER_RETRIES {
            self.retry_at = Some(now + OFFER_RETRY_DELAY);
        } else {
            *self = Negotiation {
                failed_answers: self.failed_answers,
                ..Default::default()
            };
        }
    }

    /// The outstanding offer is settled (answered, or done with).
    pub fn answered(&mut self) {
        self.awaiting_until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_close_together_make_one_offer() {
        let t0 = Instant::now();
        let mut n = Negotiation::default();
        assert!(!n.offer_due(t0));
        n.changed(t0);
        n.changed(t0 + Duration::from_millis(30));
        assert!(!n.offer_due(t0 + Duration::from_millis(60)));
        assert_eq!(n.deadline(), Some(t0 + Duration::from_millis(80)));
        assert!(n.offer_due(t0 + Duration::from_millis(80)));
        n.offered(t0 + Duration::from_millis(80));
        // While the offer is out, a change waits for the answer.
        n.changed(t0 + Duration::from_millis(100));
        assert!(!n.offer_due(t0 + Duration::from_millis(500)));
        n.answered();
        assert!(n.offer_due(t0 + Duration::from_millis(500)));
    }

    #[test]
    fn a_steady_stream_of_changes_is_offered_after_the_cap() {
        let t0 = Instant::now();
        let mut n = Negotiation::default();
        for ms in (0..400).step_by(20) {
            n.changed(t0 + Duration::from_millis(ms));
        }
        assert_eq!(n.deadline(), Some(t0 + COALESCE_MAX));
    }

    #[test]
    fn an_unanswered_offer_is_given_up_and_a_failed_one_retried() {
        let t0 = Instant::now();
        let mut n = Negotiation::default();
        n.changed(t0);
        n.offered(t0);
        n.changed(t0);
        assert!(!n.offer_due(t0 + ANSWER_TIMEOUT - Duration::from_millis(1)));
        assert!(n.offer_due(t0 + ANSWER_TIMEOUT));
        n.offer_failed(t0 + ANSWER_TIMEOUT);
        let retry = t0 + ANSWER_TIMEOUT + OFFER_RETRY_DELAY;
        assert!(!n.offer_due(retry - Duration::from_millis(1)));
        assert!(n.offer_due(retry));
        for _ in 0..OFFER_RETRIES {
            n.offer_failed(retry);
        }
        assert_eq!(n.deadline(), None, "given up after {OFFER_RETRIES} retries");
    }
}
