//! The `kube-relay` command line: a thin shell over the library.
// Client input and I/O fail in ordinary operation: errors are handled, never unwrapped
// (tests may unwrap: clippy.toml).
#![deny(clippy::unwrap_used, clippy::expect_used)]

/// mimalloc instead of glibc malloc: the request path allocates and frees small buffers on
/// every worker thread and hands lines to the log writers, which glibc serialises on arena
/// locks (docs/perf has the profile and the A/B).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "kube-relay",
    version,
    about = "One TLS-terminating, OIDC-authenticating relay in front of many private Kubernetes API servers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay.
    Serve {
        /// The configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Parse and validate a configuration file; print every problem with its key path.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the embedded default: two simulated clusters, a dev OIDC issuer and the relay.
    Dev(DevArgs),
    /// Check every cluster (DNS, TCP, TLS, credential, /version) and issuer (discovery, keys)
    /// from where the relay runs; prints a table, exits 1 on any failure.
    Doctor {
        #[arg(long, short)]
        config: PathBuf,
        /// Upper bound for each single check.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Write or merge kubeconfig contexts for every cluster this relay lets you use.
    Kubeconfig(kube_relay::cli::kubeconfig::KubeconfigArgs),
    /// Exec credential plugin for kubectl (client.authentication.k8s.io/v1): prints a token for
    /// the relay, signing in (browser, device code, Azure CLI, client secret, workload or managed
    /// identity) only when the on-disk cache has no usable one.
    Token(kube_relay::cli::login::TokenArgs),
    /// Certificates for trials (production issuance: certs/README.md).
    #[command(subcommand)]
    Certs(CertsCmd),
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a throwaway CA and a serving certificate for the public host and *.<host-suffix>.
    Dev {
        /// Where to write ca.crt, relay.crt and relay.key.
        #[arg(long)]
        dir: PathBuf,
        /// SNI suffix: the certificate covers *.<host-suffix>.
        #[arg(long, default_value = "relay.localhost")]
        host_suffix: String,
        /// The relay's public host (public_url's host).
        #[arg(long, default_value = "localhost")]
        public_host: String,
        /// Replace an existing relay.key.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct DevArgs {
    #[command(subcommand)]
    cmd: Option<DevCmd>,
    /// Where to write kubeconfig, relay.yaml and certificates.
    #[arg(long, default_value = "kube-relay-dev")]
    dir: PathBuf,
    /// The relay's listen address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// The admin listener (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,
    /// Also put the dev relay in front of this context of your kubeconfig (kind, minikube,
    /// AKS ...): its server and CA become a relay cluster, its token or client certificate the
    /// relay's credential in impersonate mode, and the dev kubeconfig gets a context of the same
    /// name for alice. Repeatable.
    #[arg(long = "add-context", value_name = "NAME")]
    add_contexts: Vec<String>,
    /// The kubeconfig --add-context reads (default: $KUBECONFIG's first file, else
    /// ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    contexts_from: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DevCmd {
    /// Exec credential plugin for dev users (used by the dev kubeconfig).
    Token {
        #[arg(long, default_value = "kube-relay-dev")]
        dir: PathBuf,
        /// `alice` (everything on alpha and beta) or `bob` (read-only on beta).
        #[arg(long)]
        user: String,
    },
}

/// Logs go to stderr through a background writer: the access log line of every request must not
/// cost the request path a blocking write (measured ~0.25 ms of p50 at 2,000 req/s, docs/perf).
/// Not lossy: under pressure the queue applies backpressure rather than dropping lines. Keep
/// the guard alive until exit; dropping it flushes.
/// Flushes the process log when `main` returns.
struct LogGuard(kube_relay::lines::LineWriter);

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.0.flush_blocking(std::time::Duration::from_secs(5));
    }
}

