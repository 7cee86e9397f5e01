//! The `kiln` command: parses the CLI and calls into the library.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln::app::{self, Role};
use kiln::config::{Config, LogFormat};
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
    Serve {
        #[command(flatten)]
        upgrade: Upgrade,
    },
    /// Run only the HTTP front (queue.backend = "redis"; workers run elsewhere).
    Front {
        #[command(flatten)]
        upgrade: Upgrade,
    },
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
        #[command(flatten)]
        remote: Remote,
    },
    /// Manage SAIS accounts on a running kiln.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Queue image URLs of an account for download and thumbnails.
    Dispatch {
        /// The account's root.
        root: String,
        /// An image URL; repeat for more.
        #[arg(long = "url")]
        urls: Vec<String>,
        /// A file with one image URL per line (`-` for stdin).
        #[arg(long)]
        file: Option<PathBuf>,
        /// A filter to render; repeat for more (default: sais.default_filters).
        #[arg(long = "filter")]
        filters: Vec<String>,
        /// Wait for each batch to be processed before sending the next.
        #[arg(long)]
        wait: bool,
        /// URLs per request.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print the media record of a code.
    Media {
        code: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the filter presets, or import a LiipImagineBundle YAML.
    Filters {
        #[command(subcommand)]
        action: Option<FiltersAction>,
    },
    /// Exit 0 when a running kiln is live (/healthz), or ready with --ready
    /// (/readyz: storage and Redis reachable); for container health checks.
    Health {
        #[arg(long)]
        ready: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove variants from storage and every index so they render again on
    /// demand: an original's (by media code or stored path), or every
    /// variant of one filter after its definition changed.
    Purge {
        /// A media code (16 hex digits) or an original's stored path, e.g. `default/0a/0123456789abcdef.jpg`.
        #[arg(required_unless_present = "filter")]
        target: Option<String>,
        /// Only this filter's variant of the target; without a target, every variant of this filter (admin key).
        #[arg(long)]
        filter: Option<String>,
        /// Remove the original and its media record too.
        #[arg(long)]
        original: bool,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Zero-downtime restart.
#[derive(clap::Args)]
struct Upgrade {
    /// Take over the listening sockets of the kiln running with the same
    /// server.upgrade_sock: start this, then send the old one SIGQUIT.
    #[arg(long)]
    upgrade: bool,
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Create an account, or update its callbacks (uses the admin key).
    Setup {
        root: String,
        /// Estimated number of images (sizes the storage bins; fixed once media exist).
        #[arg(long)]
        approx: Option<u64>,
        #[arg(long)]
        media_callback: Option<String>,
        #[arg(long)]
        thumb_callback: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Where the running kiln is and which key to show it.
#[derive(clap::Args)]
struct Remote {
    /// Base URL of the running kiln; default: server.public_url or http://<server.listen>.
    #[arg(long)]
    server: Option<String>,
    /// API key (an account's, or the admin key); default: auth.admin_key.
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Seconds to wait for an answer; default 5 for `health`, 60 for the
    /// others (a `dispatch --wait` batch is held up to the server's
    /// sais.wait_timeout_ms).
    #[arg(long = "timeout")]
    timeout_secs: Option<u64>,
}

/// `--timeout`'s default, for commands but `health`.
const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// `kiln health --timeout`'s default: a probe must answer fast or be failed.
const HEALTH_TIMEOUT_SECS: u64 = 5;

impl Remote {
    fn base(&self, config: &Config) -> String {
        self.server
            .clone()
            .unwrap_or_else(|| config.public_base())
            .trim_end_matches('/')
            .to_string()
    }

    fn key(&self, config: &Config) -> Option<String> {
        self.key
            .clone()
            .or_else(|| Some(config.auth.admin_key.clone()))
            .filter(|k| !k.is_empty())
    }

    /// Sends one request and returns the JSON answer; a non-2xx is an error
    /// carrying kiln's message.
    async fn send(
        &self,
        config: &Config,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<serde_json::Value> {
        // A kiln that accepts and never answers must not hang a script.
        let timeout = self.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
        let request = request.timeout(std::time::Duration::from_secs(timeout));
        let request = match self.key(config) {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            anyhow::bail!("kiln answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `:#` prints the causes too ("reading x.yaml: No such file…").
            eprintln!("kiln: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs as `[log]` says: text or JSON lines at its level, `RUST_LOG` first.
fn init_logging(config: &kiln::config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

#[derive(Subcommand)]
enum FiltersAction {
    /// Print the kiln TOML equivalent of a LiipImagineBundle YAML
    /// (`liip_imagine:` filter_sets and default_filter_set_settings).
    Import {
        /// The Liip YAML file.
        yaml: PathBuf,
        /// Write the TOML here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// Reads a Liip YAML, checks every set compiles, and writes its TOML; the
/// settings kiln does not use are reported on standard error.
fn import_liip(yaml: &Path, output: Option<&Path>) -> anyhow::Result<()> {
    use kiln::filter::liip;
    let text =
        std::fs::read_to_string(yaml).with_context(|| format!("reading {}", yaml.display()))?;
    let import = liip::read_yaml(&text, yaml)?;
    for (name, spec) in &import.sets {
        spec.compile(name)?;
    }
    for note in &import.notes {
        eprintln!("note: {note}");
    }
    let toml = liip::to_toml(&import, &yaml.display().to_string())?;
    // What was written must load as the same presets.
    kiln::filter::FilterSet::from_toml(&toml).context("the imported TOML does not load")?;
    match output {
        Some(path) => {
            std::fs::write(path, toml).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{toml}"),
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    init_logging(&config.log);
    match cli.command {
        Command::Serve { upgrade } => app::run(config, Role::Serve, upgrade.upgrade, None)?,
        Command::Front { upgrade } => app::run(config, Role::Front, upgrade.upgrade, None)?,
        Command::Worker => app::run(config, Role::Worker, false, None)?,
        Command::Filters { action: None } => {
            for preset in FilterSet::from_config(&config)?.iter() {
                println!("{:<12} {}", preset.name, preset.describe());
            }
        }
        Command::Filters {
            action: Some(FiltersAction::Import { yaml, output }),
        } => import_liip(&yaml, output.as_deref())?,
        Command::Request {
            filter,
            url,
            callback,
            remote,
        } => {
            let mut query = vec![("url", url)];
            if let Some(callback) = callback {
                query.push(("callback", callback));
            }
            let endpoint = format!("{}/request/{filter}", remote.base(&config));
            let answer = block_on(
                remote.send(&config, reqwest::Client::new().post(endpoint).query(&query)),
            )?;
            println!("{answer}");
        }
        Command::Account {
            command:
                AccountCommand::Setup {
                    root,
                    approx,
                    media_callback,
                    thumb_callback,
                    remote,
                },
        } => {
            let body = serde_json::json!({
                "root": root,
                "approx": approx,
                "mediaCallbackUrl": media_callback,
                "thumbCallbackUrl": thumb_callback,
            });
            let endpoint = format!("{}/account_setup", remote.base(&config));
            let answer =
                block_on(remote.send(&config, reqwest::Client::new().post(endpoint).json(&body)))?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
        Command::Dispatch {
            root,
            urls,
            file,
            filters,
            wait,
            batch,
            remote,
        } => {
            let mut all = urls;
            if let Some(file) = file {
                let text = if file.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?
                };
                all.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_string),
                );
            }
            if all.is_empty() {
                anyhow::bail!("no URLs: give --url or --file");
            }
            block_on(dispatch(
                &config,
                &remote,
                &root,
                &all,
                &filters,
                wait,
                batch.max(1),
            ))?;
        }
        Command::Purge {
            target,
            filter,
            original,
            remote,
        } => {
            // One filter of a media code: its variants are named by the
            // original's path, which its record holds.
            let target = match (target, &filter) {
                (Some(code), Some(_)) if kiln::keys::is_media_code(&code) => {
                    let endpoint = format!("{}/media/{code}", remote.base(&config));
                    let record =
                        block_on(remote.send(&config, reqwest::Client::new().get(endpoint)))?;
                    let path = record["path"].as_str().with_context(|| {
                        format!("media {code} has no stored original yet, so no variants")
                    })?;
                    Some(path.to_string())
                }
                (target, _) => target,
            };
            let mut endpoint = reqwest::Url::parse(&remote.base(&config))?;
            {
                let mut segments = endpoint
                    .path_segments_mut()
                    .map_err(|()| anyhow::anyhow!("--server must be an http(s) URL"))?;
                segments.pop_if_empty().push("media");
                match &target {
                    Some(code) if kiln::keys::is_media_code(code) && filter.is_none() => {
                        segments.push(code);
                    }
                    Some(path) => {
                        segments
                            .push("cache")
                            .push(filter.as_deref().unwrap_or("*"))
                            .extend(path.trim_matches('/').split('/'));
                    }
                    None => {
                        segments
                            .push("cache")
                            .push(filter.as_deref().unwrap_or_default());
                    }
                }
            }
            if original {
                endpoint.query_pairs_mut().append_pair("original", "1");
            }
            let answer = block_on(remote.send(&config, reqwest::Client::new().delete(endpoint)))?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
        Command::Health { ready, mut remote } => {
            remote.timeout_secs = remote.timeout_secs.or(Some(HEALTH_TIMEOUT_SECS));
            let route = if ready { "readyz" } else { "healthz" };
            // This machine's own listener, not public_url (which may be a CDN).
            let own = format!(
                "http://{}",
                config.server.listen.replace("0.0.0.0:", "127.0.0.1:")
            );
            let base = remote.server.clone().unwrap_or(own);
            let endpoint = format!("{}/{route}", base.trim_end_matches('/'));
            let answer = block_on(remote.send(&config, reqwest::Client::new().get(endpoint)))?;
            println!("{answer}");
        }
        Command::Media { code, remote } => {
            let endpoint = format!("{}/media/{code}", remote.base(&config));
            let answer = block_on(remote.send(&config, reqwest::Client::new().get(endpoint)))?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
    }
    Ok(())
}

fn block_on<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(work)
}

/// Sends the URLs in batches, with a progress bar on stderr; prints one
/// JSON record per line on stdout.
async fn dispatch(
    config: &Config,
    remote: &Remote,
    root: &str,
    urls: &[String],
    filters: &[String],
    wait: bool,
    batch: usize,
) -> anyhow::Result<()> {
    let progress = indicatif::ProgressBar::new(urls.len() as u64);
    progress.set_style(indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} URLs  {per_sec}  eta {eta}  {msg}",
    )?);
    let client = reqwest::Client::new();
    let endpoint = format!("{}/dispatch_process", remote.base(config));
    let mut failed = 0;
    for chunk in urls.chunks(batch) {
        let body = serde_json::json!({
            "root": root,
            "images": chunk,
            "filters": if filters.is_empty() { None } else { Some(filters) },
            "wait": wait,
        });
        let rows = remote
            .send(config, client.post(&endpoint).json(&body))
            .await?;
        for row in rows.as_array().into_iter().flatten() {
            if row["marking"] == "failed" {
                failed += 1;
            }
            progress.suspend(|| println!("{row}"));
        }
        progress.inc(chunk.len() as u64);
        if failed > 0 {
            progress.set_message(format!("{failed} failed"));
        }
    }
    progress.finish();
    // A script that pushes a list must learn that some of it did not take.
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} URLs failed (marking \"failed\" above)",
            urls.len()
        );
    }
    Ok(())
}
