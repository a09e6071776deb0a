//! The running gateway: the current runtime state (checked configuration,
//! key index, upstream clients, audit log), swapped atomically on reload, and
//! the process-wide metrics. A request takes one snapshot of the runtime when
//! it arrives and keeps it to the end, so a reload never changes the rules
//! under a request in flight; the hot path takes no lock to read it.
//!
//! Reloads come from SIGHUP, from the admin API and from a change to a
//! watched policy file ([`watch_policy_files`]); they are taken one at a
//! time, each re-reads the whole configuration, and a failed one leaves the
//! running state untouched.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::admin::metrics::Metrics;
use crate::audit::AuditLog;
use crate::authn::aws::AwsVerifier;
use crate::authn::introspection::Introspector;
use crate::authn::jwt::JwtVerifier;
use crate::authn::key_store::{KeyStore, KeyStoreError};
use crate::authn::lockout::FailureLimiter;
use crate::authn::{KeyIndex, ManagedKeys};
use crate::config::{Config, ConfigErrors};
use crate::limits::admit::Limiter;
use crate::limits::fair::{FairQueue, QueueSettings};
use crate::upstream::UpstreamClient;

/// State built from one configuration.
#[derive(Debug)]
pub struct Runtime {
    /// The checked configuration.
    pub config: Config,
    /// API keys, indexed.
    pub keys: KeyIndex,
    /// One pooled client per upstream, by upstream name.
    pub clients: HashMap<String, UpstreamClient>,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// Keys managed at run time, when a key store is configured.
    pub managed_keys: Option<Arc<ManagedKeys>>,
    /// JWT issuers, when JWT bearer tokens are accepted.
    pub jwt: Option<JwtVerifier>,
    /// Opaque-token introspection, when configured.
    pub introspection: Option<Introspector>,
    /// AWS IAM callers through STS, when configured.
    pub aws: Option<AwsVerifier>,
    /// Failed authentications per source; survives reloads that keep its settings.
    pub lockout: Arc<FailureLimiter>,
    /// The active Cedar policy set's version, when Cedar is the engine.
    pub active_policy: Option<ActivePolicy>,
    /// Limit state, when `limits:` is configured; survives reloads that
    /// keep its store.
    pub limiter: Option<Arc<Limiter>>,
    /// Each model endpoint's capacity and fair queue, by model name;
    /// survives reloads that keep its settings, so slots in use stay
    /// counted.
    pub queues: HashMap<String, Arc<FairQueue>>,
}

/// The active Cedar policy set, as the admin API reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ActivePolicy {
    /// Content hash, as in decisions' `policy_version`.
    pub version: String,
    /// Its sequence number in the version history; `None` when the history
    /// could not be written.
    pub sequence: Option<u64>,
    /// When this process started deciding with it, RFC 3339.
    pub loaded_at: String,
}

/// Why a runtime could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    /// The audit log could not be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditOpenError),
    /// An upstream client could not be built.
    #[error("upstream `{0}`: {1}")]
    Client(String, std::io::Error),
    /// The key store could not be opened or read.
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    /// The limit store could not be reached.
    #[error("limits store: {0}")]
    Limits(#[from] crate::limits::redis::RedisStoreError),
    /// A model's tokenizer could not be built.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] crate::limits::tokens::TokenError),
}

