//! The `kiln` command: parses the CLI and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln::app::{self, Role};
use kiln::config::Config;
use kiln::filter::FilterSet;

/// kiln: an edge-cached image proxy. Thumbnails are served from storage when
/// they exist; a miss answers 202 at once and a background worker renders it.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// TOML config file, layered over the embedded defaults (env: KILN_CONFIG).
    /// KILN_<SECTION>__<KEY> variables override both, e.g. KILN_SERVER__LISTEN=0.0.0.0:8080.
    #[arg(long, global = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP front and the workers in one process (the default setup).
    Serve,
    /// Run only the HTTP front (queue.backend = "redis"; workers run elsewhere).
    Front,
    /// Run only the workers: claim jobs, render, store, call back.
    Worker,
    /// Ask a running kiln to pre-heat one image URL, and print its record.
    Request {
        /// Filter preset, e.g. `small` (see `kiln filters`).
        filter: String,
        /// URL of the original image.
        url: String,
        /// URL to POST the result to when the variant is ready.
        #[arg(long)]
        callback: Option<String>,
        /// Base URL of the running kiln; default: server.public_url or http://<server.listen>.
        #[arg(long)]
        server: Option<String>,
    },
    /// List the filter presets.
    Filters,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,pingora_core=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => app::run(config, Role::Serve, None)?,
        Command::Front => app::run(config, Role::Front, None)?,
        Command::Worker => app::run(config, Role::Worker, None)?,
        Command::Filters => {
            for preset in FilterSet::from_config(&config)?.iter() {
                println!(
                    "{:<12} {:<9} {}x{}  upscale={} quality={} format={:?}",
                    preset.name,
                    format!("{:?}", preset.mode).to_lowercase(),
                    preset.width,
                    preset.height,
                    preset.upscale,
                    preset.quality,
                    preset.format
                );
            }
        }
        Command::Request {
            filter,
            url,
            callback,
            server,
        } => {
            let base = server.unwrap_or_else(|| config.public_base());
            let mut query = vec![("url", url)];
            if let Some(callback) = callback {
                query.push(("callback", callback));
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (status, body) = runtime.block_on(async {
                let response = reqwest::Client::new()
                    .post(format!("{}/request/{filter}", base.trim_end_matches('/')))
                    .query(&query)
                    .send()
                    .await?;
                let status = response.status();
                anyhow::Ok((status, response.text().await?))
            })?;
            println!("{body}");
            if !status.is_success() {
                anyhow::bail!("kiln answered {status}");
            }
        }
    }
    Ok(())
}
