//! The `warden` command: a thin shell over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` for command output, but a reader that went away (`| head`)
/// ends the program quietly instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}
use warden::app;
use warden::config::Config;

// mimalloc: measurably fewer CPU cycles per request than glibc's allocator
// for the many short-lived allocations of a proxy.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Warden: a secure gateway for AI model serving.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gateway with a configuration file (SIGHUP reloads it).
    Serve {
        /// Path of the YAML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the gateway on its embedded demo configuration, with embedded
    /// demo model servers, and print keys and commands to try.
    Demo {
        /// Public listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listener (metrics, health).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        /// Chat simulator upstream.
        #[arg(long, default_value = "127.0.0.1:8081")]
        chat_upstream: SocketAddr,
        /// Fraud-model upstream.
        #[arg(long, default_value = "127.0.0.1:8082")]
        fraud_upstream: SocketAddr,
        /// Demo token issuer (serves its JWKS).
        #[arg(long, default_value = "127.0.0.1:8083")]
        issuer: SocketAddr,
        /// Directory for the demo's audit log.
        #[arg(long)]
        audit_dir: Option<PathBuf>,
    },
    /// Manage API keys in the configuration's key store.
    Keys {
        /// Path of the YAML configuration (its `key_store` is used).
        #[arg(long, short)]
        config: PathBuf,
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Test and explain the configuration's Cedar policies.
    Policy {
        /// Path of the YAML configuration (its `policy.cedar` is used).
        #[arg(long, short)]
        config: PathBuf,
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Print the usage ledger: requests, tokens, compute seconds and
    /// dollars per day, principal, tenant and model (JSON). With a Redis
    /// limit store it is read from Redis; with the in-memory store, from the
    /// running gateway's admin API (token in `WARDEN_ADMIN_TOKEN`).
    Usage {
        /// Path of the YAML configuration (its `limits` are used).
        #[arg(long, short)]
        config: PathBuf,
        /// First day, `YYYY-MM-DD` (UTC); default: `--to`.
        #[arg(long)]
        from: Option<String>,
        /// Last day, `YYYY-MM-DD` (UTC); default: today.
        #[arg(long)]
        to: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this principal.
        #[arg(long)]
        principal: Option<String>,
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
    },
    /// Input profiles of tabular models, for out-of-distribution detection.
    Profile {
        #[command(subcommand)]
        action: ProfileAction,
    },
    /// Check a configuration file and report every error in it.
    Check {
        /// Path of the YAML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ProfileAction {
    /// Build a feature profile (ranges, quantiles, vocabularies, mean and
    /// covariance) from a CSV or JSONL sample of legitimate inputs.
    Build {
        /// The sample: `.csv` with a header row, or `.jsonl`.
        #[arg(long)]
        input: PathBuf,
        /// Where to write the profile (JSON).
        #[arg(long)]
        output: PathBuf,
        /// The features to profile, in order (default: every column).
        #[arg(long, value_delimiter = ',')]
        features: Option<Vec<String>>,
        /// Features to treat as categorical even if they look numeric.
        #[arg(long, value_delimiter = ',')]
        categorical: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyAction {
    /// Run test cases (request → expected decision); exits non-zero on any failure.
    Test {
        /// YAML files, each a list of cases.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show the decision for each case in a file and the policies that made it.
    Explain {
        /// A YAML file of cases (`expect` is optional).
        file: PathBuf,
    },
    /// List the kept policy versions (sequence, hash, load time).
    History,
    /// Write a kept version back over the active policy file; it takes
    /// effect when the gateway reloads (at once when it watches the file,
    /// else at SIGHUP).
    Rollback {
        /// The version's sequence number.
        sequence: u64,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Create a key; it is printed once and never again.
    Create {
        /// Who the key belongs to.
        #[arg(long)]
        principal: String,
        /// Tenant the key acts for (repeat for several; the first is the default).
        #[arg(long = "tenant", required = true)]
        tenants: Vec<String>,
        /// Service tier.
        #[arg(long)]
        tier: Option<String>,
        /// Model the key may call (repeat; `*` for all).
        #[arg(long = "model", required = true)]
        models: Vec<String>,
        /// Scope granted (repeat).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Lifetime, e.g. `90d`.
        #[arg(long)]
        expires_in: Option<humantime::Duration>,
    },
    /// List every key (never the keys themselves).
    List,
    /// Show one key's record.
    Show {
        /// Key id.
        kid: String,
    },
    /// Revoke a key on every instance sharing the store.
    Revoke {
        /// Key id.
        kid: String,
    },
    /// Replace a key; the old one keeps working for the rotation overlap.
    Rotate {
        /// Key id.
        kid: String,
        /// Overrides `key_store.rotation_overlap`, e.g. `1h`.
        #[arg(long)]
        overlap: Option<humantime::Duration>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    if rustls::crypto::aws_lc_rs::default_provider().install_default().is_err() {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Keys { config, action } => run(keys(config, action)),
        Command::Policy { config, action } => policy(&config, action),
        Command::Profile {
            action:
                ProfileAction::Build {
                    input,
                    output,
                    features,
                    categorical,
                },
        } => {
            let options = warden::validate::ood::BuildOptions {
                features,
                categorical,
                ..Default::default()
            };
            match warden::validate::ood::build_from_file(&input, &options).and_then(|p| {
                p.save(&output)?;
                Ok(p)
            }) {
                Ok(p) => {
                    println!(
                        "{}: {} features from {} rows, threshold {:.3}",
                        output.display(),
                        p.features().len(),
                        p.sample_rows(),
                        p.threshold()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Usage {
            config,
            from,
            to,
            tenant,
            principal,
            model,
        } => {
            let query: Vec<(&str, String)> = [
                ("from", from),
                ("to", to),
                ("tenant", tenant),
                ("principal", principal),
                ("model", model),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
            run(usage(config, query))
        }
        Command::Serve { config } => run(serve(config)),
        Command::Demo {
            listen,
            admin,
            chat_upstream,
            fraud_upstream,
            issuer,
            audit_dir,
        } => run(demo(
            app::DemoAddresses {
                gateway: listen,
                admin,
                chat: chat_upstream,
                fraud: fraud_upstream,
                issuer,
            },
            audit_dir,
        )),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            say!(
                "{}: ok ({} models, {} API keys)",
                path.display(),
                config.models.len(),
                config.api_keys.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            ExitCode::FAILURE
        }
    }
}

fn policy(path: &std::path::Path, action: PolicyAction) -> ExitCode {
    use warden::authz::cases::{self, Expect};
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: invalid configuration:\n{e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let (Some(pdp), Some(policy_file)) = (config.policy, config.policy_file) else {
        eprintln!("{} has no `policy.cedar` section", path.display());
        return ExitCode::FAILURE;
    };
    let history = warden::authz::history::dir_for(&policy_file);
    let files = match &action {
        PolicyAction::Test { files } => files.clone(),
        PolicyAction::Explain { file } => vec![file.clone()],
        PolicyAction::History => {
            return match warden::authz::history::list(&history) {
                Ok(versions) => {
                    print(&versions);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", history.display());
                    ExitCode::FAILURE
                }
            };
        }
        PolicyAction::Rollback { sequence } => {
            return match warden::authz::history::rollback(&history, *sequence, &policy_file) {
                Ok(version) => {
                    say!(
                        "{} now holds policy version {} ({}); a gateway watching the file applies it now, otherwise send it SIGHUP",
                        policy_file.display(),
                        version.sequence,
                        version.hash
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for file in files {
        let cases = match cases::load(&file) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        for case in cases {
            let request = match case.request() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {}: {e}", case.name);
                    failed += 1;
                    continue;
                }
            };
            let decision = pdp.decide(&request);
            let got = if decision.allowed { Expect::Allow } else { Expect::Deny };
            match &action {
                PolicyAction::Explain { .. } => {
                    let explained = serde_json::json!({
                        "case": case.name,
                        "request": request,
                        "decision": if decision.allowed { "allow" } else { "deny" },
                        "determining_policies": decision.policies,
                        "policy_version": decision.policy_version,
                    });
                    say!("{}", serde_json::to_string_pretty(&explained).unwrap_or_default());
                }
                PolicyAction::History | PolicyAction::Rollback { .. } => {}
                PolicyAction::Test { .. } => match case.expect {
                    Some(want) if want == got => passed += 1,
                    want => {
                        failed += 1;
                        let word = |e: Expect| if e == Expect::Allow { "allow" } else { "deny" };
                        say!(
                            "FAIL {}: expected {}, got {} (policies: {:?})",
                            case.name,
                            want.map_or("a decision (no `expect` given)", word),
                            word(got),
                            decision.policies
                        );
                    }
                },
            }
        }
    }
    if matches!(action, PolicyAction::Test { .. }) {
        say!("policy: {passed} passed, {failed} failed");
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(job: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(job) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    let running = app::start(config, Some(path)).await?;
    running.run_until_signal().await
}

async fn demo(addresses: app::DemoAddresses, audit_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let audit_dir = audit_dir.unwrap_or_else(|| std::env::temp_dir().join("warden-demo"));
    std::fs::create_dir_all(&audit_dir)?;
    let (running, bound) = app::start_demo(&addresses, &audit_dir).await?;
    let audit_file = running.gateway.runtime().config.audit_file.clone();
    say!("{}", app::demo_banner(&bound, &audit_file));
    running.run_until_signal().await
}

async fn usage(path: PathBuf, query: Vec<(&str, String)>) -> anyhow::Result<()> {
    use warden::admin::usage::{Query, report};
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    let limits = config
        .limits
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{} has no `limits` section, so no usage is kept", path.display()))?;
    let encoded: String = query
        .iter()
        .map(|(k, v)| format!("{k}={}", percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let report = match &limits.redis {
        Some(redis) => {
            let parsed = Query::parse(&encoded).map_err(|e| anyhow::anyhow!(e))?;
            let store = warden::limits::redis::RedisStore::connect(&redis.url, &redis.prefix).await?;
            let rows = store.ledger(&parsed.from, &parsed.to).await?;
            report(&parsed, rows)
        }
        None => {
            // The in-memory ledger lives in the running gateway.
            let token = std::env::var("WARDEN_ADMIN_TOKEN").map_err(|_| {
                anyhow::anyhow!(
                    "the in-memory ledger is read from the running gateway: set WARDEN_ADMIN_TOKEN to its admin token"
                )
            })?;
            let url = format!("http://{}/admin/v1/usage?{encoded}", config.admin_address);
            let response = reqwest::Client::new().get(&url).bearer_auth(token).send().await?;
            let status = response.status();
            let body: serde_json::Value = response.json().await?;
            if !status.is_success() {
                anyhow::bail!("{url}: {status}: {body}");
            }
            body
        }
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Percent-encodes a query value (everything but unreserved characters).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

async fn keys(path: PathBuf, action: KeysAction) -> anyhow::Result<()> {
    use warden::authn::key_store::{KeySpec, KeyStore};
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    let settings = config
        .key_store
        .ok_or_else(|| anyhow::anyhow!("{} has no `key_store` section", path.display()))?;
    let store = KeyStore::open(&settings.url).await?;
    match action {
        KeysAction::Create {
            principal,
            tenants,
            tier,
            models,
            scopes,
            expires_in,
        } => {
            let spec = KeySpec {
                principal,
                tenants,
                tier,
                models,
                scopes,
                expires_in: expires_in.map(Into::into),
            };
            let (new, record) = store.create(&spec).await?;
            print(&serde_json::json!({ "key": new.key, "record": record }));
            eprintln!("The key is shown once: store it now. Only its SHA-256 is kept.");
        }
        KeysAction::List => print(&store.list().await?),
        KeysAction::Show { kid } => print(&store.show(&kid).await?),
        KeysAction::Revoke { kid } => print(&store.revoke(&kid).await?),
        KeysAction::Rotate { kid, overlap } => {
            let overlap = overlap.map_or(settings.rotation_overlap, Into::into);
            let (new, record) = store.rotate(&kid, overlap).await?;
            print(
                &serde_json::json!({ "key": new.key, "record": record, "old_key_valid_for_secs": overlap.as_secs() }),
            );
            eprintln!("The new key is shown once: store it now.");
        }
    }
    Ok(())
}

/// Prints what a keys command returns, as pretty JSON.
fn print<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => say!("{text}"),
        Err(e) => eprintln!("error: cannot print the result: {e}"),
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