impl Runtime {
    /// Everything this configuration accepts as proof of a caller.
    pub fn authenticators(&self) -> crate::authn::Authenticators<'_> {
        crate::authn::Authenticators {
            keys: &self.keys,
            managed: self.managed_keys.as_deref(),
            jwt: self.jwt.as_ref(),
            introspection: self.introspection.as_ref(),
            aws: self.aws.as_ref(),
        }
    }

    /// The policy engine in force, if any.
    pub fn pdp(&self) -> Option<crate::authz::Pdp<'_>> {
        if let Some(cedar) = &self.config.policy {
            return Some(crate::authz::Pdp::Cedar(cedar));
        }
        if let Some(opa) = &self.config.opa {
            return Some(crate::authz::Pdp::Opa(opa));
        }
        self.config.authzen.as_deref().map(crate::authz::Pdp::Authzen)
    }

    /// Builds everything a configuration needs. `previous` lends its audit
    /// log when the file is unchanged, so one file never has two writers.
    pub async fn build(config: Config, previous: Option<&Runtime>) -> Result<Runtime, BuildError> {
        let audit = match previous {
            Some(p) if p.audit.path() == config.audit_file => Arc::clone(&p.audit),
            _ => Arc::new(AuditLog::open(&config.audit_file).await?),
        };
        let mut clients = HashMap::new();
        // The models' upstreams, and the review upstreams their input
        // profiles may route to.
        let reviews = config
            .models
            .values()
            .filter_map(|m| m.validation.profile.as_ref().and_then(|p| p.route_to.as_ref()));
        for up in config.models.values().map(|m| &m.upstream).chain(reviews) {
            if !clients.contains_key(&up.name) {
                let client = UpstreamClient::new(up, config.listen.workers)
                    .map_err(|e| BuildError::Client(up.name.clone(), e))?;
                clients.insert(up.name.clone(), client);
            }
        }
        let active_policy = config.policy.as_ref().map(|pdp| {
            let sequence = config.policy_file.as_ref().and_then(|file| {
                let dir = crate::authz::history::dir_for(file);
                match crate::authz::history::record(&dir, pdp.version(), pdp.source()) {
                    Ok(sequence) => {
                        tracing::info!(sequence, hash = pdp.version(), "policy set active");
                        Some(sequence)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, dir = %dir.display(), "policy version could not be kept for rollback");
                        None
                    }
                }
            });
            // A reload that leaves the policies as they were keeps their load time.
            let loaded_at = previous
                .and_then(|p| p.active_policy.as_ref())
                .filter(|p| p.version == pdp.version())
                .map_or_else(|| jiff::Timestamp::now().to_string(), |p| p.loaded_at.clone());
            ActivePolicy {
                version: pdp.version().to_owned(),
                sequence,
                loaded_at,
            }
        });
        let managed_keys = match (&config.key_store, previous) {
            (None, _) => None,
            // The same store: keep its cache and refresher.
            (Some(store), Some(p)) if p.config.key_store.as_ref() == Some(store) => p.managed_keys.clone(),
            (Some(store), _) => {
                let opened = KeyStore::open(&store.url).await?;
                Some(ManagedKeys::start(opened, store.refresh_interval).await?)
            }
        };
        let jwt = match &config.jwt {
            None => None,
            Some(settings) => Some(JwtVerifier::start(settings).await),
        };
        let (max_failures, window) = config.listen.auth_failure_limit;
        let lockout = match previous {
            Some(p) if p.lockout.settings() == (max_failures, window) => Arc::clone(&p.lockout),
            _ => Arc::new(FailureLimiter::new(max_failures, window)),
        };
        let introspection = config.introspection.clone().map(Introspector::new);
        let aws = config.aws.clone().map(AwsVerifier::new);
        let limiter = match &config.limits {
            None => None,
            Some(limits) => {
                let settings = limits.redis.as_ref();
                match previous.and_then(|p| p.limiter.as_ref()) {
                    Some(l) if l.serves(settings) => Some(Arc::clone(l)),
                    _ => Some(Arc::new(Limiter::new(settings).await?)),
                }
            }
        };
        if config.limits.as_ref().is_some_and(|l| l.counts_tokens()) {
            // Building an encoding takes a while: not on the first request.
            for model in config.models.values() {
                model.limits.tokenizer.preload()?;
            }
        }
        let mut queues = HashMap::new();
        for model in config.models.values() {
            let Some(capacity) = &model.limits.capacity else {
                continue;
            };
            let settings = QueueSettings {
                capacity: capacity.concurrency,
                max_queue: capacity.queue,
                timeout: capacity.queue_timeout,
                max_queue_per_flow: None,
            };
            let queue = match previous.and_then(|p| p.queues.get(&model.name)) {
                Some(q) if *q.settings() == settings => Arc::clone(q),
                _ => Arc::new(FairQueue::new(settings)),
            };
            queues.insert(model.name.clone(), queue);
        }
        Ok(Runtime {
            limiter,
            queues,
            active_policy,
            aws,
            introspection,
            lockout,
            jwt,
            managed_keys,
            keys: KeyIndex::new(&config.api_keys),
            config,
            clients,
            audit,
        })
    }
}

/// The gateway shared by every connection.
#[derive(Debug)]
pub struct Gateway {
    runtime: ArcSwap<Runtime>,
    /// Process-wide metrics; they survive reloads.
    pub metrics: Arc<Metrics>,
    config_path: Option<PathBuf>,
    draining: AtomicBool,
    /// Held for the length of a reload: two at once (SIGHUP and a file
    /// change, say) could otherwise finish out of order and leave the older
    /// reading of the files in force.
    reload_lock: tokio::sync::Mutex<()>,
    /// Counts successful reloads, so the file watcher learns of new paths.
    reloads: watch::Sender<u64>,
}

