//! Join tokens for machines outside Kubernetes: single use, short-lived.
//!
//! A token is 32 random bytes (base64url) shown once to the operator; the
//! authority stores only its SHA-256, as `<hash>.json` in the join-token
//! directory. Redeeming renames the file to `<hash>.used` first: `rename` is
//! atomic, so of two replicas (or two racing requests) sharing the directory
//! exactly one wins, and a token can never be used twice.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};

use crate::clock::unix_seconds;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("node name {0:?} must be 1-253 letters, digits, '-', '.' or '_'")]
    NodeName(String),
    #[error("system RNG failed")]
    Rng,
    #[error("unknown or already used join token")]
    Unknown,
    #[error("the join token has expired")]
    Expired,
    #[error("join tokens: {0}")]
    Api(String),
    #[error("join token store: {0}")]
    Store(#[from] crate::fsutil::FsError),
    #[error("join token {}: corrupt: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct Stored {
    node: String,
    expires: u64,
}

/// Creates a token for node `name`, valid for `ttl`; returns the token.
pub fn create(dir: &Path, name: &str, ttl: Duration, now: SystemTime) -> Result<String, JoinError> {
    check_node_name(name)?;
    crate::fsutil::create_private_dir(dir)?;
    let token = new_token()?;
    let stored = Stored {
        node: name.to_string(),
        expires: unix_seconds(now) + ttl.as_secs(),
    };
    // A two-field struct of a string and a number: serialising cannot fail.
    let body = serde_json::to_vec(&stored).unwrap_or_default();
    let path = path_for(dir, &token, "json");
    crate::fsutil::write_private_atomic(&path, &body)
        .map_err(|e| crate::fsutil::FsError::io(&path, e))?;
    Ok(token)
}

/// Node names: 1-253 letters, digits, `-`, `.`, `_`.
pub fn check_node_name(name: &str) -> Result<(), JoinError> {
    if name.is_empty()
        || name.len() > 253
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(JoinError::NodeName(name.to_string()));
    }
    Ok(())
}

/// 32 random bytes, base64url: a new join token.
pub fn new_token() -> Result<String, JoinError> {
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| JoinError::Rng)?;
    Ok(B64URL.encode(raw))
}

fn path_for(dir: &Path, token: &str, ext: &str) -> PathBuf {
    dir.join(format!(
        "{}.{ext}",
        crate::audit::sha256_hex(token.as_bytes())
    ))
}

/// Redeems `token` once; returns the node name it was made for.
pub fn redeem(dir: &Path, token: &str, now: SystemTime) -> Result<String, JoinError> {
    // Hashing first means a malformed token is just an unknown one.
    let fresh = path_for(dir, token, "json");
    let used = path_for(dir, token, "used");
    std::fs::rename(&fresh, &used).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => JoinError::Unknown,
        _ => crate::fsutil::FsError::io(dir, e).into(),
    })?;
    let body = std::fs::read(&used).map_err(|e| crate::fsutil::FsError::io(&used, e))?;
    let stored: Stored = serde_json::from_slice(&body).map_err(|source| JoinError::Corrupt {
        path: used.clone(),
        source,
    })?;
    if unix_seconds(now) >= stored.expires {
        return Err(JoinError::Expired);
    }
    Ok(stored.node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_works_once_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("join");
        let now = crate::clock::Clock::now(&crate::clock::SystemClock);
        let t = create(&d, "vm-1", Duration::from_secs(600), now).unwrap();
        assert_eq!(redeem(&d, &t, now).unwrap(), "vm-1");
        assert!(matches!(redeem(&d, &t, now), Err(JoinError::Unknown)));
        assert!(redeem(&d, "garbage", now).is_err());
        let late = create(&d, "vm-2", Duration::from_secs(60), now).unwrap();
        let err = redeem(&d, &late, now + Duration::from_secs(61)).unwrap_err();
        assert!(matches!(err, JoinError::Expired), "{err}");
        assert!(create(&d, "a/b", Duration::from_secs(60), now).is_err());
        // Only hashes are stored: the token itself is nowhere on disk.
        for f in std::fs::read_dir(&d).unwrap() {
            let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
            assert!(!text.contains(&t));
        }
    }
}
