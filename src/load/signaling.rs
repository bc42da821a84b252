//! A minimal socket.io v5 client over WebSocket (engine.io 4), for the integration tests and the
//! load tool. It keeps the raw JSON text of every packet, so tests can check bytes, not just values.
//! Browsers and apps use the npm `socket.io-client`; this is not meant to replace it.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// One packet from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    /// An event: `raw` is the JSON array text `["name", args...]` as received.
    Event {
        name: String,
        args: Vec<Value>,
        raw: String,
        attachments: Vec<Vec<u8>>,
    },
    /// The server answered an emit that asked for an acknowledgement.
    Ack {
        id: u64,
        args: Vec<Value>,
        raw: String,
    },
    /// The server closed this namespace connection.
    Disconnect,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("connect_error: {0}")]
    Refused(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
    #[error("connection closed")]
    Closed,
}

pub struct Client {
    out: mpsc::UnboundedSender<Message>,
    packets: mpsc::UnboundedReceiver<Packet>,
    next_ack: u64,
    /// The socket.io session id the server assigned.
    pub sid: String,
    tasks: [tokio::task::AbortHandle; 2],
}

impl Client {
    /// Connects to `http://addr` with the given handshake query (e.g. `userId=u&roomId=r`).
    pub async fn connect(addr: std::net::SocketAddr, query: &str) -> Result<Client, ClientError> {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket&{query}");
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let writer = tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                let close = matches!(m, Message::Close(_));
                if sink.send(m).await.is_err() || close {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let (tx, packets) = mpsc::unbounded_channel();
        let (handshake_tx, mut handshake_rx) = mpsc::unbounded_channel::<Result<String, String>>();
        // Weak: dropping the Client must end the writer, and with it the connection.
        let pong = out.downgrade();
        let reader = tokio::spawn(async move {
            let mut pending: Option<(Packet, usize)> = None;
            while let Some(Ok(msg)) = stream.next().await {
                match msg {
                    Message::Text(text) => {
                        let text = text.as_str();
                        match text.as_bytes().first() {
                            Some(b'2') => {
                                if let Some(out) = pong.upgrade() {
                                    let _ = out.send(Message::text("3"));
                                }
                            }
                            Some(b'4') => match parse_socketio(&text[1..]) {
                                Ok(Parsed::Connected(sid)) => {
                                    let _ = handshake_tx.send(Ok(sid));
                                }
                                Ok(Parsed::Refused(reason)) => {
                                    let _ = handshake_tx.send(Err(reason));
                                }
                                Ok(Parsed::Packet(p, 0)) => {
                                    let _ = tx.send(p);
                                }
                                Ok(Parsed::Packet(p, n)) => pending = Some((p, n)),
                                Err(_) => break,
                            },
                            _ => {}
                        }
                    }
                    Message::Binary(bytes) => {
                        if let Some((Packet::Event { attachments, .. }, n)) = &mut pending {
                            attachments.push(bytes.to_vec());
                            if attachments.len() == *n {
                                let (p, _) = pending.take().unwrap();
                                let _ = tx.send(p);
                            }
                        }
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        });
        out.send(Message::text("40"))
            .map_err(|_| ClientError::Closed)?;
        let handshake = tokio::time::timeout(Duration::from_secs(10), handshake_rx.recv())
            .await
            .map_err(|_| ClientError::Timeout)?
            .ok_or(ClientError::Closed)?;
        let sid = handshake.map_err(ClientError::Refused)?;
        Ok(Client {
            out,
            packets,
            next_ack: 0,
            sid,
            tasks: [writer.abort_handle(), reader.abort_handle()],
        })
    }

    /// Emits `event` with one JSON argument.
    pub fn emit(&self, event: &str, data: &Value) -> Result<(), ClientError> {
        self.send_raw(&format!(
            "2{}",
            Value::Array(vec![event.into(), data.clone()])
        ))
    }

    /// Emits `event` with one argument and asks for an acknowledgement; returns its id.
    pub fn emit_with_ack(&mut self, event: &str, data: &Value) -> Result<u64, ClientError> {
        let id = self.next_ack;
        self.next_ack += 1;
        self.send_raw(&format!(
            "2{id}{}",
            Value::Array(vec![event.into(), data.clone()])
        ))?;
        Ok(id)
    }

    /// Emits an event whose argument contains `{"_placeholder":true,"num":i}` for each attachment.
    pub fn emit_binary(
        &self,
        event: &str,
        data: &Value,
        attachments: &[&[u8]],
    ) -> Result<(), ClientError> {
        let head = Value::Array(vec![event.into(), data.clone()]);
        self.send_raw(&format!("5{}-{head}", attachments.len()))?;
        for a in attachments {
            self.out
                .send(Message::binary(a.to_vec()))
                .map_err(|_| ClientError::Closed)?;
        }
        Ok(())
    }

    /// Sends a socket.io packet as written (without the engine.io `4` prefix).
    pub fn send_raw(&self, packet: &str) -> Result<(), ClientError> {
        self.out
            .send(Message::text(format!("4{packet}")))
            .map_err(|_| ClientError::Closed)
    }

    /// The next packet, or an error after `wait`.
    pub async fn recv(&mut self, wait: Duration) -> Result<Packet, ClientError> {
        tokio::time::timeout(wait, self.packets.recv())
            .await
            .map_err(|_| ClientError::Timeout)?
            .ok_or(ClientError::Closed)
    }

    /// The next event named `name`, skipping others.
    pub async fn recv_event(&mut self, name: &str, wait: Duration) -> Result<Packet, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await? {
                p @ Packet::Event { .. } if p.event_name() == Some(name) => return Ok(p),
                _ => {}
            }
        }
    }

    /// The next `msg` envelope whose `type` is `kind`, skipping others.
    pub async fn recv_msg_type(
        &mut self,
        kind: &str,
        wait: Duration,
    ) -> Result<Value, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Packet::Event { args, .. } = self.recv_event("msg", left).await?
                && let Some(first) = args.into_iter().next()
                && first.get("type").and_then(Value::as_str) == Some(kind)
            {
                return Ok(first);
            }
        }
    }