/// Why a rollback through [`Gateway::rollback_policy`] did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// The gateway has no Cedar policy file, or no configuration file to reload from.
    #[error("no `policy.cedar` policy file to roll back")]
    NoPolicyFile,
    /// The version is not stored, or the files could not be written.
    #[error(transparent)]
    History(#[from] crate::authz::history::RollbackError),
    /// The restored version was refused on reload; the active one stays and
    /// the policy file holds what it held before.
    #[error(transparent)]
    Reload(#[from] BuildError),
}

impl Gateway {
    /// A gateway serving `runtime`, reloadable from `config_path` if given.
    pub fn new(runtime: Runtime, config_path: Option<PathBuf>) -> Gateway {
        Gateway {
            runtime: ArcSwap::from_pointee(runtime),
            metrics: Arc::new(Metrics::new()),
            config_path,
            draining: AtomicBool::new(false),
            reload_lock: tokio::sync::Mutex::new(()),
            reloads: watch::Sender::new(0),
        }
    }

    /// The current runtime state.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Whether the gateway takes traffic.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }

    /// Marks the gateway as draining: readiness turns false.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether [`Gateway::reload`] has a file to read.
    pub fn reloadable(&self) -> bool {
        self.config_path.is_some()
    }

    /// Re-reads the configuration file and swaps in the new state. On any
    /// error the old state keeps serving and the error is returned.
    pub async fn reload(&self) -> Result<(), BuildError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        self.reload_locked().await
    }

    /// Writes stored policy version `sequence` over the policy file (as
    /// `warden policy rollback` does) and reloads at once. If the reload
    /// refuses it, the file gets its previous content back, so the file on
    /// disk and the set in force do not part ways.
    pub async fn rollback_policy(&self, sequence: u64) -> Result<crate::authz::history::Version, RollbackError> {
        use crate::authz::history;
        let _one_at_a_time = self.reload_lock.lock().await;
        let runtime = self.runtime();
        let (Some(file), true) = (runtime.config.policy_file.as_ref(), self.reloadable()) else {
            return Err(RollbackError::NoPolicyFile);
        };
        // A missing or unreadable file is no reason to refuse a rollback;
        // there is just nothing to put back if it is refused.
        let before = std::fs::read_to_string(file).ok();
        let version = history::rollback(&history::dir_for(file), sequence, file)?;
        if let Err(e) = self.reload_locked().await {
            if let Some(before) = before
                && let Err(io) = history::replace(file, &before)
            {
                tracing::error!(error = %io, file = %file.display(), "the policy file could not be restored after a refused rollback");
            }
            return Err(e.into());
        }
        tracing::info!(sequence, hash = version.hash, "policy rolled back");
        Ok(version)
    }

    async fn reload_locked(&self) -> Result<(), BuildError> {
        let Some(path) = &self.config_path else {
            return Ok(());
        };
        let result = async {
            let config = Config::load(path)?;
            let current = self.runtime();
            if config.listen.address != current.config.listen.address
                || config.admin_address != current.config.admin_address
            {
                tracing::warn!("listener addresses changed: they take effect at the next restart");
            }
            Runtime::build(config, Some(&current)).await
        }
        .await;
        match result {
            Ok(runtime) => {
                self.runtime.store(Arc::new(runtime));
                self.metrics.reload(true);
                self.reloads.send_modify(|n| *n += 1);
                tracing::info!(path = %path.display(), "configuration reloaded");
                Ok(())
            }
            Err(e) => {
                self.metrics.reload(false);
                tracing::error!(path = %path.display(), error = %e, "configuration reload failed; the previous configuration keeps serving");
                Err(e)
            }
        }
    }
}

/// How long the watched files must be quiet before a change is acted on: a
/// save or a copy is several file-system events within milliseconds.
const WATCH_DEBOUNCE: Duration = Duration::from_millis(200);

/// How often the files are read when the system cannot report changes.
const WATCH_POLL: Duration = Duration::from_secs(2);

