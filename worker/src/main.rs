//! The `cohort-worker` binary: parses flags, installs logging and runs the pretraining worker
//! loop (`pretrain`) or the federated client loop (`federated`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use cohort_worker::client::{self, ClientConfig, ClientTls, RetryPolicy};
use cohort_worker::device::{device_name, DeviceRequest};
use cohort_worker::federated::{self, EnrollmentToken, FederatedConfig};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "cohort-worker",
    version,
    about = "Cohort's worker: pretraining on leased shards, or a federated client site"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join a coordinator and train on the shards it leases until the job is done.
    Pretrain(PretrainArgs),
    /// Join a federated job with the site's enrollment token (or, under mutual TLS, its
    /// enrolled client certificate) and fine-tune on the site's own text (DIR/train.txt,
    /// DIR/test.txt); only the clipped (and noised) update is sent.
    Federated(FederatedArgs),
    /// Print Cohort's own logits for some tokens as JSON (`[[f32; vocab]; tokens]`), from
    /// checkpoint files: the reference an exported model is checked against. A developer
    /// tool (tests/tests/hf_export.rs), hidden and without COHORT_* variables: nothing
    /// deploys it.
    #[command(hide = true)]
    Logits(LogitsArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModelArg {
    Tiny,
    Gpt2Small,
}

#[derive(clap::Args, Debug)]
struct LogitsArgs {
    #[arg(long, value_enum)]
    model: ModelArg,
    /// The model's parameters (a Cohort checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// LoRA adapters (a Cohort checkpoint of `lora_specs`); the rank is read from the file.
    #[arg(long, requires = "lora_alpha")]
    lora_adapters: Option<PathBuf>,
    #[arg(long, requires = "lora_adapters")]
    lora_alpha: Option<f64>,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<i64>,
}

fn print_logits(args: LogitsArgs) -> anyhow::Result<()> {
    use cohort_worker::logits::{logits, AdapterFile};
    let model = match args.model {
        ModelArg::Tiny => cohort_core::model::ModelConfig::tiny_byte_level(),
        ModelArg::Gpt2Small => cohort_core::model::ModelConfig::gpt2_small(),
    };
    let adapters = args
        .lora_adapters
        .zip(args.lora_alpha)
        .map(|(path, alpha)| AdapterFile { path, alpha });
    let rows = logits(&model, &args.checkpoint, adapters.as_ref(), &args.tokens)?;
    let json: Vec<String> = rows
        .iter()
        .map(|row| {
            // `{:?}` of an f32 is its shortest round-trip decimal.
            let cells: Vec<String> = row.iter().map(|v| format!("{v:?}")).collect();
            format!("[{}]", cells.join(","))
        })
        .collect();
    println!("[{}]", json.join(","));
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// TLS to the coordinator, for an https:// coordinator URL.
#[derive(clap::Args, Debug)]
struct TlsArgs {
    /// PEM CA certificates that signed the coordinator's certificate (default: the
    /// system's trusted roots).
    #[arg(long, value_name = "PEM", env = "COHORT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a coordinator that requires one (mutual TLS). Its
    /// variable is not the coordinator's COHORT_TLS_CERT, so both can share an environment.
    #[arg(
        long,
        value_name = "PEM",
        env = "COHORT_WORKER_TLS_CERT",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        value_name = "PEM",
        env = "COHORT_WORKER_TLS_KEY",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    fn client_tls(&self) -> ClientTls {
        ClientTls {
            ca: self.tls_ca.clone(),
            identity: self.tls_cert.clone().zip(self.tls_key.clone()),
        }
    }
}

#[derive(clap::Args, Debug)]
struct PretrainArgs {
    /// Coordinator address, e.g. http://127.0.0.1:50051 (https:// for TLS).
    #[arg(long, env = "COHORT_COORDINATOR")]
    coordinator: String,
    /// Directory holding the token shards named by the coordinator.
    #[arg(long, env = "COHORT_DATA_DIR")]
    data_dir: PathBuf,
    /// auto, cpu, cuda or cuda:N. Asking for CUDA without CUDA is an error.
    #[arg(long, env = "COHORT_DEVICE", default_value = "auto")]
    device: DeviceRequest,
    /// libtorch intra-op threads.
    #[arg(long, env = "COHORT_THREADS", default_value_t = 1)]
    threads: usize,
    /// Where the inner optimizer state is saved after each round and loaded at start
    /// (one directory per worker).
    #[arg(long, env = "COHORT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Log line format; filter with RUST_LOG (default info).
    #[arg(long, env = "COHORT_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Attempts per coordinator call before giving up on transient failures
    /// (backoff 200 ms doubling to 5 s; the default waits about a minute).
    #[arg(long, env = "COHORT_RETRY_ATTEMPTS", default_value_t = RetryPolicy::default().max_attempts)]
    retry_attempts: u32,
    /// Export tracing spans (rounds, evals) to this OpenTelemetry collector over
    /// OTLP/gRPC, as service.name cohort-worker, e.g. http://127.0.0.1:4317; off
    /// when unset. An unreachable collector only costs a warning.
    #[arg(long, value_name = "URL", env = "COHORT_OTLP_ENDPOINT", value_parser = cohort_telemetry::parse_endpoint)]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(clap::Args, Debug)]
struct FederatedArgs {
    /// Coordinator address, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "COHORT_COORDINATOR")]
    coordinator: String,
    /// Directory holding the site's train.txt and test.txt (UTF-8); they never leave it.
    #[arg(long, value_name = "DIR", env = "COHORT_DATA_DIR", alias = "data-dir")]
    data: PathBuf,
    /// The site's enrollment token (prefer --token-file or COHORT_TOKEN: command lines
    /// are visible to other users). Optional with --tls-cert when the site is enrolled by
    /// its certificate's name (mutual TLS).
    #[arg(
        long,
        env = "COHORT_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the enrollment token (surrounding whitespace is ignored).
    #[arg(long, value_name = "PATH", env = "COHORT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N. Asking for CUDA without CUDA is an error.
    #[arg(long, env = "COHORT_DEVICE", default_value = "auto")]
    device: DeviceRequest,
    /// libtorch intra-op threads.
    #[arg(long, env = "COHORT_THREADS", default_value_t = 1)]
    threads: usize,
    /// Log line format; filter with RUST_LOG (default info).
    #[arg(long, env = "COHORT_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Attempts per coordinator call before giving up on transient failures
    /// (backoff 200 ms doubling to 5 s; the default waits about a minute).
    #[arg(long, env = "COHORT_RETRY_ATTEMPTS", default_value_t = RetryPolicy::default().max_attempts)]
    retry_attempts: u32,
    /// Export tracing spans (rounds, evals) to this OpenTelemetry collector over
    /// OTLP/gRPC, as service.name cohort-worker, e.g. http://127.0.0.1:4317; off
    /// when unset. An unreachable collector only costs a warning.
    #[arg(long, value_name = "URL", env = "COHORT_OTLP_ENDPOINT", value_parser = cohort_telemetry::parse_endpoint)]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Log lines on stderr and, with --otlp-endpoint, spans to an OTLP collector;
/// the returned handle flushes them at the end of `main`.
fn init_tracing(format: LogFormat, otlp_endpoint: Option<&str>) -> cohort_telemetry::Telemetry {
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer: cohort_telemetry::LogLayer = match format {
        LogFormat::Text => Box::new(layer),
        LogFormat::Json => Box::new(layer.json()),
    };
    cohort_telemetry::install(
        "cohort-worker",
        env!("CARGO_PKG_VERSION"),
        otlp_endpoint,
        layer,
    )
}

async fn pretrain(args: PretrainArgs) -> anyhow::Result<()> {
    let device = args
        .device
        .resolve()
        .with_context(|| format!("cannot use --device {}", args.device))?;
    if !args.data_dir.is_dir() {
        bail!("--data-dir {} is not a directory", args.data_dir.display());
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let config = ClientConfig {
        coordinator: args.coordinator.clone(),
        tls: args.tls.client_tls(),
        data_dir: args.data_dir,
        device,
        threads: args.threads,
        state_dir: args.state_dir,
        retry: RetryPolicy {
            max_attempts: args.retry_attempts.max(1),
            ..RetryPolicy::default()
        },
        hostname: client::hostname(),
        device_memory_bytes: 0,
    };
    info!(
        coordinator = %config.coordinator,
        device = %device_name(device),
        threads = config.threads,
        version = env!("CARGO_PKG_VERSION"),
        "worker starting"
    );
    tokio::select! {
        result = client::run(config) => {
            let summary = result.context("worker stopped")?;
            info!(rounds = summary.rounds_pushed, evals = summary.evals_reported, joins = summary.joins, "worker finished");
            Ok(())
        }
        signal = tokio::signal::ctrl_c() => {
            signal.context("cannot listen for ctrl-c")?;
            warn!("interrupted, stopping");
            Ok(())
        }
    }
}

/// The token from --token / COHORT_TOKEN or from --token-file; `None` when neither is
/// given and the site has a client certificate (it is then enrolled by that
/// certificate's name).
fn enrollment_token(args: &FederatedArgs) -> anyhow::Result<Option<EnrollmentToken>> {
    match (&args.token, &args.token_file) {
        (Some(token), None) => EnrollmentToken::new(token)
            .context("the enrollment token (--token or COHORT_TOKEN) is empty")
            .map(Some),
        (None, Some(path)) => {
            let raw = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --token-file {}", path.display()))?;
            EnrollmentToken::new(&raw)
                .with_context(|| format!("--token-file {} is empty", path.display()))
                .map(Some)
        }
        (Some(_), Some(_)) => bail!("give either --token or --token-file, not both"),
        (None, None) if args.tls.tls_cert.is_some() => Ok(None),
        (None, None) => bail!(
            "the site needs an enrollment token (--token, --token-file or COHORT_TOKEN) or, \
             when the coordinator runs mutual TLS and enrolls the site by its certificate's \
             name, a client certificate (--tls-cert and --tls-key)"
        ),
    }
}

async fn federated(args: FederatedArgs) -> anyhow::Result<()> {
    let token = enrollment_token(&args)?;
    let device = args
        .device
        .resolve()
        .with_context(|| format!("cannot use --device {}", args.device))?;
    if !args.data.is_dir() {
        bail!("--data {} is not a directory", args.data.display());
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let config = FederatedConfig {
        coordinator: args.coordinator.clone(),
        tls: args.tls.client_tls(),
        data_dir: args.data,
        token,
        device,
        threads: args.threads,
        retry: RetryPolicy {
            max_attempts: args.retry_attempts.max(1),
            ..RetryPolicy::default()
        },
        hostname: client::hostname(),
        device_memory_bytes: 0,
    };
    info!(
        coordinator = %config.coordinator,
        data = %config.data_dir.display(),
        device = %device_name(device),
        threads = config.threads,
        enrolled_by = if config.token.is_some() { "token" } else { "certificate" },
        version = env!("CARGO_PKG_VERSION"),
        "federated client starting"
    );
    tokio::select! {
        result = federated::run(config) => {
            let summary = result.context("federated client stopped")?;
            info!(rounds = summary.rounds_pushed, evals = summary.evals_reported, joins = summary.joins, reason = %summary.done_reason, "federated client finished");
            Ok(())
        }
        signal = tokio::signal::ctrl_c() => {
            signal.context("cannot listen for ctrl-c")?;
            warn!("interrupted, stopping");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (log_format, otlp_endpoint) = match &cli.command {
        Command::Pretrain(args) => (args.log_format, args.otlp_endpoint.clone()),
        Command::Federated(args) => (args.log_format, args.otlp_endpoint.clone()),
        Command::Logits(_) => (LogFormat::Text, None),
    };
    let telemetry = init_tracing(log_format, otlp_endpoint.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cohort-worker: cannot start the async runtime: {e}");
            telemetry.shutdown();
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Pretrain(args) => runtime.block_on(pretrain(args)),
        Command::Federated(args) => runtime.block_on(federated(args)),
        Command::Logits(args) => print_logits(args),
    };
    // The training runtime goes first; then the spans still queued are sent.
    drop(runtime);
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "worker failed");
            eprintln!("cohort-worker: {e:#}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}
