//! Where managed API keys live: a SQLite file (the embedded default) or a
//! PostgreSQL database shared by several instances. The request path never
//! reads it: [`super::KeyIndex`] is rebuilt from [`KeyStore::active`] when
//! [`KeyStore::fingerprint`], polled every second, changes.
//!
//! Every write sets the row's `version` to the current time in microseconds,
//! so `(count, max(version), sum(version))` changes whenever any row does.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::AnyPool;
use sqlx::Row;
use sqlx::any::{AnyPoolOptions, AnyRow};

use super::key_format;

/// A managed key's record. The key itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyRecord {
    /// Key id.
    pub kid: String,
    /// Lowercase hex SHA-256 of the key.
    #[serde(skip)]
    pub digest: String,
    /// Who the key belongs to.
    pub principal: String,
    /// Tenants the key may act for; the first is its default.
    pub tenants: Vec<String>,
    /// Service tier.
    pub tier: Option<String>,
    /// Models the key may call; `*` means all.
    pub models: Vec<String>,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Expiry, Unix seconds.
    pub expires_at: Option<i64>,
    /// Last use seen by any instance, Unix seconds (updated periodically).
    pub last_used_at: Option<i64>,
    /// `active`, `rotated` (valid until `expires_at`) or `revoked`.
    pub status: String,
    /// The key that replaced this one, after a rotation.
    pub replaced_by: Option<String>,
}

/// What a new key is for.
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    /// Who the key belongs to.
    pub principal: String,
    /// Tenants; at least one.
    pub tenants: Vec<String>,
    /// Service tier.
    pub tier: Option<String>,
    /// Models; at least one (`*` for all).
    pub models: Vec<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Lifetime from creation.
    pub expires_in: Option<Duration>,
}

/// A key store error.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// The database failed.
    #[error("key store: {0}")]
    Database(#[from] sqlx::Error),
    /// No key has that id.
    #[error("no key with id `{0}`")]
    NotFound(String),
    /// The request makes no sense.
    #[error("{0}")]
    Invalid(String),
}

/// A SQLite or PostgreSQL key store, through sqlx's `Any` driver: the same
/// SQL (with `$n` placeholders) runs on both.
#[derive(Debug, Clone)]
pub struct KeyStore {
    pool: AnyPool,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS warden_api_keys (
    kid TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    principal TEXT NOT NULL,
    tenants TEXT NOT NULL,
    tier TEXT,
    models TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,
    status TEXT NOT NULL,
    replaced_by TEXT,
    version BIGINT NOT NULL
)";

/// The columns of a [`KeyRecord`], as a literal so that every statement is
/// a fixed string (sqlx accepts no SQL built at run time).
macro_rules! columns {
    () => {
        "kid, digest, principal, tenants, tier, models, scopes, created_at, expires_at, last_used_at, status, replaced_by"
    };
}

/// A fingerprint of the whole table: changes whenever any row does.
pub type Fingerprint = (i64, i64, i64);

impl KeyStore {
    /// Opens (creating if needed) the store at `url`: `sqlite://PATH` or
    /// `postgres://…`.
    pub async fn open(url: &str) -> Result<KeyStore, KeyStoreError> {
        sqlx::any::install_default_drivers();
        let url = if let Some(path) = url.strip_prefix("sqlite://") {
            // Create the file on first use; WAL lets the CLI write while a
            // gateway reads.
            format!("sqlite://{path}?mode=rwc")
        } else {
            url.to_owned()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&url)
            .await?;
        if url.starts_with("sqlite:") {
            sqlx::query("PRAGMA journal_mode=WAL").execute(&pool).await?;
            sqlx::query("PRAGMA busy_timeout=5000").execute(&pool).await?;
        }
        sqlx::query(SCHEMA).execute(&pool).await?;
        Ok(KeyStore { pool })
    }

    /// Creates a key and returns it: the only time the key itself exists.
    pub async fn create(&self, spec: &KeySpec) -> Result<(key_format::NewKey, KeyRecord), KeyStoreError> {
        if spec.principal.trim().is_empty() {
            return Err(KeyStoreError::Invalid("a key needs a principal".into()));
        }
        if spec.tenants.is_empty() || spec.tenants.iter().any(|t| t.trim().is_empty()) {
            return Err(KeyStoreError::Invalid("a key needs at least one tenant".into()));
        }
        if spec.models.is_empty() {
            return Err(KeyStoreError::Invalid("a key needs at least one model (or `*`)".into()));
        }
        let new = key_format::generate();
        let now = now_secs();
        let record = KeyRecord {
            kid: new.kid.clone(),
            digest: hex::encode(Sha256::digest(new.key.as_bytes())),
            principal: spec.principal.clone(),
            tenants: spec.tenants.clone(),
            tier: spec.tier.clone(),
            models: spec.models.clone(),
            scopes: spec.scopes.clone(),
            created_at: now,
            expires_at: spec
                .expires_in
                .map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
            last_used_at: None,
            status: "active".into(),
            replaced_by: None,
        };
        self.insert(&record).await?;
        Ok((new, record))
    }

