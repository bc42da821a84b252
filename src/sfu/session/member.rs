//! One member's two peer connections: the publisher (client offers) and the subscriber (server
//! offers), trickle ICE both ways, and the subscriber's negotiation, serialized and coalesced.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rtc::peer_connection::configuration::RTCOfferOptions;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, warn};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::peer_connection::{PeerConnection, RTCIceCandidateInit, RTCSessionDescription};
use webrtc::rtp_transceiver::RtpSender;

use super::peer::{advertise_ip, advertise_ip_in_sdp};
use super::track::TrackCommand;
use crate::sfu::api::{IceCandidate, PcKind, SfuError, SfuEvent};
use crate::sfu::forward::{DownTrackConfig, DownTrackId, Quality};

/// An offer waits until no change came for this long (changes close together make one offer)...
pub const COALESCE: Duration = Duration::from_millis(50);
/// ...but never longer than this after the first change.
pub const COALESCE_MAX: Duration = Duration::from_millis(300);
/// An offer without an answer for this long is given up (the next change offers again).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// A subscriber offer that could not be made is tried again this often, this many times.
const OFFER_RETRY_DELAY: Duration = Duration::from_secs(1);
const OFFER_RETRIES: u32 = 3;

/// One forwarded track on this member's subscriber connection.
#[derive(Clone)]
pub struct DownEntry {
    pub owner: String,
    pub track_id: String,
    pub down_id: DownTrackId,
    /// The config the down-track was added with; each answer re-derives its payload type and
    /// extension ids from it (the layer choice is the forwarder's, see `set_quality`).
    pub config: DownTrackConfig,
    pub sender: Arc<dyn RtpSender>,
    pub local: Arc<TrackLocalStaticRTP>,
    pub commands: mpsc::UnboundedSender<TrackCommand>,
    pub mime: String,
    /// The publisher's header-extension ids by URI, for the forwarded extensions.
    pub publisher_ext_ids: Vec<(String, u8)>,
    /// The task relaying this subscriber's keyframe requests.
    pub keyframe_relay: tokio::task::AbortHandle,
}

/// Candidates wait here until the description they belong to has been sent.
#[derive(Default)]
struct CandidateGate {
    open: bool,
    held: Vec<Option<IceCandidate>>,
}

/// Remote candidates wait here until a remote description is set.
#[derive(Default)]
struct RemoteCandidates {
    ready: bool,
    held: Vec<RTCIceCandidateInit>,
    /// Candidates accepted on this connection so far (held or given to the ICE agent).
    accepted: usize,
}

/// A browser gathers a handful of candidates per connection; the limits keep a client from
/// growing server memory or making the server send checks to an arbitrary number of addresses.
const MAX_REMOTE_CANDIDATES: usize = 64;
const MAX_CANDIDATE_LEN: usize = 1024;

pub struct Leg {
    pub pc: Arc<dyn PeerConnection>,
    gate: Mutex<CandidateGate>,
    remote: tokio::sync::Mutex<RemoteCandidates>,
    /// Serializes the client's offers on this connection.
    pub offers: tokio::sync::Mutex<()>,
}

impl Leg {
    pub fn new(pc: Arc<dyn PeerConnection>) -> Leg {
        Leg {
            pc,
            gate: Mutex::new(CandidateGate::default()),
            remote: tokio::sync::Mutex::new(RemoteCandidates::default()),
            offers: tokio::sync::Mutex::new(()),
        }
    }
}

pub struct Member {
    pub user_id: String,
    pub room_id: String,
    /// The signaling connection this media session belongs to.
    pub session: String,
    pub publisher: tokio::sync::Mutex<Option<Arc<Leg>>>,
    pub subscriber: Arc<Leg>,
    events: mpsc::UnboundedSender<SfuEvent>,
    public_ip: Option<String>,
    /// Serializes the subscriber's offers with the answers applied to them.
    pub sub_ops: tokio::sync::Mutex<()>,
    /// Serializes adding and removing tracks and channels on the subscriber connection. Not
    /// `sub_ops`: creating a channel can wait on the connection, which needs the answer applied.
    pub track_ops: tokio::sync::Mutex<()>,
    pub downs: Mutex<Vec<DownEntry>>,
    /// Tracks (owner, track id) this member said it does not want.
    pub unsubscribed: Mutex<HashSet<(String, String)>>,
    pub quality: Mutex<HashMap<(String, String), Quality>>,
    pub has_channels: AtomicBool,
    /// The client's latest publisher offer (extension ids and simulcast rids of its tracks).
    pub publisher_sdp: Mutex<String>,
    negotiate: Notify,
    /// Subscriber answers in a row that failed after webrtc had applied them (see
    /// subscriber_answer).
    failed_answers: std::sync::atomic::AtomicU32,
    answered: Notify,
    pub closed: AtomicBool,
    /// Ends the tasks that watch this member's connections (they hold the member, and the
    /// connections hold their event channels: without it they would keep each other alive).
    pub ended: tokio_util::sync::CancellationToken,
}

