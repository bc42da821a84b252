//! The client side of a media session with `sfu` (PROTOCOL.md Part 2) for webrtc-rs peers, as
//! the load tool's members and the tests' participants both speak it: trickle the connections'
//! candidates, apply the server's answer, answer its subscriber offers, add its candidates.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use webrtc::peer_connection::{PeerConnection, RTCIceCandidateInit, RTCSessionDescription};

use super::peer::PeerEvent;
use super::signaling::{Client, Packet};
use crate::sfu::api::{IceCandidate, PcKind};

/// Events a member queues for the server: (event name, payload). `"__close"` closes.
pub type Outbox = mpsc::UnboundedSender<(String, Value)>;
pub const CLOSE: &str = "__close";

/// Relays a connection's events: its candidates go to `sfu` (trickle ICE), the others to `other`.
pub fn relay_events(
    mut events: mpsc::UnboundedReceiver<PeerEvent>,
    out: Outbox,
    pc: PcKind,
    mut other: impl FnMut(PeerEvent) + Send + 'static,
) {
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            match e {
                PeerEvent::Candidate(c) => {
                    let _ = out.send((
                        "candidate".into(),
                        json!({"targetUid": "sfu", "pc": pc, "candidate": c}),
                    ));
                }
                e => other(e),
            }
        }
    });
}

/// Runs a member's signaling until it closes: sends what is queued, and hands each event the
/// server sends (its name and first argument) to `on_event`.
pub async fn drive(
    mut client: Client,
    mut queued: mpsc::UnboundedReceiver<(String, Value)>,
    mut on_event: impl AsyncFnMut(&Client, String, Value),
) {
    loop {
        tokio::select! {
            o = queued.recv() => match o {
                Some((event, _)) if event == CLOSE => { client.close(); return; }
                Some((event, data)) => { let _ = client.emit(&event, &data); }
                None => return,
            },
            p = client.recv(Duration::from_secs(3600)) => match p {
                Ok(Packet::Event { name, args, .. }) => {
                    let first = args.into_iter().next().unwrap_or(Value::Null);
                    on_event(&client, name, first).await;
                }
                Ok(_) => {}
                Err(_) => return,
            },
        }
    }
}

/// A member's two connections, as its signaling sees them.
#[derive(Clone, Default)]
pub struct Connections {
    pub publisher: Option<Arc<dyn PeerConnection>>,
    /// Created on the server's first subscriber offer.
    pub subscriber: Arc<Mutex<Option<Arc<dyn PeerConnection>>>>,
}

/// A subscriber offer from `sfu` in an envelope: its SDP.
pub fn subscriber_offer(envelope: &Value) -> Option<&str> {
    let data = &envelope["data"];
    (envelope["type"] == "offer" && data["fromUid"] == "sfu" && data["pc"] == "subscriber")
        .then(|| data["sdp"]["sdp"].as_str())
        .flatten()
}

impl Connections {
    pub fn subscriber(&self) -> Option<Arc<dyn PeerConnection>> {
        self.subscriber
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies a `msg` envelope from `sfu`: its publisher answer, a subscriber offer (answered
    /// through `client`; `new_subscriber` makes the connection on the first one), a candidate.
    /// Other envelopes are left alone.
    pub async fn apply(
        &self,
        client: &Client,
        envelope: &Value,
        new_subscriber: impl AsyncFnOnce() -> anyhow::Result<Arc<dyn PeerConnection>>,
    ) -> anyhow::Result<()> {
        let data = &envelope["data"];
        if data["fromUid"] != "sfu" {
            return Ok(());
        }
        let sdp = || data["sdp"]["sdp"].as_str().unwrap_or("").to_owned();
        match (
            envelope["type"].as_str().unwrap_or(""),
            data["pc"].as_str().unwrap_or(""),
        ) {
            ("answer", "publisher") => {
                if let Some(pc) = &self.publisher {
                    pc.set_remote_description(RTCSessionDescription::answer(sdp())?)
                        .await?;
                }
            }
            ("offer", "subscriber") => {
                let pc = match self.subscriber() {
                    Some(pc) => pc,
                    None => {
                        let pc = new_subscriber().await?;
                        *self.subscriber.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(pc.clone());
                        pc
                    }
                };
                pc.set_remote_description(RTCSessionDescription::offer(sdp())?)
                    .await?;
                let answer = pc.create_answer(None).await?;
                pc.set_local_description(answer.clone()).await?;
                let _ = client.emit(
                    "answer",
                    &json!({"targetUid": "sfu", "pc": "subscriber", "sdp": {"type": "answer", "sdp": answer.sdp}}),
                );
            }
            // `"candidate": null` ends the candidates: nothing to do.
            ("candidate", _) if data["candidate"].is_null() => {}
            ("candidate", kind) => {
                let c: IceCandidate = serde_json::from_value(data["candidate"].clone())?;
                let pc = match kind {
                    "publisher" => self.publisher.clone(),
                    _ => self.subscriber(),
                };
                if let Some(pc) = pc {
                    pc.add_ice_candidate(RTCIceCandidateInit {
                        candidate: c.candidate,
                        sdp_mid: c.sdp_mid,
                        sdp_mline_index: c.sdp_mline_index,
                        username_fragment: c.username_fragment,
                        url: None,
                    })
                    .await?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}
