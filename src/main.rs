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
    /// Train jobs from the shared queue (`[store] backend = "postgres"`) without serving the API; answers
    /// only /health, /ready and /metrics. Takes `serve`'s flags. Starts no canaries (it serves no traffic to
    /// compare arms on): start rollouts on a serving replica.
    Worker(ServeArgs),
    /// Train a classifier offline from labelled JSONL (`{"text", "label"}` per line), with a progress bar.
    Train(TrainArgs),
    /// Move a single process's state (feedback, tasks, generations, aliases, jobs, finished rollouts) into
    /// PostgreSQL for several replicas: run it once, with the server stopped, under the replicas'
    /// configuration (`[store] backend = "postgres"`). Takes `serve`'s flags. See docs/SCALING.md.
    Migrate(MigrateArgs),
    /// Print the OpenAPI 3.1 document the server answers at `/openapi.json`.
    Openapi,
    /// Check the encoder and a LoRA step on a device against the CPU (f32 and bf16) and time them, on random
    /// weights with the default model's shapes; `scripts/gpu-check.sh` runs it beside PyTorch.
    DeviceCheck(DeviceCheckArgs),
}

#[derive(clap::Args)]
struct DeviceCheckArgs {
    /// The device to check: cpu, cuda or cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Inference timing shape, BATCHxTOKENS.
    #[arg(long, default_value = "32x128", value_parser = batch_shape)]
    infer: (usize, usize),
    /// LoRA training step timing shape, BATCHxTOKENS.
    #[arg(long, default_value = "64x128", value_parser = batch_shape)]
    train: (usize, usize),
    /// Parity shape, BATCHxTOKENS (the CPU computes it too).
    #[arg(long, default_value = "4x64", value_parser = batch_shape)]
    parity: (usize, usize),
    /// Least seconds of repeats per inference timing.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Timed training steps (after two warm-up steps).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Parses `BATCHxTOKENS`, e.g. `32x128`.
fn batch_shape(text: &str) -> Result<(usize, usize), String> {
    let parse = |part: Option<&str>| {
        part.and_then(|p| p.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    let mut parts = text.split(['x', '×']);
    match (parse(parts.next()), parse(parts.next()), parts.next()) {
        (Some(batch), Some(tokens), None) if tokens <= 512 => Ok((batch, tokens)),
        _ => Err(format!(
            "{text:?} is not BATCHxTOKENS with 1 to 512 tokens, e.g. 32x128"
        )),
    }
}

impl DeviceCheckArgs {
    fn run(self) -> anyhow::Result<()> {
        use flywheel::device_check::{self, CheckOptions};
        let report = device_check::run(&CheckOptions {
            device: self.device.clone(),
            infer: self.infer,
            train: self.train,
            parity: self.parity,
            seconds: self.seconds,
            steps: self.steps.max(1),
        })
        .with_context(|| format!("checking device {}", self.device))?;
        for p in &report.parity {
            println!(
                "{} {:<4} {:<70} {:.2e} (≤ {:.0e})",
                if p.pass { "ok  " } else { "FAIL" },
                p.precision,
                p.check,
                p.relative_error,
                p.tolerance
            );
        }
        for t in &report.timings {
            println!(
                "time {:<4} {:<10} {:<9} {:>3} × {:<4} {:>9.2} ms (median of {})",
                t.precision, t.what, t.path, t.batch, t.length, t.median_ms, t.repeats
            );
        }
        for e in &report.errors {
            println!("FAIL {e}");
        }
        if let Some(path) = &self.json {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        anyhow::ensure!(report.passed(), "a check failed or did not run");
        Ok(())
    }
}

/// `flywheel train --method`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    /// LoRA; writes a PEFT adapter directory.
    Lora,
    /// Full fine-tuning; writes a BertForSequenceClassification checkpoint.
    Full,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Task name (recorded in the output's metadata).
    #[arg(long)]
    task: String,
    /// Labelled JSONL to train and validate on; repeat for several files.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Held-out labelled JSONL scored after training; repeat for several files.
    #[arg(long)]
    test: Vec<PathBuf>,
    /// What trains and what is written.
    #[arg(long, value_enum, default_value_t = MethodArg::Lora)]
    method: MethodArg,
    /// Output directory (must not exist); defaults to out/<method>-<unix time>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Label order, comma-separated; defaults to the data's labels, sorted.
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Hyperparameter overrides as a JSON object, e.g. '{"epochs": 3, "max_length": 64}'.
    #[arg(long, default_value = "{}")]
    params: String,
    /// Hugging Face model directory.
    #[arg(
        long,
        env = "FLYWHEEL_MODEL__DIR",
        default_value = "models/all-MiniLM-L6-v2"
    )]
    model: PathBuf,
    /// Threads to train with (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where to train: cpu, cuda, cuda:N (a build with the `cuda` feature) or auto.
    #[arg(long, env = "FLYWHEEL_TRAINER__DEVICE", default_value = "cpu")]
    device: String,
}

impl TrainArgs {
    fn run(self) -> anyhow::Result<()> {
        use flywheel::trainer::offline;
        use flywheel::trainer::train::Method;
        let method = match self.method {
            MethodArg::Lora => Method::Lora,
            MethodArg::Full => Method::Full,
        };
        let config = offline::parse_params(&self.params, method)?;
        let device = flywheel::model::parse_device(&self.device)
            .with_context(|| format!("--device {}", self.device))?;
        if self.threads > 0 {
            limit_candle_threads(self.threads);
            rayon::ThreadPoolBuilder::new()
                .num_threads(self.threads)
                .build_global()
                .context("configuring the training thread pool")?;
        }
        let model = flywheel::model::Model::load(
            &self.model,
            &flywheel::model::LoadOptions {
                max_length: config.max_length,
                device: flywheel::model::parse_device("cpu")?,
                ..Default::default()
            },
        )
        .with_context(|| format!("loading {}", self.model.display()))?;
        let out = self.out.unwrap_or_else(|| offline::default_out(method));
        let job = offline::OfflineJob {
            task: self.task.clone(),
            data: self.data,
            test: self.test,
            labels: self.labels,
            config,
            out: out.clone(),
            model_dir: self.model,
            device,
        };
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} steps, ETA {eta} {msg}",
            )
            .context("progress bar template")?
            .progress_chars("=> "),
        );
        let report = offline::run(&model, &job, &mut |p| {
            bar.set_length(p.total_steps as u64);
            bar.set_position(p.step as u64);
            let val = p
                .val
                .as_ref()
                .map(|v| format!(", val macro-F1 {:.4}", v.macro_f1))
                .unwrap_or_default();
            let norm = p
                .grad_norm
                .map(|n| format!(" grad norm {n:.3}"))
                .unwrap_or_default();
            bar.set_message(format!(
                "epoch {} loss {:.4}{norm}{val} ({:.1} ex/s)",
                p.epoch, p.train_loss, p.examples_per_second
            ));
        })
        .with_context(|| format!("training task {}", self.task))?;
        bar.finish();
        println!("{}", serde_json::to_string_pretty(&report)?);
        eprintln!("wrote {}", out.display());
        Ok(())
    }
}