    /// Asserts that nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) -> Result<(), Packet> {
        match self.recv(wait).await {
            Ok(p) => Err(p),
            Err(_) => Ok(()),
        }
    }

    /// Drops the TCP connection without a goodbye, as a crashed client or a lost network would.
    pub fn abort(self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Leaves the namespace and closes the WebSocket.
    pub fn close(self) {
        let _ = self.send_raw("1");
        let _ = self.out.send(Message::Close(None));
    }
}

impl Packet {
    pub fn event_name(&self) -> Option<&str> {
        match self {
            Packet::Event { name, .. } => Some(name),
            _ => None,
        }
    }
}

enum Parsed {
    Connected(String),
    Refused(String),
    /// A packet and how many binary attachments follow it.
    Packet(Packet, usize),
}

/// Parses a socket.io packet (the text after the engine.io `4`).
fn parse_socketio(text: &str) -> Result<Parsed, ClientError> {
    let bad = || ClientError::Protocol(format!("cannot parse packet {text:.80}"));
    let kind = text.as_bytes().first().ok_or_else(bad)?;
    let mut rest = &text[1..];
    let mut attachments = 0;
    if matches!(kind, b'5' | b'6') {
        let dash = rest.find('-').ok_or_else(bad)?;
        attachments = rest[..dash].parse().map_err(|_| bad())?;
        rest = &rest[dash + 1..];
    }
    // A namespace other than "/" would appear as "/ns,"; this client only uses "/".
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let ack_id: Option<u64> = rest[..digits].parse().ok();
    let body = &rest[digits..];
    let json = |s: &str| serde_json::from_str::<Value>(s).map_err(|_| bad());
    match kind {
        b'0' => Ok(Parsed::Connected(
            json(body)?
                .get("sid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        )),
        b'1' => Ok(Parsed::Packet(Packet::Disconnect, 0)),
        b'4' => Ok(Parsed::Refused(
            json(body)?
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        )),
        b'2' | b'5' => {
            let Value::Array(mut items) = json(body)? else {
                return Err(bad());
            };
            if items.is_empty() {
                return Err(bad());
            }
            let name = items.remove(0).as_str().ok_or_else(bad)?.to_owned();
            let packet = Packet::Event {
                name,
                args: items,
                raw: body.to_owned(),
                attachments: Vec::new(),
            };
            Ok(Parsed::Packet(packet, attachments))
        }
        b'3' | b'6' => {
            let Value::Array(args) = json(body)? else {
                return Err(bad());
            };
            let id = ack_id.ok_or_else(bad)?;
            Ok(Parsed::Packet(
                Packet::Ack {
                    id,
                    args,
                    raw: body.to_owned(),
                },
                attachments,
            ))
        }
        _ => Err(bad()),
    }
}
