//! The `outbox` binary: parse the configuration, start logging, and run the
//! chosen command. `serve` (the default) runs the reference server.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outbox::Config;
use outbox::commands::DeadLetterAction;
use outbox::config::LogFormat;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// With the `mimalloc` feature, the binary allocates with mimalloc.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// With the `jemalloc` feature (a default), the binary allocates with
/// jemalloc.
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "outbox", version, about = "In-memory API state, persisted to PostgreSQL through an outbox.")]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the reference items/circuits server (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Drive `POST /api/items` of a running server for a bounded time and
    /// report throughput, latency and persistence lag.
    Loadgen(LoadgenArgs),
    /// List, replay or discard quarantined records (dead letters).
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterCommand,
    },
}

#[derive(clap::Args)]
struct LoadgenArgs {
    /// The server to drive.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Requests per second (omit: as fast as the connections allow).
    #[arg(long)]
    rate: Option<u64>,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Ask for durable acknowledgements (`Prefer: durable`).
    #[arg(long)]
    durable: bool,
    /// Milliseconds between two samples of the server's lag (0: none).
    #[arg(long, default_value_t = 50)]
    lag_sample_ms: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Print the unresolved dead letters as JSON.
    List,
    /// Write a dead letter's record to its table (version-guarded) and
    /// resolve it; fails if the database still refuses it.
    Replay {
        /// The dead letter's id.
        id: i64,
    },
    /// Resolve a dead letter without writing it.
    Discard {
        /// The dead letter's id.
        id: i64,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One line naming the setting, not clap's multi-line usage text.
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("outbox: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    if let Err(message) = init_logging(&cli.config) {
        eprintln!("outbox: {message}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("outbox: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let shutdown = CancellationToken::new();
                tokio::spawn(forward_signals(shutdown.clone()));
                outbox::run(cli.config, shutdown).await.map_err(|e| e.to_string())
            }
            Command::Migrate => outbox::commands::migrate(&cli.config).await.map_err(|e| e.to_string()),
            Command::Loadgen(args) => loadgen(args).await,
            Command::DeadLetters { action } => {
                let action = match action {
                    DeadLetterCommand::List => DeadLetterAction::List,
                    DeadLetterCommand::Replay { id } => DeadLetterAction::Replay(id),
                    DeadLetterCommand::Discard { id } => DeadLetterAction::Discard(id),
                };
                outbox::commands::dead_letters(&cli.config, action)
                    .await
                    .map(|out| println!("{out}"))
                    .map_err(|e| e.to_string())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            error!(error = %message, "outbox failed");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) -> Result<(), String> {
    let filter = EnvFilter::try_new(&config.log_filter)
        .map_err(|e| format!("invalid value '{}' for RUST_LOG: {e}", config.log_filter))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// Cancels `shutdown` on SIGINT (Ctrl-C) or SIGTERM. Later signals are
/// logged: the shutdown in progress is already bounded by the drain deadline.
async fn forward_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        error!("cannot install signal handlers; stop the server with SIGKILL");
        return;
    };
    let mut first = true;
    loop {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        if first {
            info!(signal = name, "shutdown requested");
            shutdown.cancel();
            first = false;
        } else {
            warn!(signal = name, "already shutting down; the drain deadline (OUTBOX_DRAIN_TIMEOUT_S) bounds the wait");
        }
    }
}

async fn loadgen(args: LoadgenArgs) -> Result<(), String> {
    if args.connections == 0 || args.seconds == 0 || args.rate == Some(0) {
        return Err("loadgen: --connections, --seconds and --rate must be at least 1".into());
    }
    let config = outbox::loadgen::LoadConfig {
        target: args.target,
        rate: args.rate,
        duration: std::time::Duration::from_secs(args.seconds),
        connections: args.connections,
        durable: args.durable,
        lag_every: (args.lag_sample_ms > 0).then(|| std::time::Duration::from_millis(args.lag_sample_ms)),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let report = outbox::loadgen::run(&config).await.map_err(|e| format!("loadgen: {e}"))?;
    print!("{report}");
    if let Some(path) = args.json {
        let json = serde_json::to_string_pretty(&report).expect("a report serializes");
        std::fs::write(&path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}
