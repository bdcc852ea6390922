//! Keys an operator keeps in files, never rotated here: an operator CA
//! (`authority.ca_files`), and the fleet authority's key directory (a mounted
//! Secret shared by every replica), with the `tessera authority init` and
//! `rotate-ca` commands that write it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::KeyPair;

use super::jws::JwtKeyType;
use super::keyring::{KeyRing, KeyTimes};
use super::keys::{CaKey, JwtKey};
use super::pem;
use super::signer::SignError;
use crate::clock::unix_seconds;

/// The rings an authority signs with.
pub(super) struct Rings {
    pub cas: KeyRing<CaKey>,
    pub jwt: KeyRing<JwtKey>,
    pub access: KeyRing<JwtKey>,
    /// WIT-SVID keys: generated and rolled over by a single-node agent; at
    /// the fleet authority `wit*.key` of its key directory, optional (a
    /// directory without one serves no WIT-SVIDs: its agents answer the WIT
    /// profile with Unimplemented).
    pub wit: KeyRing<JwtKey>,
}

/// Loads an operator CA: a PEM certificate and a PEM P-256 key in PKCS#8
/// (`BEGIN PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`) form.
pub(super) fn load_operator_ca(
    cert_path: &Path,
    key_path: &Path,
    td: &spiffe::TrustDomain,
) -> Result<(KeyTimes, CaKey), SignError> {
    let cert_pem = std::fs::read(cert_path).map_err(|e| SignError::file(cert_path, e))?;
    let key_pem = std::fs::read(key_path).map_err(|e| SignError::file(key_path, e))?;
    let cert_der = pem::decode_first_cert(&cert_pem).map_err(|e| SignError::file(cert_path, e))?;
    let key_pkcs8 = pem::decode_private_key(&key_pem).map_err(|e| SignError::file(key_path, e))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| SignError::file(cert_path, format!("not an X.509 certificate: {e}")))?;
    match parsed.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => {
            return Err(SignError::file(
                cert_path,
                "certificate is not a CA (basicConstraints cA=true required)",
            ));
        }
    }
    let times = KeyTimes {
        created: parsed.validity().not_before.timestamp().max(0) as u64,
        activate_at: 0,
        not_after: parsed.validity().not_after.timestamp().max(0) as u64,
    };
    let key = KeyPair::try_from(key_pkcs8.as_slice()).map_err(|e| {
        SignError::file(
            key_path,
            format!("unsupported key (Tessera signs with ECDSA P-256): {e}"),
        )
    })?;
    if key.public_key_raw() != parsed.public_key().subject_public_key.data.as_ref() {
        return Err(SignError::file(
            key_path,
            "the key does not match the CA certificate",
        ));
    }
    tracing::debug!(trust_domain = td.as_str(), cert = %cert_path.display(), "loaded a CA from files");
    let ca = CaKey::from_parts(cert_der, key_pkcs8).map_err(|e| SignError::file(cert_path, e))?;
    Ok((times, ca))
}

