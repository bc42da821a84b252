//! The payload of a client event, read leniently: a handler always runs, so a malformed payload
//! gets an error envelope instead of being dropped silently (socketioxide skips a handler whose
//! `Data<T>` fails to deserialize).

use std::convert::Infallible;
use std::sync::Arc;

use socketioxide::adapter::Adapter;
use socketioxide::extract::TryData;
use socketioxide::handler::{FromMessageParts, Value};
use socketioxide::socket::Socket;

pub struct Incoming {
    /// Bytes on the wire: the JSON text plus binary attachments.
    pub size: usize,
    /// The first argument after the event name (`Nil` when there is none).
    pub payload: Result<rmpv::Value, String>,
}

impl<A: Adapter> FromMessageParts<A> for Incoming {
    type Error = Infallible;

    fn from_message_parts(
        s: &Arc<Socket<A>>,
        v: &mut Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, Infallible> {
        let size = match &*v {
            Value::Str(text, attachments) => {
                text.len() + attachments.iter().flatten().map(|b| b.len()).sum::<usize>()
            }
            Value::Bytes(bytes) => bytes.len(),
        };
        let TryData(payload) = TryData::<rmpv::Value>::from_message_parts(s, v, ack_id)?;
        let payload = match payload {
            Ok(p) => Ok(p),
            // `socket.emit("event")` with no argument: like `undefined` in the original.
            Err(_) if is_event_only(v) => Ok(rmpv::Value::Nil),
            Err(e) => Err(e.to_string()),
        };
        Ok(Incoming { size, payload })
    }
}

/// Whether the packet is `["event"]` alone (the decoder leaves the text in place).
fn is_event_only(v: &Value) -> bool {
    match v {
        Value::Str(text, _) => {
            serde_json::from_str::<Vec<serde::de::IgnoredAny>>(text).is_ok_and(|a| a.len() == 1)
        }
        Value::Bytes(_) => false,
    }
}