impl Member {
    pub fn new(
        user_id: &str,
        room_id: &str,
        session: &str,
        subscriber: Arc<dyn PeerConnection>,
        events: mpsc::UnboundedSender<SfuEvent>,
        public_ip: Option<String>,
    ) -> Member {
        Member {
            user_id: user_id.to_owned(),
            room_id: room_id.to_owned(),
            session: session.to_owned(),
            publisher: tokio::sync::Mutex::new(None),
            subscriber: Arc::new(Leg::new(subscriber)),
            events,
            public_ip,
            sub_ops: tokio::sync::Mutex::new(()),
            track_ops: tokio::sync::Mutex::new(()),
            downs: Mutex::new(Vec::new()),
            unsubscribed: Mutex::new(HashSet::new()),
            quality: Mutex::new(HashMap::new()),
            has_channels: AtomicBool::new(false),
            publisher_sdp: Mutex::new(String::new()),
            negotiate: Notify::new(),
            failed_answers: Default::default(),
            answered: Notify::new(),
            closed: AtomicBool::new(false),
            ended: tokio_util::sync::CancellationToken::new(),
        }
    }

    pub fn wants(&self, owner: &str, track_id: &str) -> bool {
        owner != self.user_id
            && !self
                .unsubscribed
                .lock()
                .unwrap()
                .contains(&(owner.to_owned(), track_id.to_owned()))
    }

    pub fn has_down(&self, owner: &str, track_id: &str) -> bool {
        self.downs
            .lock()
            .unwrap()
            .iter()
            .any(|d| d.owner == owner && d.track_id == track_id)
    }

    /// Asks for a subscriber (re-)negotiation; several requests close together make one offer.
    pub fn renegotiate(&self) {
        self.negotiate.notify_one();
    }

    fn sdp_for_client(&self, sdp: String) -> String {
        match &self.public_ip {
            Some(ip) => advertise_ip_in_sdp(&sdp, ip),
            None => sdp,
        }
    }

    fn emit_sdp(&self, pc: PcKind, sdp_type: &'static str, sdp: String) {
        // A subscriber offer carries no candidates: they are trickled after the answer.
        let sdp = match pc {
            PcKind::Subscriber => without_candidates(&sdp),
            PcKind::Publisher => self.sdp_for_client(sdp),
        };
        let _ = self.events.send(SfuEvent::Sdp {
            user_id: self.user_id.clone(),
            session: self.session.clone(),
            pc,
            sdp_type,
            sdp,
        });
    }

    /// Sends a local candidate now, or once the description it belongs to has gone out.
    pub fn local_candidate(&self, leg: &Leg, kind: PcKind, candidate: Option<IceCandidate>) {
        let candidate = candidate.map(|mut c| {
            if let Some(ip) = &self.public_ip {
                c.candidate = advertise_ip(&c.candidate, ip);
            }
            c
        });
        let mut gate = leg.gate.lock().unwrap();
        if gate.open {
            self.emit_candidate(kind, candidate);
        } else {
            gate.held.push(candidate);
        }
    }

    fn emit_candidate(&self, pc: PcKind, candidate: Option<IceCandidate>) {
        let _ = self.events.send(SfuEvent::Candidate {
            user_id: self.user_id.clone(),
            session: self.session.clone(),
            pc,
            candidate,
        });
    }

    fn open_gate(&self, leg: &Leg, kind: PcKind) {
        let held = {
            let mut gate = leg.gate.lock().unwrap();
            gate.open = true;
            std::mem::take(&mut gate.held)
        };
        for c in held {
            self.emit_candidate(kind, c);
        }
    }

