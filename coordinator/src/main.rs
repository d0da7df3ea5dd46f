//! `cohort-coordinator`: prepares data and runs training jobs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use cohort_coordinator::config::JobFile;
use cohort_coordinator::data::{prepare, PrepareOptions, TokenizerKind};
use cohort_coordinator::dev_certs::{self, DevCertsOptions};
use cohort_coordinator::federated_data::sentiment::{self, SentimentOptions};
use cohort_coordinator::federated_data::{self, FederatedOptions};
use cohort_coordinator::planning::{self, PrivacyQuestion};
use cohort_coordinator::service::OperatorToken;
use cohort_coordinator::tls::{self, ServerTls, TlsFiles};
use cohort_coordinator::{plot, server, status};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "cohort-coordinator",
    version,
    about = "Cohort training coordinator"
)]
struct Cli {
    /// Log output format.
    #[arg(long, env = "COHORT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// TLS on `run`'s gRPC port. Plaintext is served only on a loopback address
/// unless --insecure-plaintext says otherwise.
#[derive(clap::Args, Debug)]
struct RunSecurity {
    /// PEM certificate chain of the coordinator: gRPC is served over TLS
    /// (needs --tls-key).
    #[arg(
        long,
        value_name = "PEM",
        env = "COHORT_TLS_CERT",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (keep it mode 0600).
    #[arg(
        long,
        value_name = "PEM",
        env = "COHORT_TLS_KEY",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates for clients: every client must present a
    /// certificate one of them signed (mutual TLS).
    #[arg(
        long,
        value_name = "PEM",
        env = "COHORT_TLS_CLIENT_CA",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC on a non-loopback address (refused otherwise):
    /// only behind a network that already encrypts and authenticates.
    #[arg(long, env = "COHORT_INSECURE_PLAINTEXT", conflicts_with = "tls_cert")]
    insecure_plaintext: bool,
    /// A file holding the operator token: only its bearer may call Status and
    /// Stop (workers' sessions and enrollment tokens cannot). Unset: both are
    /// open to anyone who can connect.
    #[arg(long, value_name = "PATH", env = "COHORT_OPERATOR_TOKEN_FILE")]
    operator_token_file: Option<PathBuf>,
}

impl RunSecurity {
    /// The checked TLS configuration (files read and parsed), if any; refuses
    /// plaintext beyond loopback. Runs before a port is bound.
    fn server_tls(&self, listen: SocketAddr) -> anyhow::Result<Option<ServerTls>> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls::load(&TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            })?),
            _ => None,
        };
        tls::check_listen(listen, tls.is_some(), self.insecure_plaintext)?;
        Ok(tls)
    }

    /// The operator token from --operator-token-file, if given.
    fn operator_token(&self) -> anyhow::Result<Option<OperatorToken>> {
        let Some(path) = &self.operator_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --operator-token-file {}", path.display()))?;
        OperatorToken::new(&text)
            .map(Some)
            .with_context(|| format!("--operator-token-file {} is empty", path.display()))
    }
}

/// How an operator command (`status`, `stop`) reaches the coordinator and
/// proves it is the operator.
#[derive(clap::Args, Debug)]
struct OperatorArgs {
    /// The coordinator's gRPC URL.
    #[arg(
        long,
        env = "COHORT_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// A file holding the operator token, for a coordinator run with one.
    #[arg(long, value_name = "PATH", env = "COHORT_OPERATOR_TOKEN_FILE")]
    operator_token_file: Option<PathBuf>,
    /// PEM CA of the coordinator's certificate (https:// URLs; default:
    /// the system's roots).
    #[arg(long, value_name = "PEM", env = "COHORT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a coordinator with mutual TLS.
    #[arg(
        long,
        value_name = "PEM",
        env = "COHORT_OPERATOR_TLS_CERT",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        value_name = "PEM",
        env = "COHORT_OPERATOR_TLS_KEY",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
}

