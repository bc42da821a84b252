//! Wire types of the signaling protocol (PROTOCOL.md Part 1): the `msg` envelope, identifier
//! rules, and the typed reading of relayed payloads. Relayed payloads stay `rmpv::Value`: it keeps
//! key order and binary attachments, which `serde_json::Value` would not.

use rmpv::Value;
use serde::Serialize;

/// Every server-to-client notification: `{"type","msg","status","data"}` in this key order.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<T: Serialize> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub msg: String,
    pub status: u16,
    pub data: T,
}

impl<T: Serialize> Envelope<T> {
    pub fn ok(kind: &'static str, msg: impl Into<String>, data: T) -> Self {
        Envelope {
            kind,
            msg: msg.into(),
            status: 200,
            data,
        }
    }
}

/// `data` of the join and leave envelopes, and the value stored in `meeting-room::<roomId>`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemberInfo<'a> {
    pub user_id: &'a str,
    pub room_id: &'a str,
}

impl MemberInfo<'_> {
    /// The JSON string the original server wrote into the room hash.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("two strings always serialize")
    }
}

pub fn join_envelope<'a>(user_id: &'a str, room_id: &'a str) -> Envelope<MemberInfo<'a>> {
    Envelope::ok(
        "join",
        format!("{user_id} join then room"),
        MemberInfo { user_id, room_id },
    )
}

/// The original's text, trailing space included.
pub fn leave_envelope<'a>(user_id: &'a str, room_id: &'a str) -> Envelope<MemberInfo<'a>> {
    Envelope::ok(
        "leave",
        format!("{user_id} leave the room "),
        MemberInfo { user_id, room_id },
    )
}

pub fn replaced_envelope() -> Envelope<()> {
    Envelope {
        kind: "replaced",
        msg: "signed in elsewhere".into(),
        status: 409,
        data: (),
    }
}

/// The four events relayed to one target user, with the original's `msg` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directed {
    Call,
    Offer,
    Answer,
    Candidate,
}

impl Directed {
    pub const ALL: [Directed; 4] = [
        Directed::Call,
        Directed::Offer,
        Directed::Answer,
        Directed::Candidate,
    ];
    pub fn event(self) -> &'static str {
        match self {
            Directed::Call => "call",
            Directed::Offer => "offer",
            Directed::Answer => "answer",
            Directed::Candidate => "candidate",
        }
    }
    pub fn text(self) -> &'static str {
        match self {
            Directed::Call => "远程呼叫",
            Directed::Offer => "rtc offer",
            Directed::Answer => "rtc answer",
            Directed::Candidate => "ice candidate",
        }
    }
}

/// Why a client event was refused; becomes an error envelope to the sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("you can only act in your own room")]
    NotYourRoom { room_id: String },
    #[error("you are not in a room")]
    NoRoom,
    #[error("user {target} is not online")]
    Offline { target: String },
    /// With auth on, members reach only members of their own room.
    #[error("user {target} is not in your room")]
    OutsideYourRoom { target: String },
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("unknown event")]
    UnknownEvent,
    /// A room `msg` that looks like one of the server's own envelopes.
    #[error("a msg may not look like the server's own {kind:?} envelope")]
    Imitation { kind: String },
    /// Over the socket's event budget; `abusive`: the socket is disconnected.
    #[error("rate limited")]
    RateLimited { abusive: bool },
    /// The SFU refused: its own status and reason.
    #[error("{reason}")]
    Media { status: u16, reason: String },
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Malformed(_) | Refusal::UnknownEvent | Refusal::Imitation { .. } => 400,
            Refusal::NotYourRoom { .. } | Refusal::NoRoom | Refusal::OutsideYourRoom { .. } => 403,
            Refusal::Offline { .. } => 404,
            Refusal::TooLarge { .. } => 413,
            Refusal::RateLimited { .. } => 429,
            Refusal::Media { status, .. } => *status,
        }
    }

    /// `{"type":"error","msg":reason,"status":4xx,"data":{"event":E,...}}`.
    pub fn envelope(&self, event: &str) -> Envelope<serde_json::Value> {
        let mut data = serde_json::Map::new();
        data.insert("event".into(), event.into());
        match self {
            Refusal::NotYourRoom { room_id } => {
                data.insert("roomId".into(), room_id.as_str().into());
            }
            Refusal::Offline { target } | Refusal::OutsideYourRoom { target } => {
                data.insert("targetUid".into(), target.as_str().into());
            }
            Refusal::TooLarge { size, limit } => {
                data.insert("size".into(), (*size).into());
                data.insert("limit".into(), (*limit).into());
            }
            _ => {}
        }
        Envelope {
            kind: "error",
            msg: self.to_string(),
            status: self.status(),
            data: serde_json::Value::Object(data),
        }
    }
}