/// The process log (including the access log line per request) on stderr, written by its own
/// thread in batches (see `kube_relay::lines`).
fn init_tracing() -> Option<LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: log files, journald and container logs get
    // plain text (and the relay skips formatting escape codes on every line).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let out = Box::new(std::io::BufWriter::new(std::io::stderr()));
    match kube_relay::lines::LineWriter::spawn("kube-relay-log", out, 128 * 1024) {
        Ok(writer) => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(ansi)
                .with_writer(writer.clone())
                .init();
            if !ansi {
                // The access line per request skips the formatter (see kube_relay::proxy's
                // `access` module): same text, a fraction of the work.
                kube_relay::proxy::log_access_lines_to(writer.clone());
            }
            Some(LogGuard(writer))
        }
        // No thread for the writer: log straight to stderr rather than not at all.
        Err(e) => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
                .init();
            tracing::warn!(error = %e, "cannot start the log writer thread; logging unbuffered");
            None
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Kubeconfig(args) => kube_relay::cli::kubeconfig::main(args),
        Cmd::Token(args) => kube_relay::cli::login::main(args),
        Cmd::CheckConfig { config } => match kube_relay::config::load(&config) {
            Ok(cfg) => match kube_relay::tls::server_config(&cfg.tls) {
                Ok(_) => {
                    println!(
                        "{}: ok ({} clusters, {} issuers)",
                        config.display(),
                        cfg.clusters.len(),
                        cfg.issuers.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    ExitCode::FAILURE
                }
            },
            Err(errs) => {
                for e in &errs.0 {
                    eprintln!("{}: {e}", config.display());
                }
                eprintln!("{} problem(s) found", errs.0.len());
                ExitCode::FAILURE
            }
        },
        Cmd::Serve { config } => {
            kube_relay::install_crypto_provider();
            let _log = init_tracing();
            let cfg = match kube_relay::config::load(&config) {
                Ok(c) => c,
                Err(errs) => {
                    for e in &errs.0 {
                        eprintln!("{}: {e}", config.display());
                    }
                    eprintln!(
                        "refusing to start: {} problem(s) in the configuration",
                        errs.0.len()
                    );
                    return ExitCode::FAILURE;
                }
            };
            run(async move {
                let app = kube_relay::server::App::bind(cfg)
                    .await?
                    .reload_from(config.clone());
                // Signals are handled from before the line that says we serve: a SIGTERM right
                // after it drains instead of killing the process.
                let shutdown = CancellationToken::new();
                tokio::spawn(shutdown_on_signal(shutdown.clone()));
                tracing::info!(listen = %app.local_addr()?, admin = ?app.admin_addr(), "kube-relay serving");
                app.run(shutdown).await
            })
        }
        Cmd::Doctor { config, timeout } => {
            kube_relay::install_crypto_provider();
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            let opts = kube_relay::cli::doctor::Options { timeout };
            let report = rt.block_on(kube_relay::cli::doctor::run_file(&config, &opts));
            // A DNS lookup cut by its timeout may still sit in the resolver on a blocking
            // thread; do not let it hold the exit.
            rt.shutdown_timeout(std::time::Duration::from_millis(200));
            print!("{}", report.render());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Certs(CertsCmd::Dev {
            dir,
            host_suffix,
            public_host,
            force,
        }) => {
            kube_relay::install_crypto_provider();
            let opts = kube_relay::cli::certs::DevCertOptions {
                dir,
                host_suffix,
                public_host,
                force,
            };
            match kube_relay::cli::certs::dev(&opts) {
                Ok(out) => {
                    print!("{}", kube_relay::cli::certs::summary(&out));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kube-relay certs dev: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "dev")]
        Cmd::Dev(args) => match args.cmd {
            Some(DevCmd::Token { dir, user }) => {
                let info = std::env::var("KUBERNETES_EXEC_INFO").ok();
                match kube_relay::dev::token_credential(&dir, &user, info.as_deref()) {
                    Ok(s) => {
                        println!("{s}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("kube-relay dev token: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            }
            None => {
                let _log = init_tracing();
                run(async move {
                    let exe = std::env::current_exe()?;
                    let env = kube_relay::dev::start(kube_relay::dev::DevOptions {
                        dir: args.dir,
                        listen: args.listen,
                        admin_listen: args.admin_listen,
                        exe,
                        add_contexts: args.add_contexts,
                        contexts_from: args.contexts_from,
                    })
                    .await?;
                    println!("{}", kube_relay::dev::banner(&env));
                    env.wait().await
                })
            }
        },
        #[cfg(not(feature = "dev"))]
        Cmd::Dev(_) => {
            eprintln!(
                "kube-relay dev: this binary was built without the `dev` feature (container \
                 images and release builds leave the simulated clusters out). Build one with it \
                 from a checkout: `cargo run -- dev`, or `cargo install --path .` (the feature is \
                 on by default)."
            );
            ExitCode::from(2)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("kube-relay: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kube-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the SIGTERM / SIGINT handlers now (not when first polled) and returns the future
/// that cancels `token` on either.
fn shutdown_on_signal(token: CancellationToken) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered here, eagerly; `tokio::signal::ctrl_c()` would only register when polled.
        [SignalKind::terminate(), SignalKind::interrupt()].map(|k| signal(k).ok())
    };
    async move {
        #[cfg(unix)]
        {
            let [term, int] = handlers;
            let recv = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = recv(term) => {}
                () = recv(int) => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        token.cancel();
    }
}
