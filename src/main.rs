//! The `flywheel` command line: builds one `Config` and hands it to the library.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flywheel::Config;

/// Flywheel: serve a transformer, hot-swap adapters, learn from feedback.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the HTTP server.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML). Defaults to config/flywheel.toml when it exists.
    #[arg(long, env = "FLYWHEEL_CONFIG")]
    config: Option<PathBuf>,
    /// Address to bind.
    #[arg(long, env = "FLYWHEEL_HOST")]
    host: Option<String>,
    /// Port to bind; 0 picks a free port and logs it.
    #[arg(long, env = "FLYWHEEL_PORT")]
    port: Option<u16>,
    /// Hugging Face model directory.
    #[arg(long, env = "FLYWHEEL_MODEL")]
    model: Option<PathBuf>,
    /// Data directory (store, adapters).
    #[arg(long, env = "FLYWHEEL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Truncation length in tokens (at most 512).
    #[arg(long, env = "FLYWHEEL_MAX_LENGTH")]
    max_length: Option<usize>,
    /// HTTP worker threads.
    #[arg(long, env = "FLYWHEEL_WORKERS")]
    workers: Option<usize>,
}

const DEFAULT_CONFIG: &str = "config/flywheel.toml";

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let path = self
            .config
            .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.is_file()));
        let mut config = Config::load(path.as_deref(), std::env::vars())?;
        if let Some(v) = self.host {
            config.server.host = v;
        }
        if let Some(v) = self.port {
            config.server.port = v;
        }
        if let Some(v) = self.model {
            config.model.dir = v;
        }
        if let Some(v) = self.data_dir {
            config.data.dir = v;
        }
        if let Some(v) = self.max_length {
            config.model.max_length = v;
        }
        if let Some(v) = self.workers {
            config.server.workers = v;
        }
        config.validate()?;
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,actix_server=warn".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = args.into_config()?;
            if config.model.threads > 0 {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(config.model.threads)
                    .build_global()
                    .context("configuring the model's thread pool")?;
            }
            actix_web::rt::System::new()
                .block_on(flywheel::run(config))
                .context("flywheel serve")?;
        }
    }
    Ok(())
}
