//! Managed API keys on the request path: an in-memory copy of the usable
//! keys of the [`KeyStore`], swapped atomically when the store changes.
//!
//! A refresher task polls the store's fingerprint every `refresh_interval`
//! (1 s by default) and reloads the usable keys when it moves, so a key
//! created, rotated or revoked through any instance sharing the store takes
//! effect everywhere within about one interval — and no request ever waits
//! on the database. If the store cannot be read, the last good copy keeps
//! serving (a revocation is then delayed, and the failure is logged).
//! Last use is recorded in memory and written back every ten refreshes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

use super::key_store::{Fingerprint, KeyRecord, KeyStore, KeyStoreError, now_secs};
use crate::config::{ApiKey, ModelGrant};

/// A usable managed key.
#[derive(Debug)]
pub struct ManagedKey {
    /// Its identity data, shared with the identities it authenticates.
    pub key: Arc<ApiKey>,
    /// Expiry, Unix seconds.
    pub expires_at: Option<i64>,
    /// Last use seen by this instance, Unix seconds (0: not since load).
    pub last_used: AtomicI64,
}

/// The managed keys this instance serves from.
#[derive(Debug)]
pub struct ManagedKeys {
    store: KeyStore,
    by_kid: ArcSwap<HashMap<String, Arc<ManagedKey>>>,
}

impl ManagedKeys {
    /// Loads the usable keys and starts the refresher, which stops when the
    /// returned value is dropped.
    pub async fn start(store: KeyStore, refresh: Duration) -> Result<Arc<ManagedKeys>, KeyStoreError> {
        let fingerprint = store.fingerprint().await?;
        let keys = load(&store, &HashMap::new()).await?;
        let managed = Arc::new(ManagedKeys {
            store,
            by_kid: ArcSwap::from_pointee(keys),
        });
        tokio::spawn(refresh_loop(Arc::downgrade(&managed), fingerprint, refresh));
        Ok(managed)
    }

    /// The key with this id, if usable now.
    pub fn get(&self, kid: &str) -> Option<Arc<ManagedKey>> {
        let key = self.by_kid.load().get(kid).cloned()?;
        match key.expires_at {
            Some(at) if at <= now_secs() => None,
            _ => Some(key),
        }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &KeyStore {
        &self.store
    }
}

async fn refresh_loop(managed: Weak<ManagedKeys>, mut seen: Fingerprint, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        ticker.tick().await;
        ticks += 1;
        let Some(managed) = managed.upgrade() else { return };
        if ticks.is_multiple_of(10) {
            write_last_use(&managed).await;
        }
        match managed.store.fingerprint().await {
            Ok(now) if now == seen => {}
            Ok(now) => {
                let current = managed.by_kid.load_full();
                match load(&managed.store, &current).await {
                    Ok(keys) => {
                        tracing::info!(keys = keys.len(), "managed API keys reloaded");
                        managed.by_kid.store(Arc::new(keys));
                        seen = now;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "managed API keys could not be reloaded; keeping the last good set")
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "key store unreachable; keeping the last good set of keys"),
        }
    }
}

async fn write_last_use(managed: &ManagedKeys) {
    let used: Vec<(String, i64)> = managed
        .by_kid
        .load()
        .iter()
        .filter_map(|(kid, k)| {
            let at = k.last_used.swap(0, Ordering::Relaxed);
            (at > 0).then(|| (kid.clone(), at))
        })
        .collect();
    if !used.is_empty()
        && let Err(e) = managed.store.touch(&used).await
    {
        tracing::warn!(error = %e, "last-use times could not be written to the key store");
    }
}

/// The usable keys, keeping the last-use counters of keys already loaded.
async fn load(
    store: &KeyStore,
    current: &HashMap<String, Arc<ManagedKey>>,
) -> Result<HashMap<String, Arc<ManagedKey>>, KeyStoreError> {
    let mut keys = HashMap::new();
    for record in store.usable().await? {
        let Some(key) = api_key(&record) else {
            tracing::error!(kid = %record.kid, "key store record has an invalid digest; skipped");
            continue;
        };
        let last_used = current
            .get(&record.kid)
            .map_or(0, |k| k.last_used.load(Ordering::Relaxed));
        keys.insert(
            record.kid.clone(),
            Arc::new(ManagedKey {
                key: Arc::new(key),
                expires_at: record.expires_at,
                last_used: AtomicI64::new(last_used),
            }),
        );
    }
    Ok(keys)
}

fn api_key(record: &KeyRecord) -> Option<ApiKey> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(&record.digest, &mut digest).ok()?;
    let models = if record.models.iter().any(|m| m == "*") {
        ModelGrant::All
    } else {
        ModelGrant::Only(record.models.iter().cloned().collect())
    };
    Some(ApiKey {
        id: record.kid.clone(),
        digest,
        principal: record.principal.clone(),
        kind: crate::config::PrincipalKind::Key,
        tenant: record.tenants.first()?.clone(),
        tenants: record.tenants.clone(),
        tier: record.tier.clone(),
        scopes: record.scopes.clone(),
        models,
        ..ApiKey::default()
    })
}
