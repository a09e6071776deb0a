//! Policy versions, kept so that any recent one can be restored. Each policy
//! set that becomes active is copied into the history directory as
//! `<sequence>-<hash>.cedar` (sequence numbers grow by one for every new
//! content; reactivating the newest content adds nothing), and the copy's
//! time is its load time. `warden policy history` lists them and `warden
//! policy rollback SEQ` writes one back over the active policy file, to take
//! effect at the next reload (SIGHUP, or at once when the file is watched).
//! The admin API does both in one step (`POST /admin/v1/policy/rollback/SEQ`,
//! [`crate::admin::policy`]).

use std::path::{Path, PathBuf};

/// How many versions are kept.
pub const KEEP: usize = 20;

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Version {
    /// Sequence number.
    pub sequence: u64,
    /// Content hash (as in decisions' `policy_version`).
    pub hash: String,
    /// When it was first activated, RFC 3339.
    pub loaded_at: String,
    /// The stored copy.
    #[serde(skip)]
    pub path: PathBuf,
}

/// The stored versions, oldest first.
pub fn list(dir: &Path) -> std::io::Result<Vec<Version>> {
    let mut versions = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(versions),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((sequence, hash)) = name.strip_suffix(".cedar").and_then(|stem| stem.split_once('-')) else {
            continue;
        };
        let Ok(sequence) = sequence.parse::<u64>() else {
            continue;
        };
        let loaded_at = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| jiff::Timestamp::try_from(t).ok())
            .map(|t| t.to_string())
            .unwrap_or_default();
        versions.push(Version {
            sequence,
            hash: hash.to_owned(),
            loaded_at,
            path: entry.path(),
        });
    }
    versions.sort_by_key(|v| v.sequence);
    Ok(versions)
}

/// Records `source` (whose hash is `hash`) as the active version; returns
/// its sequence number.
pub fn record(dir: &Path, hash: &str, source: &str) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let versions = list(dir)?;
    if let Some(latest) = versions.last()
        && latest.hash == hash
    {
        return Ok(latest.sequence);
    }
    let sequence = versions.last().map_or(1, |v| v.sequence + 1);
    let path = dir.join(format!("{sequence:06}-{hash}.cedar"));
    let temp = dir.join(format!(".{sequence:06}.tmp"));
    std::fs::write(&temp, source)?;
    std::fs::rename(&temp, &path)?;
    let excess = (versions.len() + 1).saturating_sub(KEEP);
    for old in versions.iter().take(excess) {
        let _ = std::fs::remove_file(&old.path);
    }
    Ok(sequence)
}

/// Why a version could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// No stored version has that sequence number.
    #[error("no stored policy version {0}")]
    Unknown(u64),
    /// The history or the active file could not be read or written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Writes version `sequence` over `active` (atomically, by rename).
pub fn rollback(dir: &Path, sequence: u64, active: &Path) -> Result<Version, RollbackError> {
    let version = list(dir)?
        .into_iter()
        .find(|v| v.sequence == sequence)
        .ok_or(RollbackError::Unknown(sequence))?;
    let text = std::fs::read_to_string(&version.path)?;
    replace(active, &text)?;
    Ok(version)
}

/// Writes `text` over `active` atomically: a watcher or a reload sees the
/// old content or the new, never half of it.
pub fn replace(active: &Path, text: &str) -> std::io::Result<()> {
    let temp = active.with_extension("rollback.tmp");
    std::fs::write(&temp, text)?;
    std::fs::rename(&temp, active)
}

/// The history directory for a policy file: beside it, `<file>.history`.
pub fn dir_for(policies: &Path) -> PathBuf {
    let mut name = policies.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".history");
    policies.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_numbered_kept_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let history = dir.path().join("h");
        assert_eq!(record(&history, "aaaa", "v1").unwrap(), 1);
        assert_eq!(
            record(&history, "aaaa", "v1").unwrap(),
            1,
            "the same content is not a new version"
        );
        assert_eq!(record(&history, "bbbb", "v2").unwrap(), 2);
        let active = dir.path().join("active.cedar");
        std::fs::write(&active, "v2").unwrap();
        let restored = rollback(&history, 1, &active).unwrap();
        assert_eq!(restored.hash, "aaaa");
        assert_eq!(std::fs::read_to_string(&active).unwrap(), "v1");
        assert!(rollback(&history, 9, &active).is_err());
        for i in 0..30 {
            record(&history, &format!("h{i}"), "x").unwrap();
        }
        assert_eq!(list(&history).unwrap().len(), KEEP);
    }
}
