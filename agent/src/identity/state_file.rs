//! `data_dir/authority.json`: the keys a single-node authority generated,
//! kept across restarts (0600, atomic write + fsync) unless
//! `authority.persist = false`.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::key_files::Rings;
use super::keyring::{KeyRing, KeyTimes};
use super::keys::{CaKey, JwtKey};
use super::signer::SignError;

pub const STATE_FILE: &str = "authority.json";

#[derive(Serialize, Deserialize)]
struct PersistedState {
    version: u32,
    cas: Vec<PersistedKey>,
    jwt_keys: Vec<PersistedKey>,
    /// Access-token keys (absent in state written before token exchange existed).
    #[serde(default)]
    access_keys: Vec<PersistedKey>,
    /// WIT-SVID keys (absent in state written before WIT-SVIDs were served).
    #[serde(default)]
    wit_keys: Vec<PersistedKey>,
}

#[derive(Serialize, Deserialize)]
struct PersistedKey {
    times: KeyTimes,
    /// CA certificate DER (base64); empty for JWT keys.
    #[serde(default)]
    cert: String,
    /// JWT key id; empty for CA keys.
    #[serde(default)]
    kid: String,
    /// PKCS#8 DER private key (base64).
    key: String,
}

/// Adds the keys saved in `dir` to `rings` (CAs only when `with_cas`: an
/// operator CA replaces generated ones). A missing file adds nothing.
pub(super) fn load_into(dir: &Path, rings: &mut Rings, with_cas: bool) -> Result<(), SignError> {
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(SignError::file(&path, e)),
    };
    let persisted: PersistedState = serde_json::from_slice(&bytes)
        .map_err(|e| SignError::file(&path, format!("corrupt authority state: {e}")))?;
    if with_cas {
        for k in persisted.cas {
            let cert = B64.decode(&k.cert).map_err(|e| SignError::file(&path, e))?;
            let key = B64.decode(&k.key).map_err(|e| SignError::file(&path, e))?;
            let ca = CaKey::from_parts(cert, key).map_err(|e| SignError::file(&path, e))?;
            rings.cas.keys.push((k.times, Arc::new(ca)));
        }
    }
    for (ring, keys) in [
        (&mut rings.jwt, persisted.jwt_keys),
        (&mut rings.access, persisted.access_keys),
        (&mut rings.wit, persisted.wit_keys),
    ] {
        for k in keys {
            let der = B64.decode(&k.key).map_err(|e| SignError::file(&path, e))?;
            let key = JwtKey::from_pkcs8(k.kid, der)
                .map_err(|e| SignError::file(&path, e.to_string()))?;
            ring.keys.push((k.times, Arc::new(key)));
        }
    }
    Ok(())
}

/// Writes `rings` to `dir` (CAs only when `with_cas`).
pub(super) fn save(dir: &Path, rings: &Rings, with_cas: bool) -> Result<(), SignError> {
    let persisted = PersistedState {
        version: 1,
        cas: if with_cas {
            rings
                .cas
                .keys()
                .map(|(t, k)| PersistedKey {
                    times: *t,
                    cert: B64.encode(&k.cert_der),
                    kid: String::new(),
                    key: B64.encode(&k.key_pkcs8),
                })
                .collect()
        } else {
            Vec::new() // operator keys stay where the operator put them
        },
        jwt_keys: jwt_keys(&rings.jwt),
        access_keys: jwt_keys(&rings.access),
        wit_keys: jwt_keys(&rings.wit),
    };
    let path = dir.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(&persisted).map_err(|e| SignError::file(&path, e))?;
    crate::fsutil::write_private_atomic(&path, &json).map_err(|e| SignError::file(&path, e))
}

fn jwt_keys(ring: &KeyRing<JwtKey>) -> Vec<PersistedKey> {
    ring.keys()
        .map(|(t, k)| PersistedKey {
            times: *t,
            cert: String::new(),
            kid: k.kid().to_string(),
            key: B64.encode(&k.key_pkcs8),
        })
        .collect()
}