/// The `type`s of the envelopes the server sends as `msg`: a member's room message may not
/// carry one, or it could pass itself off as the server (a forged `offer` from `sfu`, say).
pub const SERVER_TYPES: [&str; 14] = [
    "join",
    "leave",
    "call",
    "offer",
    "answer",
    "candidate",
    "error",
    "replaced",
    "trackPublished",
    "trackUnpublished",
    "trackMuted",
    "mediaEnded",
    "recordingStarted",
    "recordingStopped",
];

/// The server envelope type a payload imitates, if it does.
pub fn imitated_type(payload: &Value) -> Option<&str> {
    let kind = map_get(payload, "type")?.as_str()?;
    SERVER_TYPES.contains(&kind).then_some(kind)
}

/// Longest userId or roomId, in bytes of UTF-8.
pub const MAX_ID_BYTES: usize = 128;

/// The userId the SFU uses as a room member; no client may take it.
pub const SFU_USER_ID: &str = "sfu";

/// Checks a userId or roomId: 1 to 128 bytes, no control characters.
pub fn validate_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!("{what} is longer than {MAX_ID_BYTES} bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("{what} contains control characters"));
    }
    Ok(())
}

fn map_get<'v>(payload: &'v Value, key: &str) -> Option<&'v Value> {
    payload
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// Reads a required string field of an object payload.
pub fn required_str<'v>(payload: &'v Value, key: &str) -> Result<&'v str, Refusal> {
    if !payload.is_map() {
        return Err(Refusal::Malformed("expected an object".into()));
    }
    match map_get(payload, key) {
        Some(v) => v
            .as_str()
            .ok_or_else(|| Refusal::Malformed(format!("{key} must be a string"))),
        None => Err(Refusal::Malformed(format!("missing {key}"))),
    }
}

/// Sets `fromUid` as the last key of an object payload, replacing any value the client put there,
/// so a receiver always knows who really sent it.
pub fn stamp_sender(payload: &mut Value, user_id: &str) {
    if let Value::Map(entries) = payload {
        entries.retain(|(k, _)| k.as_str() != Some("fromUid"));
        entries.push((Value::from("fromUid"), Value::from(user_id)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(v: &impl Serialize) -> String {
        serde_json::to_string(v).unwrap()
    }

    #[test]
    fn envelopes_have_the_original_strings_and_key_order() {
        assert_eq!(
            json(&join_envelope("U", "R")),
            r#"{"type":"join","msg":"U join then room","status":200,"data":{"userId":"U","roomId":"R"}}"#
        );
        assert_eq!(
            json(&leave_envelope("U", "R")),
            r#"{"type":"leave","msg":"U leave the room ","status":200,"data":{"userId":"U","roomId":"R"}}"#
        );
        assert_eq!(
            json(&replaced_envelope()),
            r#"{"type":"replaced","msg":"signed in elsewhere","status":409,"data":null}"#
        );
        assert_eq!(
            MemberInfo {
                user_id: "a\"b",
                room_id: "中"
            }
            .to_json(),
            r#"{"userId":"a\"b","roomId":"中"}"#
        );
    }

    #[test]
    fn error_envelopes_carry_status_and_event() {
        let e = Refusal::Offline {
            target: "bob".into(),
        }
        .envelope("call");
        assert_eq!(
            json(&e),
            r#"{"type":"error","msg":"user bob is not online","status":404,"data":{"event":"call","targetUid":"bob"}}"#
        );
        assert_eq!(Refusal::Malformed("x".into()).status(), 400);
        assert_eq!(
            Refusal::NotYourRoom {
                room_id: "r".into()
            }
            .status(),
            403
        );
        assert_eq!(Refusal::TooLarge { size: 2, limit: 1 }.status(), 413);
    }

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("userId", "alice").is_ok());
        assert!(validate_id("userId", &"é".repeat(64)).is_ok()); // 128 bytes
        assert!(validate_id("userId", &"é".repeat(65)).is_err());
        assert!(validate_id("userId", "").is_err());
        assert!(validate_id("userId", "a\nb").is_err());
        assert!(validate_id("userId", "a\u{7f}").is_err());
    }

    #[test]
    fn sender_is_stamped_last_and_cannot_be_forged() {
        let mut p = Value::Map(vec![
            (Value::from("fromUid"), Value::from("mallory")),
            (Value::from("targetUid"), Value::from("bob")),
            (Value::from("x"), Value::from(1)),
        ]);
        stamp_sender(&mut p, "alice");
        assert_eq!(json(&p), r#"{"targetUid":"bob","x":1,"fromUid":"alice"}"#);
    }

    #[test]
    fn required_fields_are_typed() {
        let p = Value::Map(vec![(Value::from("targetUid"), Value::from(5))]);
        assert_eq!(
            required_str(&p, "targetUid"),
            Err(Refusal::Malformed("targetUid must be a string".into()))
        );
        assert!(required_str(&Value::from("s"), "targetUid").is_err());
        assert_eq!(
            required_str(&Value::Map(vec![]), "targetUid"),
            Err(Refusal::Malformed("missing targetUid".into()))
        );
    }
}
