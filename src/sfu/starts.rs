//! Media-session starts per user per minute (`media.max_session_starts_per_minute`): each start
//! builds a connection and renegotiates with every member of the room, so a client looping
//! `leave` and `call` must not be able to do it without end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Users remembered before windows that are over are pruned.
const PRUNE_AT: usize = 4096;

#[derive(Debug)]
pub struct SessionStarts {
    per_minute: u32,
    /// userId -> (start of the current window, starts in it).
    windows: HashMap<String, (Instant, u32)>,
}

impl SessionStarts {
    /// `per_minute` 0: no limit.
    pub fn new(per_minute: u32) -> Self {
        SessionStarts {
            per_minute,
            windows: HashMap::new(),
        }
    }

    pub fn limit(&self) -> u32 {
        self.per_minute
    }

    /// Counts a start of `user`'s media session; `false` if it is one too many this minute.
    pub fn allow(&mut self, user: &str, now: Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        if self.windows.len() >= PRUNE_AT {
            self.windows
                .retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let window = self.windows.entry(user.to_owned()).or_insert((now, 0));
        if now.duration_since(window.0) >= WINDOW {
            *window = (now, 0);
        }
        if window.1 >= self.per_minute {
            return false;
        }
        window.1 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_holds_the_limit_then_starts_over() {
        let mut starts = SessionStarts::new(3);
        let t0 = Instant::now();
        assert!((0..3).all(|_| starts.allow("ann", t0)));
        assert!(!starts.allow("ann", t0 + Duration::from_secs(59)));
        assert!(starts.allow("bob", t0), "each user has a budget of its own");
        assert!(starts.allow("ann", t0 + WINDOW));
        assert!(SessionStarts::new(0).allow("any", t0));
    }

    #[test]
    fn memory_stays_bounded_by_recent_users() {
        let mut starts = SessionStarts::new(1);
        let t0 = Instant::now();
        for i in 0..PRUNE_AT {
            starts.allow(&format!("u{i}"), t0);
        }
        starts.allow("late", t0 + WINDOW);
        assert_eq!(starts.windows.len(), 1);
    }
}
