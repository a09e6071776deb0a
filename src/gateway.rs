//! The running gateway: the current runtime state (checked configuration,
//! key index, upstream clients, audit log), swapped atomically on reload, and
//! the process-wide metrics. A request takes one snapshot of the runtime when
//! it arrives and keeps it to the end, so a reload never changes the rules
//! under a request in flight; the hot path takes no lock to read it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use crate::admin::metrics::Metrics;
use crate::audit::AuditLog;
use crate::authn::aws::AwsVerifier;
use crate::authn::introspection::Introspector;
use crate::authn::jwt::JwtVerifier;
use crate::authn::key_store::{KeyStore, KeyStoreError};
use crate::authn::lockout::FailureLimiter;
use crate::authn::{KeyIndex, ManagedKeys};
use crate::config::{Config, ConfigErrors};
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
}

impl Runtime {
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
        for model in config.models.values() {
            let up = &model.upstream;
            if !clients.contains_key(&up.name) {
                let client = UpstreamClient::new(up, config.listen.workers)
                    .map_err(|e| BuildError::Client(up.name.clone(), e))?;
                clients.insert(up.name.clone(), client);
            }
        }
        if let (Some(pdp), Some(file)) = (&config.policy, &config.policy_file) {
            let dir = crate::authz::history::dir_for(file);
            match crate::authz::history::record(&dir, pdp.version(), pdp.source()) {
                Ok(sequence) => tracing::info!(sequence, hash = pdp.version(), "policy set active"),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "policy version could not be kept for rollback")
                }
            }
        }
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
        Ok(Runtime {
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
}

impl Gateway {
    /// A gateway serving `runtime`, reloadable from `config_path` if given.
    pub fn new(runtime: Runtime, config_path: Option<PathBuf>) -> Gateway {
        Gateway {
            runtime: ArcSwap::from_pointee(runtime),
            metrics: Arc::new(Metrics::new()),
            config_path,
            draining: AtomicBool::new(false),
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

    /// Re-reads the configuration file and swaps in the new state. On any
    /// error the old state keeps serving and the error is returned.
    pub async fn reload(&self) -> Result<(), BuildError> {
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
