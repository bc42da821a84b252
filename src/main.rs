//! The command line: parse flags, load the configuration, run a [`switchboard::Server`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use switchboard::auth::{Claims, Grant};
use switchboard::config::{Config, LogFormat, Overrides};
use tracing_subscriber::EnvFilter;

/// SFU media server with socket.io room signaling.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Subcommand>,
    /// TOML file layered over the built-in defaults (see config/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to serve HTTP and socket.io on [default: 0.0.0.0:18080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Redis URL for a shared room registry (several nodes); omit for in-memory.
    #[arg(long)]
    redis: Option<String>,
    /// This node's name in the shared registry [default: random].
    #[arg(long)]
    node_id: Option<String>,
    /// Log line format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Address media sockets bind to and advertise [default: 127.0.0.1].
    #[arg(long)]
    media_ip: Option<std::net::IpAddr>,
    /// Public address to advertise behind a 1:1 NAT.
    #[arg(long)]
    public_ip: Option<String>,
    /// The one UDP port for all media [default: 7882; 0: any free port].
    #[arg(long)]
    udp_port: Option<u16>,
    /// Media event loops (threads) [default: one per core].
    #[arg(long)]
    media_loops: Option<usize>,
    /// Directory recordings are written to [default: recordings].
    #[arg(long)]
    record_dir: Option<std::path::PathBuf>,
    /// Bearer key of the HTTP API (/api/recordings) [default: none, the API refuses all].
    #[arg(long)]
    api_key: Option<String>,
    /// HS256 secret of access tokens [default: none; with neither it nor
    /// auth.public_key_file, anyone may join].
    #[arg(long)]
    auth_secret: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Subcommand {
    /// Load-test a server's media plane (starts one on loopback unless --url is given).
    Load(switchboard::load::LoadArgs),
    /// Print an access token (HS256) for a user in a room.
    Token(TokenArgs),
}

#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// The server's auth.secret.
    #[arg(long, env = "SWITCHBOARD_AUTH__SECRET", hide_env_values = true)]
    secret: String,
    /// The userId the token is for.
    #[arg(long)]
    user: String,
    /// The roomId it joins [default: none].
    #[arg(long)]
    room: Option<String>,
    /// What it allows, repeated or comma-separated [default: publish, subscribe, publish-data].
    #[arg(long, value_enum, value_delimiter = ',')]
    grant: Vec<GrantArg>,
    /// How long it is valid, e.g. 90s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum GrantArg {
    Publish,
    Subscribe,
    PublishData,
    Record,
    Admin,
}

impl From<GrantArg> for Grant {
    fn from(g: GrantArg) -> Grant {
        match g {
            GrantArg::Publish => Grant::Publish,
            GrantArg::Subscribe => Grant::Subscribe,
            GrantArg::PublishData => Grant::PublishData,
            GrantArg::Record => Grant::Record,
            GrantArg::Admin => Grant::Admin,
        }
    }
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.secret.is_empty(), "--secret is empty");
    let grants =
        (!args.grant.is_empty()).then(|| args.grant.into_iter().map(Grant::from).collect());
    let claims = Claims::new(&args.user, args.room.as_deref(), grants, args.ttl);
    println!("{}", switchboard::auth::mint(&args.secret, &claims)?);
    Ok(())
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormatArg {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Subcommand::Load(args)) => return load(args).await,
        Some(Subcommand::Token(args)) => return token(args),
        None => {}
    }
    let overrides = Overrides {
        listen: cli.listen,
        redis: cli.redis,
        node_id: cli.node_id,
        log_format: cli.log_format.map(|f| match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }),
        media_ip: cli.media_ip,
        public_ip: cli.public_ip,
        udp_port: cli.udp_port,
        media_loops: cli.media_loops,
        record_dir: cli.record_dir,
        api_key: cli.api_key,
        auth_secret: cli.auth_secret,
    };
    let config = Config::load(cli.config.as_deref(), &overrides)?;
    init_logging(config.server.log_format);

    // Before start-up: a SIGTERM right after "listening" must shut down gracefully, not kill;
    // one during a start-up that hangs (an unreachable Redis, say) ends the process.
    let stop = shutdown_signal()?;
    tokio::pin!(stop);
    let server = tokio::select! {
        started = switchboard::Server::start(config) => started?,
        _ = &mut stop => return Ok(()),
    };
    println!("listening on http://{}", server.local_addr());

    stop.await;
    server.shutdown().await;
    Ok(())
}

async fn load(args: switchboard::load::LoadArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let json = args.json;
    let report = switchboard::load::run(args).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        switchboard::load::print_table(&report);
    }
    Ok(())
}

/// `RUST_LOG` filters; the default keeps webrtc and socket.io internals quiet.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        // switchboard's own info; other crates' warnings only (webrtc-rs logs every
        // connection's state changes at info, and its ICE agent warns, as a controlling agent,
        // about every connection whose candidates have not arrived yet).
        .unwrap_or_else(|_| EnvFilter::new("warn,switchboard=info,rtc_ice::agent=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Installs the SIGINT/SIGTERM (Ctrl-C) handlers now; the future ends at the first signal.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

#[cfg(windows)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut ctrl_c = tokio::signal::windows::ctrl_c()?;
    Ok(async move {
        ctrl_c.recv().await;
    })
}