/// Reads a fleet key directory (see `LocalAuthority::from_key_dir`).
///
/// Keys are ordered by when they appeared: the later of a CA's notBefore and
/// its file's modification time (which a Secret update sets). The first key
/// of each kind signs at once; every later one is published at once but
/// signs only `publish_lead` after it appeared, so applying a Secret long
/// after `rotate-ca` does not shorten the lead. Ties (files written in the
/// same second) put the base file (`ca.crt`, `jwt.key`, `access.key`) first.
pub(super) fn load_key_dir(
    td: &spiffe::TrustDomain,
    dir: &Path,
    publish_lead: Duration,
) -> Result<Rings, SignError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| SignError::file(dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        // Kubernetes Secret mounts hold `..data` symlinks; only plain names count.
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    let lead = publish_lead.as_secs();
    let appeared = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map(unix_seconds)
            .unwrap_or(0)
    };
    let order = |created: u64, name: &str, base: &str| (created, name != base, name.to_string());

    let mut cas = Vec::new();
    for name in names
        .iter()
        .filter(|n| n.starts_with("ca") && n.ends_with(".crt"))
    {
        let path = dir.join(name);
        let key = dir.join(format!("{}.key", name.trim_end_matches(".crt")));
        let (mut times, ca) = load_operator_ca(&path, &key, td)?;
        times.created = times.created.max(appeared(&path));
        cas.push((order(times.created, name, "ca.crt"), times, ca));
    }
    if cas.is_empty() {
        return Err(SignError::file(
            dir,
            "no CA: expected ca.crt and ca.key (see `tessera authority init`)",
        ));
    }
    cas.sort_by(|a, b| a.0.cmp(&b.0));
    let cas = KeyRing {
        keys: cas
            .into_iter()
            .enumerate()
            .map(|(i, (_, mut t, ca))| {
                t.activate_at = if i == 0 { 0 } else { t.created + lead };
                (t, Arc::new(ca))
            })
            .collect(),
        rotates: false,
    };
    let end = cas.keys().map(|(t, _)| t.not_after).max().unwrap_or(0);
    let ring = |prefix: &str, required: bool| -> Result<KeyRing<JwtKey>, SignError> {
        let base = format!("{prefix}.key");
        let mut keys = Vec::new();
        for name in names
            .iter()
            .filter(|n| n.starts_with(prefix) && n.ends_with(".key"))
        {
            let path = dir.join(name);
            let text = std::fs::read(&path).map_err(|e| SignError::file(&path, e))?;
            let der = pem::decode_pkcs8_key(&text).map_err(|e| SignError::file(&path, e))?;
            let probe = JwtKey::from_pkcs8(String::new(), der.clone()).map_err(|e| {
                SignError::file(
                    &path,
                    format!("not a P-256 (ES256) or 2048–4096-bit RSA (RS256) key: {e}"),
                )
            })?;
            // Only JWT-SVIDs may be RS256 (for relying parties that accept
            // nothing else); access tokens and WIT-SVIDs are ES256 only.
            if prefix != "jwt" && probe.public_jwk().alg() != "ES256" {
                return Err(SignError::file(
                    &path,
                    format!("{prefix} keys must be P-256 (ES256); only jwt*.key may be RSA"),
                ));
            }
            let kid = probe.public_jwk().thumbprint();
            let key =
                JwtKey::from_pkcs8(kid, der).map_err(|e| SignError::file(&path, e.to_string()))?;
            keys.push((order(appeared(&path), name, &base), key));
        }
        if keys.is_empty() && required {
            return Err(SignError::file(
                dir,
                format!("no {base} (see `tessera authority init`)"),
            ));
        }
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(KeyRing {
            keys: keys
                .into_iter()
                .enumerate()
                .map(|(i, ((at, _, _), k))| {
                    let times = KeyTimes {
                        created: at,
                        activate_at: if i == 0 { 0 } else { at + lead },
                        not_after: end,
                    };
                    (times, Arc::new(k))
                })
                .collect(),
            rotates: false,
        })
    };
    Ok(Rings {
        jwt: ring("jwt", true)?,
        access: ring("access", true)?,
        wit: ring("wit", false)?,
        cas,
    })
}

fn write_pem(path: &Path, label: &str, der: &[u8]) -> Result<(), SignError> {
    crate::fsutil::write_private_atomic(path, pem::encode(label, der).as_bytes())
        .map_err(|e| SignError::file(path, e))
}

/// Writes a new fleet key directory: `ca.crt`/`ca.key` (a self-signed CA for
/// `td`, valid for `ca_ttl`), `jwt.key`, `access.key` and `wit.key`, all
/// 0600, refusing to overwrite anything.
pub fn init_key_dir(
    td: &spiffe::TrustDomain,
    dir: &Path,
    ca_ttl: Duration,
    now: SystemTime,
) -> Result<(), SignError> {
    init_key_dir_of(td, dir, ca_ttl, now, JwtKeyType::EcP256)
}

