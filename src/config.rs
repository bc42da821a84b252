//! Typed configuration: embedded `config/default.toml`, an optional file, `SWITCHBOARD_*`
//! environment variables, then command-line overrides, in that order of precedence.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The defaults, compiled in so that the binary needs no files next to it.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub signal: SignalConfig,
    pub redis: RedisConfig,
    pub media: MediaConfig,
    pub recording: RecordingConfig,
    pub webhook: WebhookConfig,
    pub api: ApiConfig,
    pub auth: AuthConfig,
    pub cluster: ClusterConfig,
}

/// Rooms across nodes (docs/CLUSTER.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterConfig {
    /// The address other nodes send this node's relayed media to (a private network); empty:
    /// the media address.
    pub relay_ip: String,
}

impl ClusterConfig {
    pub fn relay_ip(&self) -> Result<Option<std::net::IpAddr>, String> {
        match self.relay_ip.trim() {
            "" => Ok(None),
            ip => ip
                .parse()
                .map(Some)
                .map_err(|_| format!("cluster.relay_ip must be an IP address, got {ip:?}")),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuthConfig {
    /// HS256 secret; empty: none.
    pub secret: String,
    /// PEM public key (RSA or Ed25519) of a service minting tokens; empty: none.
    pub public_key_file: std::path::PathBuf,
}

impl AuthConfig {
    /// The token verifier, `None` when auth is off.
    pub fn verifier(&self) -> Result<Option<crate::auth::Verifier>, crate::auth::AuthError> {
        let pem = if self.public_key_file.as_os_str().is_empty() {
            None
        } else {
            Some(std::fs::read(&self.public_key_file).map_err(|e| {
                crate::auth::AuthError::Config(format!(
                    "auth.public_key_file {}: {e}",
                    self.public_key_file.display()
                ))
            })?)
        };
        crate::auth::Verifier::new(self.secret.trim(), pem.as_deref())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiConfig {
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub node_id: String,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SignalConfig {
    pub max_message_bytes: usize,
    pub max_room_members: usize,
    pub max_rooms_per_node: usize,
    pub events_per_second: f64,
    pub event_burst: u32,
    pub disconnect_after_refused: u32,
    pub bytes_per_second: usize,
    pub bytes_burst: usize,
    pub max_transport_bytes: u64,
    pub max_buffer_packets: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RedisConfig {
    pub url: String,
    pub heartbeat_ms: u64,
    pub node_ttl_ms: u64,
    pub command_timeout_ms: u64,
    pub bus_queue_bytes: usize,
}

impl RedisConfig {
    /// The Redis URL, or `None` for the in-memory registry.
    pub fn url(&self) -> Option<&str> {
        Some(self.url.trim()).filter(|u| !u.is_empty())
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn node_ttl(&self) -> Duration {
        Duration::from_millis(self.node_ttl_ms)
    }
    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MediaConfig {
    pub ip: std::net::IpAddr,
    pub public_ip: String,
    pub udp_port: u16,
    pub loops: usize,
    pub ice_servers: Vec<IceServer>,
    pub ice_disconnected_ms: u64,
    pub ice_failed_ms: u64,
    pub data_channel_buffer_bytes: usize,
    pub max_tracks_per_member: usize,
    pub max_data_channels_per_member: usize,
    pub max_session_starts_per_minute: u32,
    pub max_sdp_bytes: usize,
    pub max_data_message_bytes: u32,
}

impl MediaConfig {
    /// The 1:1 NAT address to advertise, if any.
    pub fn public_ip(&self) -> Option<&str> {
        Some(self.public_ip.trim()).filter(|s| !s.is_empty())
    }

    /// The address to advertise in candidates instead of `ip`, if one is set.
    pub fn advertised_ip(&self) -> Option<std::net::IpAddr> {
        self.public_ip().and_then(|ip| ip.parse().ok())
    }

    /// Media event loops: `loops`, or one per core when 0.
    pub fn loops(&self) -> usize {
        match self.loops {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebhookConfig {
    pub urls: Vec<String>,
    pub secret: String,
    pub queue: usize,
    pub attempts: u32,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordingConfig {
    pub dir: std::path::PathBuf,
    pub rooms: Vec<String>,
    pub mode: RecordingMode,
    pub queue_packets: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RecordingMode {
    Tracks,
    Participants,
    Both,
}

impl RecordingConfig {
    /// Whether `room` matches one of `rooms` (a name, or a pattern where `*` is any characters).
    pub fn records(&self, room: &str) -> bool {
        self.rooms
            .iter()
            .any(|pattern| matches_pattern(pattern, room))
    }
}

/// `*` matches any run of characters (including none); everything else matches itself.
fn matches_pattern(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no '*': the whole name
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A STUN or TURN server for clients, in the browser's `RTCIceServer` form.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub redis: Option<String>,
    pub node_id: Option<String>,
    pub log_format: Option<LogFormat>,
    pub media_ip: Option<std::net::IpAddr>,
    pub public_ip: Option<String>,
    pub udp_port: Option<u16>,
    pub media_loops: Option<usize>,
    pub record_dir: Option<std::path::PathBuf>,
    pub api_key: Option<String>,
    pub auth_secret: Option<String>,
}

impl Config {
    /// The compiled-in defaults alone (what tests start from).
    pub fn defaults() -> Self {
        Figment::from(Toml::string(DEFAULT_TOML))
            .extract()
            .expect("config/default.toml is valid")
    }

    /// Defaults, then `file`, then the environment, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, Box<figment::Error>> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            if !file.exists() {
                return Err(Box::new(figment::Error::from(format!(
                    "config file {} does not exist",
                    file.display()
                ))));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Env::prefixed("SWITCHBOARD_").split("__"));
        let o = overrides;
        if let Some(v) = &o.listen {
            figment = figment.merge(Serialized::default("server.listen", v));
        }
        if let Some(v) = &o.redis {
            figment = figment.merge(Serialized::default("redis.url", v));
        }
        if let Some(v) = &o.node_id {
            figment = figment.merge(Serialized::default("server.node_id", v));
        }
        if let Some(v) = &o.log_format {
            figment = figment.merge(Serialized::default("server.log_format", v));
        }
        if let Some(v) = &o.media_ip {
            figment = figment.merge(Serialized::default("media.ip", v));
        }
        if let Some(v) = &o.public_ip {
            figment = figment.merge(Serialized::default("media.public_ip", v));
        }
        if let Some(v) = &o.udp_port {
            figment = figment.merge(Serialized::default("media.udp_port", v));
        }
        if let Some(v) = &o.media_loops {
            figment = figment.merge(Serialized::default("media.loops", v));
        }
        if let Some(v) = &o.auth_secret {
            figment = figment.merge(Serialized::default("auth.secret", v));
        }
        if let Some(v) = &o.api_key {
            figment = figment.merge(Serialized::default("api.key", v));
        }
        if let Some(v) = &o.record_dir {
            figment = figment.merge(Serialized::default("recording.dir", v));
        }
        let config: Config = figment.extract().map_err(Box::new)?;
        if let Err(e) = config.cluster.relay_ip() {
            return Err(Box::new(figment::Error::from(e)));
        }
        if !config.media.public_ip.trim().is_empty() && config.media.advertised_ip().is_none() {
            return Err(Box::new(figment::Error::from(format!(
                "media.public_ip must be an IP address, got {:?}",
                config.media.public_ip
            ))));
        }
        Ok(config)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::defaults();
        assert_eq!(
            c.server.listen,
            "0.0.0.0:18080".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.signal.max_message_bytes, 1_000_000);
        assert_eq!(c.redis.url(), None);
        assert_eq!(c.server.log_format, LogFormat::Text);
        assert_eq!(c.media.ip.to_string(), "127.0.0.1");
        assert_eq!((c.media.public_ip(), c.media.udp_port), (None, 7882));
        assert_eq!(c.media.loops, 0);
        assert!(c.media.loops() >= 1);
        assert!(c.media.ice_servers.is_empty());
        assert_eq!(c.media.data_channel_buffer_bytes, 16 << 20);
        assert!(c.recording.rooms.is_empty(), "nothing recorded by default");
        assert_eq!(c.recording.mode, RecordingMode::Tracks);
        assert!(c.webhook.urls.is_empty(), "no webhooks by default");
    }

    #[test]
    fn media_flags_and_ice_servers() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "m.toml",
                "[media]\nice_servers = [{ urls = [\"turn:t.example:3478\"], username = \"u\", credential = \"p\" }]\n",
            )?;
            let cli = Overrides {
                media_ip: Some("10.1.2.3".parse().unwrap()),
                public_ip: Some("203.0.113.7".into()),
                udp_port: Some(40000),
                media_loops: Some(3),
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("m.toml")), &cli).map_err(|e| *e)?;
            assert_eq!(c.media.ip.to_string(), "10.1.2.3");
            assert_eq!(c.media.public_ip(), Some("203.0.113.7"));
            assert_eq!((c.media.udp_port, c.media.loops()), (40000, 3));
            assert_eq!(c.media.ice_servers[0].urls, ["turn:t.example:3478"]);
            let bad = Overrides {
                public_ip: Some("not-an-ip".into()),
                ..Default::default()
            };
            assert!(
                Config::load(None, &bad)
                    .unwrap_err()
                    .to_string()
                    .contains("public_ip")
            );
            Ok(())
        });
    }

    #[test]
    fn file_env_and_cli_layer_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "sb.toml",
                "[server]\nnode_id = \"from-file\"\nlisten = \"127.0.0.1:1000\"\n[redis]\nurl = \"redis://file/\"\n",
            )?;
            jail.set_env("SWITCHBOARD_SERVER__NODE_ID", "from-env");
            jail.set_env("SWITCHBOARD_SIGNAL__MAX_MESSAGE_BYTES", "42");
            let cli = Overrides {
                redis: Some("redis://cli/".into()),
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("sb.toml")), &cli).map_err(|e| *e)?;
            assert_eq!(
                c.server.listen,
                "127.0.0.1:1000".parse::<SocketAddr>().unwrap()
            );
            assert_eq!(c.server.node_id, "from-env");
            assert_eq!(c.signal.max_message_bytes, 42);
            assert_eq!(c.redis.url(), Some("redis://cli/"));
            Ok(())
        });
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let err = Config::load(
            Some(Path::new("/nonexistent/sb.toml")),
            &Overrides::default(),
        );
        assert!(err.unwrap_err().to_string().contains("does not exist"));
    }

    #[test]
    fn a_bad_value_names_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SWITCHBOARD_SERVER__LOG_FORMAT", "xml");
            let err = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(
                err.to_string().to_lowercase().contains("log_format"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn room_patterns_match_names_and_wildcards() {
        let config = |rooms: &[&str]| RecordingConfig {
            dir: "r".into(),
            rooms: rooms.iter().map(|r| r.to_string()).collect(),
            mode: RecordingMode::Tracks,
            queue_packets: 1,
        };
        let all = config(&["*"]);
        assert!(all.records("a") && all.records(""));
        let some = config(&["board-*", "town-hall", "*-rec-*"]);
        for yes in ["board-", "board-7", "town-hall", "x-rec-y", "-rec-"] {
            assert!(some.records(yes), "{yes}");
        }
        for no in ["board", "town-hall2", "xtown-hall", "x-rec", "boar-d"] {
            assert!(!some.records(no), "{no}");
        }
        assert!(!config(&[]).records("a"));
        assert!(config(&["a*b*c"]).records("abc") && !config(&["a*b*c"]).records("acb"));
    }
}