#[derive(clap::Args)]
struct MigrateArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Where the single process kept its generations' files, when not in the data directory's `adapters/`.
    /// They are copied to where the replicas' configuration keeps them (`[data] adapters_dir`) when that
    /// is elsewhere.
    #[arg(long)]
    from_adapters: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML). Defaults to config/flywheel.toml when it exists.
    #[arg(long, env = "FLYWHEEL_CONFIG")]
    config: Option<PathBuf>,
    /// Address to bind (`[server] host`, `FLYWHEEL_SERVER__HOST`).
    #[arg(long)]
    host: Option<String>,
    /// Port to bind; 0 picks a free port and logs it (`[server] port`, `FLYWHEEL_SERVER__PORT`).
    #[arg(long)]
    port: Option<u16>,
    /// Hugging Face model directory (`[model] dir`, `FLYWHEEL_MODEL__DIR`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Data directory: store, adapters (`[data] dir`, `FLYWHEEL_DATA__DIR`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Truncation length in tokens, at most 512 (`[model] max_length`, `FLYWHEEL_MODEL__MAX_LENGTH`).
    #[arg(long)]
    max_length: Option<usize>,
    /// Serve without training (`[trainer] enabled = false`): a serving replica beside a training one.
    #[arg(long)]
    no_trainer: bool,
    /// HTTP worker threads (`[server] workers`, `FLYWHEEL_SERVER__WORKERS`).
    #[arg(long)]
    workers: Option<usize>,
}

