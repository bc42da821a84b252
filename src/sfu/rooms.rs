//! Which event loop each room's media lives on, and each member's media session: placement at
//! a room's first join (the loop with the fewest members), found again by user. A room's
//! first and last media member here are announced to the other nodes from here, under the
//! directory's lock, so that a room closing and opening again (perhaps on another loop) is
//! announced in that order.

use std::collections::HashMap;
use std::sync::Arc;

use super::pipes::Pipes;
use crate::cluster::MediaEvent;

/// A member's media session as the node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The signaling connection it belongs to.
    pub session: String,
    pub room: String,
    pub loop_index: usize,
}

#[derive(Debug)]
pub struct Directory {
    sessions: HashMap<String, Session>,
    /// Room -> (its loop, its members with media sessions).
    rooms: HashMap<String, (usize, usize)>,
    members_per_loop: Vec<usize>,
    /// Where rooms opening and closing here are announced (none in unit tests).
    pipes: Option<Arc<Pipes>>,
}

impl Directory {
    pub fn new(loops: usize, pipes: Option<Arc<Pipes>>) -> Directory {
        Directory {
            sessions: HashMap::new(),
            rooms: HashMap::new(),
            members_per_loop: vec![0; loops.max(1)],
            pipes,
        }
    }

    /// The rooms with media members here.
    pub fn rooms(&self) -> impl Iterator<Item = &String> {
        self.rooms.keys()
    }

    /// Asks the other nodes for their state of `room` (they answer with `RoomState`).
    pub fn announce_open(&self, room: &str) {
        if let Some(pipes) = self.pipes.as_ref().filter(|p| p.clustered()) {
            pipes.publish(MediaEvent::RoomOpen {
                room: room.to_owned(),
                node: pipes.me.clone(),
                relay: pipes.relay,
            });
        }
    }

    pub fn get(&self, user: &str) -> Option<&Session> {
        self.sessions.get(user)
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The loop of `room` (placed now if it has no member yet).
    pub fn loop_of_room(&self, room: &str) -> Option<usize> {
        self.rooms.get(room).map(|(l, _)| *l)
    }

    /// Records a new session of `user` in `room`; returns it. The caller has removed any older
    /// session of the user first.
    pub fn insert(&mut self, user: &str, room: &str, session: &str) -> Session {
        let least_loaded = (0..self.members_per_loop.len())
            .min_by_key(|&l| self.members_per_loop[l])
            .unwrap_or(0);
        if !self.rooms.contains_key(room) {
            self.announce_open(room);
        }
        let entry = self
            .rooms
            .entry(room.to_owned())
            .or_insert((least_loaded, 0));
        entry.1 += 1;
        let loop_index = entry.0;
        self.members_per_loop[loop_index] += 1;
        let s = Session {
            session: session.to_owned(),
            room: room.to_owned(),
            loop_index,
        };
        self.sessions.insert(user.to_owned(), s.clone());
        s
    }

    /// Removes the user's session if it is `session`.
    pub fn remove(&mut self, user: &str, session: &str) -> Option<Session> {
        if self.sessions.get(user)?.session != session {
            return None;
        }
        let s = self.sessions.remove(user)?;
        self.members_per_loop[s.loop_index] -= 1;
        if let Some(entry) = self.rooms.get_mut(&s.room) {
            entry.1 -= 1;
            if entry.1 == 0 {
                self.rooms.remove(&s.room);
                if let Some(pipes) = self.pipes.as_ref().filter(|p| p.clustered()) {
                    pipes.publish(MediaEvent::RoomClosed {
                        room: s.room.clone(),
                        node: pipes.me.clone(),
                    });
                }
            }
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_stays_on_one_loop_and_rooms_spread_over_loops() {
        let mut d = Directory::new(2, None);
        let a = d.insert("a", "R1", "s-a");
        let b = d.insert("b", "R1", "s-b");
        assert_eq!(a.loop_index, b.loop_index);
        let c = d.insert("c", "R2", "s-c");
        assert_ne!(
            c.loop_index, a.loop_index,
            "the emptier loop takes the new room"
        );
        assert_eq!(d.len(), 3);
        // Only the current session is removed.
        assert_eq!(d.remove("a", "old"), None);
        assert!(d.remove("a", "s-a").is_some());
        d.remove("b", "s-b");
        assert_eq!(d.loop_of_room("R1"), None, "an empty room is forgotten");
        assert_eq!(d.loop_of_room("R2"), Some(c.loop_index));
    }
}