impl OperatorArgs {
    /// The files read: token, CA, client identity.
    fn access(&self) -> anyhow::Result<status::StatusAccess> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
        };
        Ok(status::StatusAccess {
            operator_token: self
                .operator_token_file
                .as_ref()
                .map(|path| read("--operator-token-file", path))
                .transpose()?
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
            tls_ca: self
                .tls_ca
                .as_ref()
                .map(|p| read("--tls-ca", p))
                .transpose()?,
            tls_identity: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => {
                    Some((read("--tls-cert", cert)?, read("--tls-key", key)?))
                }
                _ => None,
            },
        })
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a pretraining job until it finishes (or SIGINT/SIGTERM or an
    /// operator's `stop`, which checkpoint and exit 0). Resumes by default:
    /// when the run directory's store (`cohort.sqlite`) holds a checkpoint of
    /// the same job, training continues from the newest intact one; a store
    /// of another job is refused.
    Run {
        /// The job file (TOML).
        #[arg(long, env = "COHORT_JOB")]
        job: PathBuf,
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, env = "COHORT_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Write the bound address to this file once listening.
        #[arg(long, env = "COHORT_ADDR_FILE")]
        addr_file: Option<PathBuf>,
        /// Overrides the job file's data_dir.
        #[arg(long, env = "COHORT_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Overrides the job file's run_dir.
        #[arg(long, env = "COHORT_RUN_DIR")]
        run_dir: Option<PathBuf>,
        /// Refuse to start if the run directory already holds checkpoints
        /// (the default is to resume from them).
        #[arg(long, env = "COHORT_FRESH")]
        fresh: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP; off
        /// when unset).
        #[arg(long, env = "COHORT_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// Also serve gRPC health checks (grpc.health.v1, nothing else) in
        /// plaintext on ADDR, for probes that cannot speak TLS (the
        /// kubelet's); off when unset.
        #[arg(long, value_name = "ADDR", env = "COHORT_HEALTH_LISTEN")]
        health_listen: Option<SocketAddr>,
        /// Export tracing spans (RPC handlers) to this OpenTelemetry
        /// collector over OTLP/gRPC, as service.name cohort-coordinator, e.g.
        /// http://127.0.0.1:4317; off when unset. An unreachable collector
        /// only costs a warning.
        #[arg(long, value_name = "URL", env = "COHORT_OTLP_ENDPOINT", value_parser = cohort_telemetry::parse_endpoint)]
        otlp_endpoint: Option<String>,
        #[command(flatten)]
        security: RunSecurity,
    },
    /// Makes a development CA, a certificate for the coordinator's hosts and
    /// one client certificate per site (CN client-01, ...), as PEM files with
    /// keys readable by the owner only, and prints how to use them.
    DevCerts {
        /// Output directory (created if missing; no file in it is replaced).
        #[arg(long, env = "COHORT_DEV_CERTS_OUT")]
        out: PathBuf,
        /// Client certificates to make.
        #[arg(long, env = "COHORT_DEV_CERTS_CLIENTS", default_value_t = 2)]
        clients: usize,
        /// Host names and IP addresses the coordinator's certificate is valid
        /// for, comma-separated; the first is its common name.
        #[arg(
            long,
            env = "COHORT_DEV_CERTS_HOSTS",
            value_delimiter = ',',
            default_value = "localhost,127.0.0.1"
        )]
        hosts: Vec<String>,
        /// Days the certificates are valid.
        #[arg(long, env = "COHORT_DEV_CERTS_DAYS", default_value_t = 365)]
        days: u32,
    },
    /// The live job at a glance: round, workers and their state, last
    /// losses, privacy spent and left, ETA (the coordinator's Status RPC).
    Status {
        /// Print one JSON object instead of a table.
        #[arg(long, env = "COHORT_JSON")]
        json: bool,
        #[command(flatten)]
        access: OperatorArgs,
    },
    /// Stops the live job as SIGTERM would (health NOT_SERVING, the current
    /// version checkpointed, exit 0; a restart resumes) and tells every
    /// worker the job is done, with the reason (the coordinator's Stop RPC).
    /// Prints the phase and committed rounds the coordinator stopped at.
    Stop {
        /// Why: logged by the coordinator and told to the workers.
        #[arg(long, value_name = "TEXT", env = "COHORT_STOP_REASON")]
        reason: Option<String>,
        #[command(flatten)]
        access: OperatorArgs,
    },
    /// Draws a run's loss curves (and epsilon spent, for federated jobs with
    /// DP) from its metrics.jsonl to an SVG file.
    Plot {
        /// The run directory holding metrics.jsonl.
        #[arg(long, env = "COHORT_RUN_DIR")]
        run_dir: PathBuf,
        /// The image to write (.svg).
        #[arg(long, env = "COHORT_PLOT_OUT")]
        out: PathBuf,
    },
    /// Tokenises text files into token shards and a manifest.
    Prepare {
        /// Text files or directories (searched for .txt and .md).
        #[arg(long = "input", env = "COHORT_INPUT", required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        /// Output directory.
        #[arg(long, env = "COHORT_OUTPUT")]
        output: PathBuf,
        #[arg(long, env = "COHORT_TOKENIZER", value_enum, default_value_t = TokenizerKind::Byte)]
        tokenizer: TokenizerKind,
        /// The model's context length; shards hold a whole number of windows.
        #[arg(long, env = "COHORT_CONTEXT_LENGTH", default_value_t = 64)]
        context_length: u32,
        /// Approximate tokens per shard.
        #[arg(long, env = "COHORT_SHARD_TOKENS", default_value_t = 16_384)]
        shard_tokens: u64,
        /// Every n-th shard is held out for evaluation.
        #[arg(long, env = "COHORT_VAL_EVERY", default_value_t = 20)]
        val_every: usize,
    },
    /// Splits a corpus into federated client sites, each with a secret
    /// `token` (mode 0600), plus `enrollment.toml` holding only token digests.
    /// --plays: Shakespeare, one site per (play, speaking role), with
    /// `train.txt` and `test.txt`. --sentiment: labelled sentences, sites
    /// dealt to the imdb, yelp and amazon domains in turn, with `train.jsonl`
    /// and `test.jsonl` (`{"text", "label"}` per line).
    #[command(group(clap::ArgGroup::new("source").required(true).args(["plays", "sentiment"])))]
    PrepareFederated {
        /// The plays (`scripts/bootstrap.sh --corpus` puts them in
        /// ~/.cache/cohort/corpus/shakespeare); a play's genre is its folder.
        #[arg(long, value_name = "DIR", env = "COHORT_FEDERATED_PLAYS")]
        plays: Option<PathBuf>,
        /// The labelled sentences: imdb.json, yelp.json and amazon.json
        /// (`scripts/bootstrap.sh --corpus` puts them in
        /// ~/.cache/cohort/corpus/sentiment).
        #[arg(long, value_name = "DIR", env = "COHORT_FEDERATED_SENTIMENT")]
        sentiment: Option<PathBuf>,
        /// Output directory; must be empty or missing unless --force.
        #[arg(long, env = "COHORT_FEDERATED_OUT")]
        out: PathBuf,
        /// Number of client sites (plays: spread over genres, then plays;
        /// sentiment: dealt to the domains in turn, 8 = imdb 3, yelp 3, amazon 2).
        #[arg(long, env = "COHORT_FEDERATED_CLIENTS", default_value_t = federated_data::DEFAULT_CLIENTS)]
        clients: usize,
        /// Roles with fewer characters of dialogue are not clients (--plays only).
        #[arg(long, env = "COHORT_FEDERATED_MIN_CHARS", default_value_t = federated_data::DEFAULT_MIN_CHARS, conflicts_with = "sentiment")]
        min_chars: usize,
        /// Share of each site's data held out (plays: its last speeches,
        /// default 0.1; sentiment: the end of its shuffled slice, default 0.2).
        #[arg(long, env = "COHORT_FEDERATED_TEST_FRACTION")]
        test_fraction: Option<f64>,
        /// Seeds the selection (plays: the order of genres and plays;
        /// sentiment: each domain's shuffle).
        #[arg(long, env = "COHORT_FEDERATED_SEED", default_value_t = 0)]
        seed: u64,
        /// Replace a previous prepare-federated output in --out, tokens
        /// included (deliberately a flag only, with no environment variable).
        #[arg(long)]
        force: bool,
    },
    /// Privacy planning without running anything: epsilon for a noise
    /// multiplier, or the smallest noise multiplier for a target epsilon.
    Privacy {
        /// Noise standard deviation divided by the clipping norm.
        #[arg(
            long,
            env = "COHORT_NOISE_MULTIPLIER",
            required_unless_present = "target_epsilon",
            conflicts_with = "target_epsilon"
        )]
        noise_multiplier: Option<f64>,
        /// Print the smallest noise multiplier whose epsilon is at most this.
        #[arg(long, env = "COHORT_TARGET_EPSILON")]
        target_epsilon: Option<f64>,
        /// Poisson sampling rate of clients per round, in (0, 1].
        #[arg(long, env = "COHORT_SAMPLE_RATE")]
        sample_rate: f64,
        /// Number of rounds.
        #[arg(long, env = "COHORT_ROUNDS")]
        rounds: u64,
        #[arg(long, env = "COHORT_DELTA", default_value_t = 1e-5)]
        delta: f64,
        /// Print one JSON object instead of a sentence.
        #[arg(long, env = "COHORT_JSON")]
        json: bool,
    },
    /// Writes a checkpoint in the Hugging Face GPT-2 layout (transformers'
    /// GPT2LMHeadModel): DIR/config.json and DIR/model.safetensors, LoRA
    /// adapters merged into the weights; or, with --as-peft, a PEFT adapter
    /// (DIR/adapter_config.json, DIR/adapter_model.safetensors) and its base
    /// model in DIR/base. With --job, the job supplies the model, the LoRA
    /// settings and base, and its run directory's newest checkpoint.
    ExportHf(ExportHfArgs),
    /// Reads a Hugging Face GPT-2 model (DIR/config.json and
    /// DIR/model.safetensors) into a Cohort checkpoint, to start a federated
    /// job (`federated.base_checkpoint`) or pretraining
    /// (`train.init_checkpoint`) from; prints the job file's [model] section.
    ImportHf(ImportHfArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModelArg {
    Tiny,
    Gpt2Small,
}

#[derive(clap::Args, Debug)]
struct ExportHfArgs {
    /// A job file: its model, LoRA rank and alpha, base checkpoint and run
    /// directory (whose newest checkpoint-*.safetensors is exported).
    #[arg(long, env = "COHORT_EXPORT_JOB")]
    job: Option<PathBuf>,
    /// The model, without --job.
    #[arg(long, env = "COHORT_EXPORT_MODEL", value_enum)]
    model: Option<ModelArg>,
    /// The model's parameters (a Cohort checkpoint); with a LoRA --job,
    /// the base the adapters apply to.
    #[arg(long, env = "COHORT_EXPORT_CHECKPOINT")]
    checkpoint: Option<PathBuf>,
    /// LoRA adapters to apply (a federated LoRA job's checkpoint); their
    /// rank is read from the file.
    #[arg(long, env = "COHORT_EXPORT_LORA_ADAPTERS")]
    lora_adapters: Option<PathBuf>,
    /// The adapters' alpha (they scale by alpha / rank), without --job.
    #[arg(long, env = "COHORT_EXPORT_LORA_ALPHA")]
    lora_alpha: Option<f64>,
    /// Write a PEFT LoRA adapter (and its base model in OUT/base) instead of
    /// merged weights.
    #[arg(long, env = "COHORT_EXPORT_AS_PEFT")]
    as_peft: bool,
    /// Output directory (created; files of the same names are replaced).
    #[arg(long, env = "COHORT_EXPORT_OUT")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ImportHfArgs {
    /// Directory holding a GPT-2 config.json and model.safetensors (as
    /// written by save_pretrained).
    #[arg(long, env = "COHORT_IMPORT_HF_DIR")]
    hf_dir: PathBuf,
    /// The Cohort checkpoint to write (.safetensors).
    #[arg(long, env = "COHORT_IMPORT_OUT")]
    out: PathBuf,
}

fn export_hf(args: ExportHfArgs) -> anyhow::Result<()> {
    use cohort_coordinator::hf;
    let request = hf::ExportRequest {
        job: args.job,
        model: args.model.map(|model| match model {
            ModelArg::Tiny => cohort_core::model::ModelConfig::tiny_byte_level(),
            ModelArg::Gpt2Small => cohort_core::model::ModelConfig::gpt2_small(),
        }),
        checkpoint: args.checkpoint,
        lora_adapters: args.lora_adapters,
        lora_alpha: args.lora_alpha,
    };
    let source = hf::resolve(&request)?;
    let format = if args.as_peft {
        hf::ExportFormat::Peft
    } else {
        hf::ExportFormat::Merged
    };
    let report = hf::export(&source, format, &args.out)
        .with_context(|| format!("cannot export to {}", args.out.display()))?;
    info!(
        source = %source.described,
        out = %args.out.display(),
        tensors = report.tensors,
        merged_adapters = report.merged_adapters,
        peft = args.as_peft,
        "exported in the Hugging Face GPT-2 layout"
    );
    for file in &report.files {
        println!("{}", file.display());
    }
    Ok(())
}

fn import_hf(args: ImportHfArgs) -> anyhow::Result<()> {
    use cohort_coordinator::hf;
    let report = hf::import(&args.hf_dir, &args.out)
        .with_context(|| format!("cannot import {}", args.hf_dir.display()))?;
    info!(
        hf_dir = %args.hf_dir.display(),
        out = %args.out.display(),
        tensors = report.tensors,
        skipped = ?report.skipped,
        "imported a Hugging Face GPT-2 model"
    );
    print!("{}", hf::model_section(&report.model));
    Ok(())
}

/// Log lines on stderr and, with `run --otlp-endpoint`, spans to an OTLP
/// collector; the returned handle flushes them at the end of `main`.
fn install_tracing(format: LogFormat, otlp_endpoint: Option<&str>) -> cohort_telemetry::Telemetry {
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer: cohort_telemetry::LogLayer = match format {
        LogFormat::Text => Box::new(layer),
        LogFormat::Json => Box::new(layer.json().flatten_event(true).with_current_span(true)),
    };
    cohort_telemetry::install(
        "cohort-coordinator",
        env!("CARGO_PKG_VERSION"),
        otlp_endpoint,
        layer,
    )
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

// One argument per `run` flag (or flag group), as clap hands them over.
#[allow(clippy::too_many_arguments)]
async fn run_job(
    job: PathBuf,
    listen: SocketAddr,
    addr_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    fresh: bool,
    metrics_listen: Option<SocketAddr>,
    health_listen: Option<SocketAddr>,
    security: RunSecurity,
) -> anyhow::Result<()> {
    // Everything is validated before a port is bound.
    let mut file = JobFile::load(&job)?;
    if let Some(dir) = data_dir {
        file.data_dir = dir;
    }
    if let Some(dir) = run_dir {
        file.run_dir = dir;
    }
    let plan = file.validate()?;
    let tls = security.server_tls(listen)?;
    if let Some(federated) = &plan.federated {
        let mutual = tls.as_ref().is_some_and(|t| t.mutual());
        let certificate_only = federated.certificate_only_sites();
        if !mutual && !certificate_only.is_empty() {
            anyhow::bail!(
                "sites {} are enrolled by certificate name only, and this coordinator does not ask \
                 clients for certificates: start it with --tls-cert, --tls-key and --tls-client-ca \
                 (mutual TLS), or give those sites a token_sha256",
                certificate_only.join(", ")
            );
        }
        if !mutual && !federated.certificate_names.is_empty() {
            warn!(
                sites = federated.certificate_names.len(),
                "some sites are enrolled by certificate name as well, but without --tls-client-ca \
                 they can join only with their tokens"
            );
        }
    }
    let operator_token = security.operator_token()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener.local_addr()?;
    if let Some(path) = addr_file {
        cohort_coordinator::data::write_atomically(&path, bound.to_string().as_bytes())
            .with_context(|| format!("cannot write the address file {}", path.display()))?;
    }
    let metrics_listener = match metrics_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for metrics on {address}"))?,
        ),
        None => None,
    };
    let health_listener = match health_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for health checks on {address}"))?,
        ),
        None => None,
    };
    let mode = if fresh {
        server::StartMode::Fresh
    } else {
        server::StartMode::Resume
    };
    let options = server::RunOptions {
        mode,
        metrics_listener,
        tls,
        operator_token,
        health_listener,
    };
    let outcome = server::run_with_options(listener, plan, shutdown_signal(), options).await?;
    if let Some(reason) = &outcome.stopped_by_operator {
        info!(version = outcome.version.0, reason = %reason, "the job was stopped by an operator; running it again resumes");
    }
    match (&outcome.checkpoint, outcome.final_eval_loss) {
        (Some(path), Some(loss)) => info!(
            version = outcome.version.0,
            final_eval_loss = format_args!("{loss:.4}"),
            checkpoint = %path.display(),
            "done"
        ),
        (Some(path), None) => {
            info!(version = outcome.version.0, checkpoint = %path.display(), "done")
        }
        (None, _) => info!(version = outcome.version.0, "done without a checkpoint"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let otlp_endpoint = match &cli.command {
        Command::Run { otlp_endpoint, .. } => otlp_endpoint.clone(),
        _ => None,
    };
    let telemetry = install_tracing(cli.log_format, otlp_endpoint.as_deref());
    let result = match cli.command {
        Command::Run {
            job,
            listen,
            addr_file,
            data_dir,
            run_dir,
            fresh,
            metrics_listen,
            health_listen,
            otlp_endpoint: _,
            security,
        } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")
            .and_then(|runtime| {
                runtime.block_on(run_job(
                    job,
                    listen,
                    addr_file,
                    data_dir,
                    run_dir,
                    fresh,
                    metrics_listen,
                    health_listen,
                    security,
                ))
            }),
        Command::Status { json, access } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")
            .and_then(|runtime| {
                let response =
                    runtime.block_on(status::fetch(&access.coordinator, &access.access()?))?;
                if json {
                    println!("{}", status::to_json(&response));
                } else {
                    print!("{}", status::render_table(&response));
                }
                Ok(())
            }),
        Command::Stop { reason, access } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")
            .and_then(|runtime| {
                let reason = reason.unwrap_or_default();
                let response = runtime.block_on(status::stop(
                    &access.coordinator,
                    &access.access()?,
                    &reason,
                ))?;
                println!("{}", status::render_stop(&access.coordinator, &response));
                Ok(())
            }),
        Command::Plot { run_dir, out } => plot::plot_run(&run_dir, &out)
            .map_err(anyhow::Error::from)
            .map(|rounds| info!(out = %out.display(), rounds, "plot written")),
        Command::DevCerts {
            out,
            clients,
            hosts,
            days,
        } => dev_certs::generate(&DevCertsOptions {
            out,
            clients,
            hosts,
            valid_days: days,
        })
        .map_err(anyhow::Error::from)
        .map(|certs| print!("{}", dev_certs::render_instructions(&certs))),
        Command::Privacy {
            noise_multiplier,
            target_epsilon,
            sample_rate,
            rounds,
            delta,
            json,
        } => {
            let question = match (noise_multiplier, target_epsilon) {
                (Some(noise_multiplier), _) => PrivacyQuestion::Epsilon { noise_multiplier },
                (None, Some(target_epsilon)) => PrivacyQuestion::NoiseMultiplier { target_epsilon },
                (None, None) => unreachable!("clap requires one of them"),
            };
            planning::answer(question, sample_rate, rounds, delta)
                .map_err(anyhow::Error::from)
                .and_then(|answer| {
                    if json {
                        println!("{}", serde_json::to_string(&answer)?);
                    } else {
                        println!("{answer}");
                    }
                    Ok(())
                })
        }
        Command::PrepareFederated {
            plays,
            sentiment,
            out,
            clients,
            min_chars,
            test_fraction,
            seed,
            force,
        } => match (plays, sentiment) {
            (Some(plays), _) => federated_data::prepare_federated(&FederatedOptions {
                plays,
                out: out.clone(),
                clients,
                min_chars,
                test_fraction: test_fraction.unwrap_or(federated_data::DEFAULT_TEST_FRACTION),
                seed,
                force,
            })
            .map_err(anyhow::Error::from)
            .map(|report| {
                print!("{}", federated_data::render_summary(&report));
                info!(
                    out = %out.display(),
                    plays = report.plays,
                    candidates = report.candidates,
                    eligible = report.eligible,
                    clients = report.clients.len(),
                    "federated data prepared"
                );
            }),
            (None, Some(dir)) => sentiment::prepare_sentiment(&SentimentOptions {
                dir,
                out: out.clone(),
                clients,
                test_fraction: test_fraction.unwrap_or(sentiment::DEFAULT_TEST_FRACTION),
                seed,
                force,
            })
            .map_err(anyhow::Error::from)
            .map(|report| {
                print!("{}", sentiment::render_summary(&report));
                info!(
                    out = %out.display(),
                    sites = report.sites.len(),
                    "federated sentiment data prepared"
                );
            }),
            (None, None) => unreachable!("clap requires --plays or --sentiment"),
        },
        Command::Prepare {
            inputs,
            output,
            tokenizer,
            context_length,
            shard_tokens,
            val_every,
        } => {
            let options = PrepareOptions {
                inputs,
                output: output.clone(),
                tokenizer,
                context_length,
                shard_tokens,
                val_every,
                show_progress: true,
            };
            prepare(&options)
                .map_err(anyhow::Error::from)
                .map(|manifest| {
                    let train: u64 = manifest.train.iter().map(|s| s.num_tokens).sum();
                    let val: u64 = manifest.val.iter().map(|s| s.num_tokens).sum();
                    info!(
                        output = %output.display(),
                        train_shards = manifest.train.len(),
                        val_shards = manifest.val.len(),
                        train_tokens = train,
                        val_tokens = val,
                        dropped_tokens = manifest.dropped_tokens,
                        "data prepared"
                    );
                })
        }
        Command::ExportHf(args) => export_hf(args),
        Command::ImportHf(args) => import_hf(args),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    };
    // After the runtime is gone: sends the spans still queued.
    telemetry.shutdown();
    code
}
