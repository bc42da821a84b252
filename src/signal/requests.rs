//! What a client asks of the SFU, parsed from an event's untrusted payload before anything acts
//! on it (`call` / `offer` / `answer` / `candidate` to `sfu`, and the media events). Every
//! malformed payload is a 400 refusal that says what is wrong; nothing here panics.

use serde::Deserialize;

use super::protocol::Refusal;
use crate::sfu::api::{IceCandidate, PcKind};
use crate::sfu::forward::Quality;

/// Track ids one `subscribe` may name (each is looked up in the room on the media loop).
pub const MAX_TRACK_IDS: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum MediaRequest {
    /// Enter SFU mode.
    Call,
    /// A publisher offer.
    Offer {
        sdp: String,
    },
    /// The answer to a subscriber offer.
    Answer {
        sdp: String,
    },
    Candidate {
        pc: PcKind,
        candidate: Option<IceCandidate>,
    },
    Tracks,
    Subscribe {
        track_ids: Vec<String>,
        subscribe: bool,
    },
    SetQuality {
        track_id: String,
        quality: Quality,
    },
    Mute {
        track_id: String,
        muted: bool,
    },
    Leave,
}

#[derive(Deserialize)]
struct SdpBody {
    #[serde(rename = "type")]
    kind: String,
    sdp: String,
}

#[derive(Deserialize)]
struct SdpPayload {
    #[serde(default)]
    pc: Option<String>,
    sdp: SdpBody,
}

#[derive(Deserialize)]
struct CandidatePayload {
    #[serde(default)]
    pc: Option<String>,
    candidate: Option<IceCandidate>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscribePayload {
    track_ids: Vec<String>,
    subscribe: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QualityPayload {
    track_id: String,
    quality: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MutePayload {
    track_id: String,
    muted: bool,
}

/// The request `event` carries; an SDP over `max_sdp_bytes` is refused with 413.
pub fn parse(
    event: &str,
    payload: rmpv::Value,
    max_sdp_bytes: usize,
) -> Result<MediaRequest, Refusal> {
    Ok(match event {
        "call" => MediaRequest::Call,
        "offer" => {
            let p: SdpPayload = from(payload)?;
            sdp_size(&p.sdp.sdp, max_sdp_bytes)?;
            if pc_kind(p.pc.as_deref())? != PcKind::Publisher || p.sdp.kind != "offer" {
                return Err(Refusal::Malformed(
                    "the client offers on the publisher connection only".into(),
                ));
            }
            MediaRequest::Offer { sdp: p.sdp.sdp }
        }
        "answer" => {
            let p: SdpPayload = from(payload)?;
            sdp_size(&p.sdp.sdp, max_sdp_bytes)?;
            // Without `pc`, an answer is for the subscriber: the only connection a client answers.
            let pc =
                p.pc.as_deref()
                    .map_or(Ok(PcKind::Subscriber), |pc| pc_kind(Some(pc)))?;
            if pc != PcKind::Subscriber || p.sdp.kind != "answer" {
                return Err(Refusal::Malformed(
                    "the client answers on the subscriber connection only".into(),
                ));
            }
            MediaRequest::Answer { sdp: p.sdp.sdp }
        }
        "candidate" => {
            let p: CandidatePayload = from(payload)?;
            MediaRequest::Candidate {
                pc: pc_kind(p.pc.as_deref())?,
                candidate: p.candidate,
            }
        }
        "tracks" => MediaRequest::Tracks,
        "subscribe" => {
            let p: SubscribePayload = from(payload)?;
            if p.track_ids.len() > MAX_TRACK_IDS {
                return Err(Refusal::Malformed(format!(
                    "at most {MAX_TRACK_IDS} trackIds at once"
                )));
            }
            MediaRequest::Subscribe {
                track_ids: p.track_ids,
                subscribe: p.subscribe,
            }
        }
        "setQuality" => {
            let p: QualityPayload = from(payload)?;
            let quality = Quality::parse(&p.quality)
                .ok_or_else(|| Refusal::Malformed("quality must be low, medium or high".into()))?;
            MediaRequest::SetQuality {
                track_id: p.track_id,
                quality,
            }
        }
        "mute" => {
            let p: MutePayload = from(payload)?;
            MediaRequest::Mute {
                track_id: p.track_id,
                muted: p.muted,
            }
        }
        "leave" => MediaRequest::Leave,
        _ => return Err(Refusal::UnknownEvent),
    })
}

fn from<T: serde::de::DeserializeOwned>(payload: rmpv::Value) -> Result<T, Refusal> {
    rmpv::ext::from_value(payload).map_err(|e| Refusal::Malformed(e.to_string()))
}

/// `pc` as sent: absent means the publisher connection.
fn pc_kind(pc: Option<&str>) -> Result<PcKind, Refusal> {
    match pc {
        None | Some("publisher") => Ok(PcKind::Publisher),
        Some("subscriber") => Ok(PcKind::Subscriber),
        Some(other) => Err(Refusal::Malformed(format!(
            "pc must be \"publisher\" or \"subscriber\", not {other:?}"
        ))),
    }
}

/// An SDP over `media.max_sdp_bytes` is refused before anything parses it.
fn sdp_size(sdp: &str, max: usize) -> Result<(), Refusal> {
    if sdp.len() > max {
        return Err(Refusal::Media {
            status: 413,
            reason: format!(
                "SDP of {} bytes exceeds media.max_sdp_bytes ({max})",
                sdp.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(json: &str) -> rmpv::Value {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn reads_each_request() {
        let offer = value(r#"{"targetUid":"sfu","sdp":{"type":"offer","sdp":"v=0"}}"#);
        assert_eq!(
            parse("offer", offer, 100).unwrap(),
            MediaRequest::Offer { sdp: "v=0".into() }
        );
        let quality = value(r#"{"trackId":"t","quality":"low"}"#);
        assert_eq!(
            parse("setQuality", quality, 100).unwrap(),
            MediaRequest::SetQuality {
                track_id: "t".into(),
                quality: Quality::Low
            }
        );
        assert_eq!(
            parse("leave", rmpv::Value::Nil, 100),
            Ok(MediaRequest::Leave)
        );
    }

    #[test]
    fn refuses_what_is_malformed_saying_why() {
        let status = |event: &str, json: &str| {
            parse(event, value(json), 10)
                .map(|_| 200)
                .unwrap_or_else(|r| r.status())
        };
        assert_eq!(status("offer", r#"{"sdp":"v=0"}"#), 400);
        assert_eq!(
            status("offer", r#"{"sdp":{"type":"answer","sdp":"v=0"}}"#),
            400
        );
        assert_eq!(
            status("offer", r#"{"sdp":{"type":"offer","sdp":"v=0 and more"}}"#),
            413
        );
        assert_eq!(
            status(
                "answer",
                r#"{"pc":"sideways","sdp":{"type":"answer","sdp":""}}"#
            ),
            400
        );
        assert_eq!(status("candidate", r#"{"candidate":{"candidate":7}}"#), 400);
        assert_eq!(
            status("subscribe", r#"{"trackIds":"t","subscribe":true}"#),
            400
        );
        assert_eq!(
            status("setQuality", r#"{"trackId":"t","quality":"ultra"}"#),
            400
        );
        assert_eq!(status("mute", r#"[1,2]"#), 400);
        assert_eq!(status("dance", r#"{}"#), 400);
    }
}