/// [`init_key_dir`] with a `jwt.key` of `jwt_key_type` (RSA for relying
/// parties that accept only RS256, such as Microsoft Entra).
pub fn init_key_dir_of(
    td: &spiffe::TrustDomain,
    dir: &Path,
    ca_ttl: Duration,
    now: SystemTime,
    jwt_key_type: JwtKeyType,
) -> Result<(), SignError> {
    let files = ["ca.crt", "ca.key", "jwt.key", "access.key", "wit.key"];
    for f in files {
        if dir.join(f).exists() {
            return Err(SignError::file(
                &dir.join(f),
                "already exists; refusing to overwrite keys",
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| SignError::file(dir, e))?;
    let now = unix_seconds(now);
    let times = KeyTimes {
        created: now,
        activate_at: now,
        not_after: now + ca_ttl.as_secs(),
    };
    let ca = CaKey::generate(td, times)?;
    let jwt = JwtKey::generate_of(jwt_key_type)?;
    let access = JwtKey::generate(times)?;
    let wit = JwtKey::generate(times)?;
    write_pem(&dir.join("ca.crt"), "CERTIFICATE", &ca.cert_der)?;
    write_pem(&dir.join("ca.key"), "PRIVATE KEY", &ca.key_pkcs8)?;
    write_pem(&dir.join("jwt.key"), "PRIVATE KEY", &jwt.key_pkcs8)?;
    write_pem(&dir.join("access.key"), "PRIVATE KEY", &access.key_pkcs8)?;
    write_pem(&dir.join("wit.key"), "PRIVATE KEY", &wit.key_pkcs8)?;
    Ok(())
}

/// Adds a successor CA `ca-<unix time>.crt/.key` to a fleet key directory;
/// returns the certificate's file name.
pub fn add_ca(
    td: &spiffe::TrustDomain,
    dir: &Path,
    ca_ttl: Duration,
    now: SystemTime,
) -> Result<String, SignError> {
    let secs = unix_seconds(now);
    let name = format!("ca-{secs}");
    for ext in ["crt", "key"] {
        let path = dir.join(format!("{name}.{ext}"));
        if path.exists() {
            return Err(SignError::file(&path, "already exists"));
        }
    }
    let ca = CaKey::generate(
        td,
        KeyTimes {
            created: secs,
            activate_at: secs,
            not_after: secs + ca_ttl.as_secs(),
        },
    )?;
    write_pem(
        &dir.join(format!("{name}.crt")),
        "CERTIFICATE",
        &ca.cert_der,
    )?;
    write_pem(
        &dir.join(format!("{name}.key")),
        "PRIVATE KEY",
        &ca.key_pkcs8,
    )?;
    Ok(format!("{name}.crt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `init --jwt-key-type rsa-2048` writes an RSA jwt.key the loader signs
    /// RS256 with (key id: the RFC 7638 thumbprint); an RSA key under any
    /// other prefix is refused, naming the file.
    #[test]
    fn jwt_keys_may_be_rsa_and_no_other_key_may() {
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let ttl = Duration::from_secs(3600);
        #[allow(clippy::disallowed_methods)] // file times, not the agent's clock
        let now = SystemTime::now();
        init_key_dir_of(&td, &keys, ttl, now, JwtKeyType::Rsa2048).unwrap();
        let rings = load_key_dir(&td, &keys, ttl).unwrap();
        let (_, jwt) = rings.jwt.keys().next().unwrap();
        assert_eq!(jwt.key_type(), Some(JwtKeyType::Rsa2048));
        assert_eq!(jwt.kid(), jwt.public_jwk().thumbprint());
        let (_, access) = rings.access.keys().next().unwrap();
        assert_eq!(access.key_type(), Some(JwtKeyType::EcP256));

        std::fs::copy(keys.join("jwt.key"), keys.join("access-2.key")).unwrap();
        let err = load_key_dir(&td, &keys, ttl).err().unwrap().to_string();
        assert!(
            err.contains("access-2.key") && err.contains("only jwt*.key may be RSA"),
            "{err}"
        );
    }
}