    /// A candidate from the client; held until the connection has a remote description.
    pub async fn remote_candidate(
        leg: &Leg,
        candidate: Option<IceCandidate>,
    ) -> Result<(), SfuError> {
        let Some(c) = candidate else { return Ok(()) }; // end of candidates: nothing to do
        debug!(candidate = %c.candidate, mid = ?c.sdp_mid, index = ?c.sdp_mline_index, "remote candidate");
        let init = RTCIceCandidateInit {
            candidate: c.candidate,
            sdp_mid: c.sdp_mid,
            sdp_mline_index: c.sdp_mline_index,
            username_fragment: c.username_fragment,
            url: None,
        };
        if init.candidate.len() > MAX_CANDIDATE_LEN {
            return Err(SfuError::BadCandidate(format!(
                "longer than {MAX_CANDIDATE_LEN} bytes"
            )));
        }
        let mut remote = leg.remote.lock().await;
        if remote.accepted >= MAX_REMOTE_CANDIDATES {
            return Err(SfuError::BadCandidate(format!(
                "more than {MAX_REMOTE_CANDIDATES} on one connection"
            )));
        }
        remote.accepted += 1;
        if !remote.ready {
            remote.held.push(init);
            return Ok(());
        }
        leg.pc
            .add_ice_candidate(init)
            .await
            .map_err(|e| SfuError::BadCandidate(e.to_string()))
    }

    async fn remote_description_set(leg: &Leg) {
        let mut remote = leg.remote.lock().await;
        remote.ready = true;
        for init in std::mem::take(&mut remote.held) {
            if let Err(e) = leg.pc.add_ice_candidate(init).await {
                debug!("dropping a bad early candidate: {e}");
            }
        }
    }

    /// The client's publisher offer: apply it and send the answer. An offer that fails part-way
    /// is rolled back (webrtc has already entered have-remote-offer by then), so the client's
    /// next offer is not refused.
    pub async fn publisher_offer(&self, leg: &Leg, sdp: String) -> Result<(), SfuError> {
        let result = self.answer_publisher_offer(leg, sdp).await;
        if result.is_err()
            && leg.pc.pending_remote_description().await.is_some()
            && let Ok(rollback) = RTCSessionDescription::rollback(None)
        {
            if let Err(e) = leg.pc.set_remote_description(rollback).await {
                warn!(user = %self.user_id, "cannot roll back a failed offer: {e}");
            } else if leg.pc.current_remote_description().await.is_none() {
                // Back to no remote description at all: hold candidates again until one.
                leg.remote.lock().await.ready = false;
            }
        }
        result
    }