/// Reloads the configuration when a watched policy file (`policy.cedar`
/// policies, schema, shadow policies; see `Config::policy_watch`) changes,
/// until `shutdown` turns true or its sender is gone.
///
/// Why this shape: the file-system notifications (`notify`, debounced)
/// watch each file's *directory*, not the file, because editors, `cp` over
/// rename, `warden policy rollback` and Kubernetes ConfigMap updates all
/// replace the file (a rename, or a swap of the `..data` symlink beside it),
/// which a watch on the file itself silently stops following. Any event in
/// such a directory only prompts a re-read: a reload happens when the
/// SHA-256 of a watched file's content differs from the last one seen, so
/// unrelated files in the directory (an audit log, say) and a touch without
/// change cost a hash and nothing more. Where notifications are unavailable
/// (inotify limits, some network file systems) the same comparison runs on
/// a poll every [`WATCH_POLL`].
///
/// An empty or unreadable file is taken for a write in progress and waited
/// out (an empty policy set is valid Cedar and would deny everything); SIGHUP
/// and the admin API still apply one. The configuration file itself is not
/// watched: it holds listeners, keys and upstreams, whose changes are an
/// operator's deliberate step, taken with SIGHUP or the admin API. A policy
/// change does reload the whole configuration, as SIGHUP does.
pub async fn watch_policy_files(gateway: Arc<Gateway>, mut shutdown: watch::Receiver<bool>) {
    use notify_debouncer_mini::notify::RecursiveMode;
    if !gateway.reloadable() {
        return;
    }
    let (tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
    // Made when there is first something to watch: each is an inotify
    // instance, of which a user has few, and most gateways watch nothing.
    let mut debouncer = None;
    let mut reloads = gateway.reloads.subscribe();
    let mut poll = tokio::time::interval(WATCH_POLL);
    let mut polling = false;
    let mut watched_dirs: HashSet<PathBuf> = HashSet::new();
    // Content hashes, in the form of a policy set's version (16 hex digits
    // of the SHA-256), so that the policy file's can start as the version
    // actually loaded.
    let mut seen: HashMap<PathBuf, String> = HashMap::new();
    loop {
        // The files to watch follow the configuration in force.
        let runtime = gateway.runtime();
        let files = runtime.config.policy_watch.clone();
        // A change made between loading the policy file and reading it
        // here is still seen: its last-seen hash is that of what was loaded.
        if let (Some(file), Some(active)) = (&runtime.config.policy_file, &runtime.active_policy)
            && files.contains(file)
        {
            seen.entry(file.clone()).or_insert_with(|| active.version.clone());
        }
        drop(runtime);
        let dirs: HashSet<PathBuf> = files
            .iter()
            .map(|f| f.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf))
            .collect();
        if debouncer.is_none() && !dirs.is_empty() && !polling {
            let tx = tx.clone();
            match notify_debouncer_mini::new_debouncer(WATCH_DEBOUNCE, move |_events| {
                // Full means a check is already due, which will see this change too.
                let _ = tx.try_send(());
            }) {
                Ok(d) => debouncer = Some(d),
                Err(e) => {
                    tracing::warn!(error = %e, "file-system notifications unavailable: policy files are polled");
                    polling = true;
                }
            }
        }
        if let Some(debouncer) = debouncer.as_mut() {
            for gone in watched_dirs.difference(&dirs) {
                let _ = debouncer.watcher().unwatch(gone);
            }
            for new in dirs.difference(&watched_dirs) {
                if let Err(e) = debouncer.watcher().watch(new, RecursiveMode::NonRecursive) {
                    tracing::warn!(error = %e, dir = %new.display(), "cannot watch for policy changes: polling instead");
                    polling = true;
                }
            }
        }
        watched_dirs = dirs;
        seen.retain(|f, _| files.contains(f));
        let current = read_hashes(&files).await;
        if let Some(current) = current {
            let mut differs = false;
            for (file, hash) in current {
                // Another file new to the watch (the schema) is taken as it
                // is: it was just loaded.
                if seen.insert(file, hash.clone()).is_some_and(|old| old != hash) {
                    differs = true;
                }
            }
            if differs {
                tracing::info!("a policy file changed: reloading");
                // Errors are logged and counted by `reload`; the active set stays.
                let _ = gateway.reload().await;
            }
        }
        tokio::select! {
            Some(()) = changed.recv() => {}
            _ = poll.tick(), if polling => {}
            Ok(()) = reloads.changed() => {}
            stop = shutdown.changed() => {
                if stop.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

/// The SHA-256 of each file's content, or `None` while one is missing or
/// empty (mid-write or mid-rename).
async fn read_hashes(files: &[PathBuf]) -> Option<Vec<(PathBuf, String)>> {
    let mut hashes = Vec::with_capacity(files.len());
    for file in files {
        match tokio::fs::read(file).await {
            Ok(bytes) if !bytes.is_empty() => hashes.push((file.clone(), hex::encode(&Sha256::digest(&bytes)[..8]))),
            Ok(_) => {
                tracing::debug!(file = %file.display(), "policy file empty: waiting for its content");
                return None;
            }
            Err(e) => {
                tracing::debug!(file = %file.display(), error = %e, "policy file unreadable: waiting");
                return None;
            }
        }
    }
    Some(hashes)
}