    async fn insert(&self, r: &KeyRecord) -> Result<(), KeyStoreError> {
        sqlx::query(concat!(
            "INSERT INTO warden_api_keys (",
            columns!(),
            ", version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ))
        .bind(&r.kid)
        .bind(&r.digest)
        .bind(&r.principal)
        .bind(json_list(&r.tenants))
        .bind(r.tier.clone())
        .bind(json_list(&r.models))
        .bind(json_list(&r.scopes))
        .bind(r.created_at)
        .bind(r.expires_at)
        .bind(r.last_used_at)
        .bind(&r.status)
        .bind(r.replaced_by.clone())
        .bind(version())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every key, newest first.
    pub async fn list(&self) -> Result<Vec<KeyRecord>, KeyStoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM warden_api_keys ORDER BY created_at DESC, kid"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }

    /// One key.
    pub async fn show(&self, kid: &str) -> Result<KeyRecord, KeyStoreError> {
        let row = sqlx::query(concat!("SELECT ", columns!(), " FROM warden_api_keys WHERE kid = $1"))
            .bind(kid)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| KeyStoreError::NotFound(kid.to_owned()))?;
        record(&row)
    }

    /// Keys that may authenticate now: active, or rotated but still within
    /// their overlap, and not expired.
    pub async fn usable(&self) -> Result<Vec<KeyRecord>, KeyStoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM warden_api_keys WHERE status <> 'revoked' AND (expires_at IS NULL OR expires_at > $1)"
        ))
        .bind(now_secs())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }

    /// Revokes a key: it stops working on every instance within a refresh.
    pub async fn revoke(&self, kid: &str) -> Result<KeyRecord, KeyStoreError> {
        let done = sqlx::query("UPDATE warden_api_keys SET status = 'revoked', version = $1 WHERE kid = $2")
            .bind(version())
            .bind(kid)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(KeyStoreError::NotFound(kid.to_owned()));
        }
        self.show(kid).await
    }

    /// Replaces a key with a new one with the same metadata. The old key
    /// keeps working for `overlap`, so clients can switch without an outage.
    pub async fn rotate(&self, kid: &str, overlap: Duration) -> Result<(key_format::NewKey, KeyRecord), KeyStoreError> {
        let old = self.show(kid).await?;
        if old.status == "revoked" {
            return Err(KeyStoreError::Invalid(format!("key `{kid}` is revoked")));
        }
        let remaining = old.expires_at.map(|e| e.saturating_sub(now_secs()).max(0));
        let (new, record) = self
            .create(&KeySpec {
                principal: old.principal.clone(),
                tenants: old.tenants.clone(),
                tier: old.tier.clone(),
                models: old.models.clone(),
                scopes: old.scopes.clone(),
                expires_in: remaining.map(|s| Duration::from_secs(s.unsigned_abs())),
            })
            .await?;
        let overlap_end = now_secs().saturating_add(i64::try_from(overlap.as_secs()).unwrap_or(i64::MAX));
        let old_end = old.expires_at.map_or(overlap_end, |e| e.min(overlap_end));
        sqlx::query(
            "UPDATE warden_api_keys SET status = 'rotated', replaced_by = $1, expires_at = $2, version = $3 WHERE kid = $4",
        )
        .bind(&record.kid)
        .bind(old_end)
        .bind(version())
        .bind(kid)
        .execute(&self.pool)
        .await?;
        Ok((new, record))
    }

    /// Changes whenever any key is created, revoked or rotated.
    pub async fn fingerprint(&self) -> Result<Fingerprint, KeyStoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*), COALESCE(MAX(version), 0), CAST(COALESCE(SUM(version % 1000000007), 0) AS BIGINT) FROM warden_api_keys",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
    }

    /// Records last use (Unix seconds) for keys, without bumping versions:
    /// last use is bookkeeping, not a change anyone must reload for.
    pub async fn touch(&self, used: &[(String, i64)]) -> Result<(), KeyStoreError> {
        for (kid, at) in used {
            sqlx::query(
                "UPDATE warden_api_keys SET last_used_at = $1 WHERE kid = $2 AND (last_used_at IS NULL OR last_used_at < $1)",
            )
            .bind(*at)
            .bind(kid)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }
}

fn record(row: &AnyRow) -> Result<KeyRecord, KeyStoreError> {
    Ok(KeyRecord {
        kid: row.try_get("kid")?,
        digest: row.try_get("digest")?,
        principal: row.try_get("principal")?,
        tenants: parse_list(&row.try_get::<String, _>("tenants")?)?,
        tier: row.try_get("tier")?,
        models: parse_list(&row.try_get::<String, _>("models")?)?,
        scopes: parse_list(&row.try_get::<String, _>("scopes")?)?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        last_used_at: row.try_get("last_used_at")?,
        status: row.try_get("status")?,
        replaced_by: row.try_get("replaced_by")?,
    })
}

fn json_list(items: &[String]) -> String {
    serde_json::Value::from(items.to_vec()).to_string()
}

fn parse_list(text: &str) -> Result<Vec<String>, KeyStoreError> {
    serde_json::from_str(text).map_err(|e| KeyStoreError::Invalid(format!("corrupt list in key store: {e}")))
}

/// Now, in Unix seconds.
pub fn now_secs() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn version() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}