    async fn answer_publisher_offer(&self, leg: &Leg, sdp: String) -> Result<(), SfuError> {
        let offer =
            RTCSessionDescription::offer(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        leg.pc
            .set_remote_description(offer)
            .await
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;
        Self::remote_description_set(leg).await;
        let answer = leg
            .pc
            .create_answer(None)
            .await
            .map_err(|e| SfuError::Internal(e.to_string()))?;
        leg.pc
            .set_local_description(answer)
            .await
            .map_err(|e| SfuError::Internal(e.to_string()))?;
        let local = leg
            .pc
            .local_description()
            .await
            .ok_or_else(|| SfuError::Internal("no local description".into()))?;
        self.emit_sdp(PcKind::Publisher, "answer", local.sdp);
        self.open_gate(leg, PcKind::Publisher);
        Ok(())
    }

    /// The client's answer to the subscriber offer; learns each down-track's payload type and
    /// extension ids from what was negotiated.
    pub async fn subscriber_answer(&self, sdp: String) -> Result<(), SfuError> {
        let answer =
            RTCSessionDescription::answer(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        {
            let _ops = self.sub_ops.lock().await;
            let pc = &self.subscriber.pc;
            let had_offer = pc.pending_local_description().await.is_some();
            if let Err(e) = pc.set_remote_description(answer).await {
                if had_offer && pc.pending_local_description().await.is_none() {
                    // webrtc took the answer as far as `stable` before failing: this offer is
                    // done but its down-tracks are not configured, so make a new one (a few
                    // times: a client whose answers always fail must not loop forever).
                    self.answered.notify_one();
                    if self.failed_answers.fetch_add(1, Ordering::SeqCst) < OFFER_RETRIES {
                        self.renegotiate();
                    }
                }
                return Err(SfuError::BadSdp(e.to_string()));
            }
            self.failed_answers.store(0, Ordering::SeqCst);
        }
        Self::remote_description_set(&self.subscriber).await;
        // Now that the server knows the client's ICE credentials, let the client have the
        // server's candidates: a browser checks as soon as it has one, and webrtc's ICE agent
        // drops checks that arrive before the answer, so earlier checks would be wasted.
        self.open_gate(&self.subscriber, PcKind::Subscriber);
        debug!(user = %self.user_id, "subscriber answer applied");
        self.configure_downs().await;
        debug!(user = %self.user_id, "down-tracks configured");
        self.answered.notify_one();
        Ok(())
    }

    async fn configure_downs(&self) {
        // Clone what is needed: the std lock cannot be held across the awaits below.
        let entries: Vec<DownEntry> = self
            .downs
            .lock()
            .unwrap()
            .iter()
            .map(DownEntry::clone)
            .collect();
        for entry in entries {
            let Ok(params) = entry.sender.get_parameters().await else {
                continue;
            };
            let rtp = &params.rtp_parameters;
            let mut config = entry.config.clone();
            config.payload_type = rtp
                .codecs
                .iter()
                .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(&entry.mime))
                .map(|c| c.payload_type);
            config.ext_map = Default::default();
            for ext in &rtp.header_extensions {
                if let Some((_, publisher_id)) = entry
                    .publisher_ext_ids
                    .iter()
                    .find(|(uri, _)| *uri == ext.uri)
                {
                    config.ext_map.insert(*publisher_id, ext.id as u8);
                }
            }
            if config.payload_type.is_none() {
                debug!(user = %self.user_id, mime = %entry.mime, "subscriber did not accept the codec: track not sent");
            }
            let _ = entry.commands.send(TrackCommand::Configure(config));
        }
    }

    /// The subscriber's negotiation loop: one offer at a time, changes coalesced.
    pub async fn negotiate_loop(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            self.negotiate.notified().await;
            let deadline = tokio::time::Instant::now() + COALESCE_MAX;
            loop {
                let quiet = tokio::time::sleep(COALESCE);
                tokio::select! {
                    _ = quiet => break,
                    _ = self.negotiate.notified() => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let offered = {
                let _ops = self.sub_ops.lock().await;
                self.offer_subscriber().await
            };
            match offered {
                Ok(()) => {
                    failures = 0;
                    if tokio::time::timeout(ANSWER_TIMEOUT, self.answer_applied())
                        .await
                        .is_err()
                    {
                        warn!(user = %self.user_id, "no answer to the subscriber offer");
                    }
                }
                Err(e) => {
                    warn!(user = %self.user_id, "subscriber offer failed: {e}");
                    // The change is still to be offered: try again a few times.
                    failures += 1;
                    if failures <= OFFER_RETRIES {
                        tokio::time::sleep(OFFER_RETRY_DELAY).await;
                        self.renegotiate();
                    } else {
                        failures = 0; // given up on this change; the next one tries afresh
                    }
                }
            }
        }
    }

    /// Until the outstanding subscriber offer has its answer (the connection is `stable` again),
    /// or the member is gone. The state decides, not the notification alone: a late answer to an
    /// offer that timed out leaves a stored notification behind.
    async fn answer_applied(&self) {
        loop {
            self.answered.notified().await;
            if self.closed.load(Ordering::SeqCst)
                || self
                    .subscriber
                    .pc
                    .pending_local_description()
                    .await
                    .is_none()
            {
                return;
            }
        }
    }

    async fn offer_subscriber(&self) -> Result<(), SfuError> {
        let pc = &self.subscriber.pc;
        let internal = |e: webrtc::error::Error| SfuError::Internal(e.to_string());
        let offer = pc
            .create_offer(None::<RTCOfferOptions>)
            .await
            .map_err(internal)?;
        pc.set_local_description(offer).await.map_err(internal)?;
        let local = pc
            .local_description()
            .await
            .ok_or_else(|| SfuError::Internal("no local description".into()))?;
        debug!(user = %self.user_id, "subscriber offer");
        self.emit_sdp(PcKind::Subscriber, "offer", local.sdp);
        // The subscriber's candidates go out only once its answer is applied (see below).
        Ok(())
    }

    /// Closes both connections; every poll loop on them then ends.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.ended.cancel();
        self.negotiate.notify_one();
        self.answered.notify_one();
        if let Some(leg) = self.publisher.lock().await.take() {
            let _ = leg.pc.close().await;
            debug!(user = %self.user_id, "peer connection closed");
        }
        let _ = self.subscriber.pc.close().await;
        debug!(user = %self.user_id, "peer connection closed");
    }
}

/// The SDP without its `a=candidate` and `a=end-of-candidates` lines.
fn without_candidates(sdp: &str) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let attr = line.trim_end();
        if attr.starts_with("a=candidate:") || attr == "a=end-of-candidates" {
            continue;
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::without_candidates;

    #[test]
    fn candidates_are_removed_from_an_offer() {
        let sdp = "v=0\r\nm=audio 9 UDP 111\r\na=mid:0\r\na=candidate:1 1 udp 1 127.0.0.1 5000 typ host\r\na=end-of-candidates\r\na=sendrecv\r\n";
        assert_eq!(
            without_candidates(sdp),
            "v=0\r\nm=audio 9 UDP 111\r\na=mid:0\r\na=sendrecv\r\n"
        );
    }
}
