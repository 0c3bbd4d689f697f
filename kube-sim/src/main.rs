//! `kube-sim serve`: one simulated API server on a socket, for trying the relay (or kubectl)
//! by hand.
//!
//! ```text
//! kube-sim serve --listen 127.0.0.1:0 --name alpha --tls-dir /tmp/alpha --token s3cret:alice
//! ```

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube_sim::record::UserInfo;
use kube_sim::server::{self, SimAuth, SimConfig, StaticToken};

#[derive(Parser)]
#[command(version, about = "A simulated Kubernetes API server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one simulated cluster until interrupted.
    Serve {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Cluster name.
        #[arg(long, default_value = "sim")]
        name: String,
        /// What `/version` reports.
        #[arg(long, default_value = "v1.31.2")]
        git_version: String,
        /// Serve HTTPS with a fresh CA written to DIR/ca.crt (certificate for localhost and
        /// 127.0.0.1); without it, plain HTTP.
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
        /// A static bearer token, `TOKEN:username` or `TOKEN:username:impersonator` (the
        /// latter may impersonate). Repeatable.
        #[arg(long = "token", value_name = "TOKEN:USER[:impersonator]", value_parser = parse_token)]
        tokens: Vec<StaticToken>,
        /// An extra DNS name or IP for the certificate (with --tls-dir). Repeatable.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
    /// Serve the dev OIDC issuer (discovery and JWKS over HTTPS) until interrupted. Writes
    /// DIR/ca.crt, DIR/issuer.key (the PKCS#8 signing key, for minting test tokens) and
    /// DIR/issuer.json.
    Issuer {
        /// Address to listen on; the issuer URL is https://<this address>.
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

fn parse_token(s: &str) -> Result<StaticToken, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(token), Some(user)) = (parts.next(), parts.next()) else {
        return Err("expected TOKEN:username[:impersonator]".into());
    };
    let can_impersonate = match parts.next() {
        None => false,
        Some("impersonator") => true,
        Some(other) => {
            return Err(format!(
                "unknown token flag {other:?}: expected \"impersonator\""
            ))
        }
    };
    if token.is_empty() || user.is_empty() {
        return Err("token and username must not be empty".into());
    }
    Ok(StaticToken {
        token: token.to_owned(),
        user: UserInfo {
            username: user.to_owned(),
            ..UserInfo::default()
        },
        can_impersonate,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let (listen, name, git_version, tls_dir, tokens, sans) = match Cli::parse().command {
        Command::Serve {
            listen,
            name,
            git_version,
            tls_dir,
            tokens,
            sans,
        } => (listen, name, git_version, tls_dir, tokens, sans),
        Command::Issuer { listen, dir } => return serve_issuer(listen, &dir).await,
    };
    let tls = match &tls_dir {
        None => None,
        Some(dir) => {
            let ca = kube_sim::pki::TestCa::new(&format!("kube-sim {name} CA"))?;
            let ip = listen.ip().to_string();
            let mut names: Vec<&str> = vec!["localhost", "127.0.0.1", &ip];
            names.extend(sans.iter().map(String::as_str));
            let leaf = ca.issue(&names)?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let ca_path = dir.join("ca.crt");
            std::fs::write(&ca_path, ca.cert_pem())
                .with_context(|| format!("writing {}", ca_path.display()))?;
            Some(server::tls_config(&leaf)?)
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let cfg = SimConfig {
        name,
        git_version,
        auth: SimAuth {
            static_tokens: tokens,
            jwt: Vec::new(),
        },
    };
    let handle = server::start(listener, tls, cfg).await?;
    println!("listening on {scheme}://{}", handle.addr);
    tokio::signal::ctrl_c().await?;
    handle.shutdown();
    Ok(())
}

/// `kube-sim issuer`: the dev issuer as its own process (e.g. inside a test network namespace).
async fn serve_issuer(listen: std::net::SocketAddr, dir: &std::path::Path) -> anyhow::Result<()> {
    use kube_sim::issuer::{DevIssuer, KeyAlg};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let url = format!("https://{addr}");
    let ca = kube_sim::pki::TestCa::new("kube-sim issuer CA")?;
    let ip = addr.ip().to_string();
    let leaf = ca.issue(&["localhost", "127.0.0.1", &ip])?;
    let issuer = DevIssuer::generate(&url, KeyAlg::Es256)?;
    std::fs::write(dir.join("ca.crt"), ca.cert_pem())?;
    std::fs::write(dir.join("issuer.key"), issuer.signing_key_pem())?;
    let handle =
        kube_sim::issuer::serve(listener, Some(server::tls_config(&leaf)?), issuer).await?;
    // Written last, and whole (temp file + rename): scripts wait for this file to appear and
    // then read it, so it must never be seen half-written or before the issuer serves.
    let meta = dir.join("issuer.json");
    let tmp = dir.join(".issuer.json.tmp");
    std::fs::write(&tmp, format!("{{\"issuer\":\"{url}\",\"alg\":\"ES256\"}}"))?;
    std::fs::rename(&tmp, &meta)?;
    println!("issuer {url}");
    tokio::signal::ctrl_c().await?;
    handle.shutdown();
    Ok(())
}