const DEFAULT_CONFIG: &str = "config/flywheel.toml";

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let path = self
            .config
            .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.is_file()));
        let mut config = Config::load(path.as_deref(), std::env::vars())?;
        for name in flywheel::config::unread_variables(std::env::vars()) {
            tracing::warn!(
                variable = %name,
                "ignored: Flywheel reads no such variable (settings are FLYWHEEL_<SECTION>__<FIELD>, two underscores)"
            );
        }
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
        if self.no_trainer {
            config.trainer.enabled = false;
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
            start_runtime(&config)?;
            actix_web::rt::System::new()
                .block_on(flywheel::run(config))
                .context("flywheel serve")?;
        }
        Command::Worker(args) => {
            // Its canaries are stored in PostgreSQL, where the serving replicas route them.
            let config = args.into_config()?;
            anyhow::ensure!(
                config.store.backend == flywheel::config::StoreBackend::Postgres,
                "flywheel worker takes its jobs from the shared queue: set [store] backend = \"postgres\" \
                 (FLYWHEEL_STORE__BACKEND) and the URL (docs/SCALING.md)"
            );
            anyhow::ensure!(
                config.trainer.enabled,
                "flywheel worker trains: drop --no-trainer ([trainer] enabled = false)"
            );
            start_runtime(&config)?;
            actix_web::rt::System::new()
                .block_on(flywheel::run_worker(config))
                .context("flywheel worker")?;
        }
        Command::Train(args) => args.run()?,
        Command::Migrate(args) => {
            let config = args.serve.into_config()?;
            let migrated = flywheel::migrate::to_postgres(&config, args.from_adapters.as_deref())
                .with_context(|| {
                format!(
                    "migrating {} into PostgreSQL (nothing was written to the database)",
                    config.data.dir.display()
                )
            })?;
            println!("{}", serde_json::to_string_pretty(&migrated)?);
        }
        Command::DeviceCheck(args) => args.run()?,
        Command::Openapi => {
            use flywheel::http::openapi::ApiDoc;
            use utoipa::OpenApi;
            println!("{}", ApiDoc::openapi().to_pretty_json()?);
        }
    }
    Ok(())
}

/// What `serve` and `worker` share: the heap policy, and thread pools (candle's for the trainer, rayon's for
/// the model).
fn start_runtime(config: &Config) -> anyhow::Result<()> {
    flywheel::heap::keep_freed_memory();
    limit_candle_threads(config.trainer.threads);
    if config.model.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(config.model.threads)
            .build_global()
            .context("configuring the model's thread pool")?;
    }
    Ok(())
}

/// Candle fans large elementwise ops out to a pool of its own, sized once from `CANDLE_NUM_THREADS`. Only
/// training runs candle ops here, so unless the operator sized it, that pool gets the training thread share:
/// otherwise a one-thread trainer would still take every core for those ops. Called before other threads
/// start, so nothing reads the environment meanwhile.
fn limit_candle_threads(threads: usize) {
    if threads > 0 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
}
