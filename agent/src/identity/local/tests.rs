use super::*;
use crate::clock::{TokioClock, until};
use crate::identity::Signer;
use crate::identity::jws;
use crate::identity::state_file::STATE_FILE;
use base64::Engine;

fn td() -> spiffe::TrustDomain {
    spiffe::TrustDomain::new("example.org").unwrap()
}

fn settings(dir: Option<&Path>) -> AuthoritySettings {
    AuthoritySettings {
        trust_domain: td(),
        ca_ttl: Duration::from_secs(600),
        jwt_key_ttl: Duration::from_secs(600),
        jwt_key_type: Default::default(),
        state_dir: dir.map(Path::to_path_buf),
        ca_files: None,
    }
}

fn id(path: &str) -> spiffe::SpiffeId {
    spiffe::SpiffeId::new(format!("spiffe://example.org{path}")).unwrap()
}

#[test]
fn x509_svid_passes_the_spiffe_crate_validator() {
    let a = LocalAuthority::load(settings(None), Arc::new(crate::clock::SystemClock)).unwrap();
    let svid = a
        .issue_x509(&id("/workload"), Duration::from_secs(3600))
        .unwrap();
    // Independent judge: rust-spiffe's X509-SVID parser enforces the leaf rules.
    let parsed = spiffe::X509Svid::parse_from_der(&svid.chain_der, &svid.key_pkcs8).unwrap();
    assert_eq!(
        parsed.spiffe_id().to_string(),
        "spiffe://example.org/workload"
    );
    // The bundle parses as X.509 CA certificates for the trust domain.
    let bundle = spiffe::X509Bundle::parse_from_der(td(), &a.trust_store().current().x509).unwrap();
    assert_eq!(bundle.authorities().len(), 1);

    let (_, cert) = x509_parser::parse_x509_certificate(&svid.chain_der).unwrap();
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(
        bc.critical && !bc.value.ca,
        "basicConstraints critical, cA=false"
    );
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);
    let backdate = unix_seconds(crate::clock::SystemClock.now()) as i64
        - cert.validity().not_before.timestamp();
    assert!(
        (20..=40).contains(&backdate),
        "NotBefore backdated ~30s, got {backdate}"
    );
    let other = a
        .issue_x509(&id("/workload"), Duration::from_secs(3600))
        .unwrap();
    let (_, other) = x509_parser::parse_x509_certificate(&other.chain_der).unwrap();
    assert_ne!(cert.raw_serial(), other.raw_serial(), "serials are random");
}

#[test]
fn svid_never_outlives_its_ca() {
    let a = LocalAuthority::load(settings(None), Arc::new(crate::clock::SystemClock)).unwrap();
    let svid = a
        .issue_x509(&id("/w"), Duration::from_secs(100_000))
        .unwrap();
    assert!(svid.not_after <= a.active_ca_expiry().unwrap());
}

#[test]
fn jwt_svid_passes_the_spiffe_crate_validator() {
    let a = LocalAuthority::load(settings(None), Arc::new(crate::clock::SystemClock)).unwrap();
    let jwt = a
        .mint_jwt(&id("/w"), &["db".to_string()], Duration::from_secs(300))
        .unwrap();
    let bundle =
        spiffe::JwtBundle::from_jwt_authorities(td(), &a.trust_store().current().jwks).unwrap();
    let mut set = spiffe::JwtBundleSet::new();
    set.add_bundle(bundle);
    let parsed = spiffe::JwtSvid::parse_and_validate(&jwt.token, &set, &["db"]).unwrap();
    assert_eq!(parsed.spiffe_id().to_string(), "spiffe://example.org/w");
    // Our own validator agrees, and rejects the wrong audience.
    assert!(a.trust_store().validate_jwt(&jwt.token, "db").is_ok());
    assert!(matches!(
        a.trust_store().validate_jwt(&jwt.token, "other"),
        Err(jws::JwtError::Audience(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn keys_are_published_before_they_sign_and_kept_until_expiry() {
    let clock = Arc::new(TokioClock::new());
    let a = LocalAuthority::load(settings(None), clock.clone()).unwrap();
    let first_ca = a.trust_store().current().x509.clone();
    let first_kid = a.trust_store().current().jwt_keys[0].kid.clone();
    // Half-way: the successor appears in the bundle, but the old key signs.
    tokio::time::advance(Duration::from_secs(301)).await;
    a.rotate().unwrap();
    let b = a.trust_store().current();
    assert_eq!(b.jwt_keys.len(), 2);
    assert!(b.x509.len() > first_ca.len());
    let jwt = a
        .mint_jwt(&id("/w"), &["x".into()], Duration::from_secs(60))
        .unwrap();
    assert_eq!(jwt_kid(&jwt.token), first_kid);
    // At two thirds the successor signs; the old key is still published.
    tokio::time::advance(Duration::from_secs(100)).await;
    a.rotate().unwrap();
    let jwt = a
        .mint_jwt(&id("/w"), &["x".into()], Duration::from_secs(60))
        .unwrap();
    assert_ne!(jwt_kid(&jwt.token), first_kid);
    assert_eq!(a.trust_store().current().jwt_keys.len(), 2);
    // After the old key expires it leaves the bundle.
    tokio::time::advance(Duration::from_secs(200)).await;
    a.rotate().unwrap();
    assert!(
        a.trust_store()
            .current()
            .jwt_keys
            .iter()
            .all(|k| k.kid != first_kid)
    );
    assert!(a.trust_store().current().sequence >= 3);
}

fn jwt_kid(token: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
    header["kid"].as_str().unwrap().to_string()
}

#[test]
fn state_persists_privately_and_reloads() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let a = LocalAuthority::load(
        settings(Some(dir.path())),
        Arc::new(crate::clock::SystemClock),
    )
    .unwrap();
    let mode = std::fs::metadata(dir.path().join(STATE_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let b = LocalAuthority::load(
        settings(Some(dir.path())),
        Arc::new(crate::clock::SystemClock),
    )
    .unwrap();
    assert_eq!(
        a.trust_store().current().x509,
        b.trust_store().current().x509
    );
    assert_eq!(
        a.trust_store().current().jwks,
        b.trust_store().current().jwks
    );
    std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
    let err = LocalAuthority::load(
        settings(Some(dir.path())),
        Arc::new(crate::clock::SystemClock),
    )
    .unwrap_err();
    assert!(err.to_string().contains("corrupt authority state"), "{err}");
}

/// Operator CA files made by openssl(1), an independent tool, in both key forms.
#[test]
fn operator_ca_pkcs8_and_sec1() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl(1) is required for this test (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A new P-256 key in SEC1 form (`EC PRIVATE KEY`).
    let ec_key = |file: &str| {
        run(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            file,
        ])
    };
    ec_key("sec1.pem");
    run(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        "sec1.pem",
        "-out",
        "pkcs8.pem",
    ]);
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "sec1.pem",
        "-subj",
        "/O=Ops/CN=Ops CA",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        "ca.pem",
    ]);
    for key in ["sec1.pem", "pkcs8.pem"] {
        let mut s = settings(None);
        s.ca_files = Some((dir.path().join("ca.pem"), dir.path().join(key)));
        let a = LocalAuthority::load(s, Arc::new(crate::clock::SystemClock))
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        let svid = a.issue_x509(&id("/ops"), Duration::from_secs(600)).unwrap();
        spiffe::X509Svid::parse_from_der(&svid.chain_der, &svid.key_pkcs8).unwrap();
        // openssl verifies the leaf against the operator CA.
        let leaf = dir.path().join(format!("leaf-{key}.der"));
        std::fs::write(&leaf, &svid.chain_der).unwrap();
        run(&[
            "x509",
            "-inform",
            "DER",
            "-in",
            leaf.to_str().unwrap(),
            "-out",
            "leaf.pem",
        ]);
        run(&[
            "verify",
            "-CAfile",
            "ca.pem",
            "-purpose",
            "sslclient",
            "leaf.pem",
        ]);
    }
    // A mismatched key and a garbage key are clear errors.
    ec_key("other.pem");
    let mut s = settings(None);
    s.ca_files = Some((dir.path().join("ca.pem"), dir.path().join("other.pem")));
    assert!(
        LocalAuthority::load(s, Arc::new(crate::clock::SystemClock))
            .unwrap_err()
            .to_string()
            .contains("does not match")
    );
    std::fs::write(dir.path().join("junk.pem"), "hello").unwrap();
    let mut s = settings(None);
    s.ca_files = Some((dir.path().join("ca.pem"), dir.path().join("junk.pem")));
    assert!(
        LocalAuthority::load(s, Arc::new(crate::clock::SystemClock))
            .unwrap_err()
            .to_string()
            .contains("PKCS#8")
    );
}

#[tokio::test(start_paused = true)]
async fn expired_jwt_is_rejected_and_ttl_is_clamped_to_the_key() {
    let clock = Arc::new(TokioClock::new());
    let a = LocalAuthority::load(settings(None), clock.clone()).unwrap();
    let jwt = a
        .mint_jwt(&id("/w"), &["db".into()], Duration::from_secs(60))
        .unwrap();
    assert!(a.trust_store().validate_jwt(&jwt.token, "db").is_ok());
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(
        a.trust_store().validate_jwt(&jwt.token, "db").unwrap_err(),
        jws::JwtError::Expired
    );
    // A requested lifetime beyond the signing key's is cut to the key's expiry.
    let long = a
        .mint_jwt(&id("/w"), &["db".into()], Duration::from_secs(100_000))
        .unwrap();
    assert!(until(long.issued_at, long.expires_at) <= Duration::from_secs(600));
}

/// A WIT-SVID checked by jsonwebtoken (a JOSE library we did not write)
/// against the `wit-svid` keys of the bundle; and the `cnf` it carries.
fn verify_wit_with_jsonwebtoken(token: &str, wit_jwks: &[u8]) -> serde_json::Value {
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(wit_jwks).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.typ.as_deref(), Some("wit+jwt"));
    let kid = header.kid.expect("a WIT-SVID names its key");
    let jwk = jwks.find(&kid).expect("signed by a published WIT-SVID key");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .unwrap()
        .claims
}

#[tokio::test(start_paused = true)]
async fn wit_keys_are_their_own_roll_over_with_overlap_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TokioClock::new());
    let a = LocalAuthority::load(settings(Some(dir.path())), clock.clone()).unwrap();
    assert!(a.serves_wit());
    let key = crate::identity::wit::WorkloadKey::generate().unwrap();
    let cnf = key.public_jwk();
    let first = a
        .mint_wit(&id("/w"), &cnf, Duration::from_secs(60))
        .unwrap();
    let b = a.trust_store().current();
    let claims = verify_wit_with_jsonwebtoken(&first.token, &b.wit_jwks);
    assert_eq!(claims["sub"], "spiffe://example.org/w");
    assert_eq!(claims["cnf"]["jwk"], cnf);
    assert!(claims.get("aud").is_none() && claims.get("iss").is_none());
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    // Its own keys: none is a JWT-SVID key, and the JWT-SVID JWKS does not
    // verify it.
    let first_kid = jwt_kid(&first.token);
    assert!(b.jwt_keys.iter().all(|k| k.kid != first_kid));
    let jwt_jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&b.jwks).unwrap();
    assert!(jwt_jwks.find(&first_kid).is_none());
    // A private or non-ES256 key is never a cnf.
    let private: serde_json::Value = serde_json::from_str(&key.private_jwk()).unwrap();
    assert!(
        a.mint_wit(&id("/w"), &private, Duration::from_secs(60))
            .is_err()
    );

    // Half-way through the key's life a successor is published (pushed to
    // bundle watchers) but does not sign yet.
    let mut bundle_rx = a.trust_store().subscribe();
    bundle_rx.borrow_and_update();
    tokio::time::advance(Duration::from_secs(301)).await;
    a.rotate().unwrap();
    assert!(bundle_rx.has_changed().unwrap(), "the new key is pushed");
    assert_eq!(a.trust_store().current().wit_keys.len(), 2);
    let wit = a
        .mint_wit(&id("/w"), &cnf, Duration::from_secs(60))
        .unwrap();
    assert_eq!(jwt_kid(&wit.token), first_kid);
    // Kept across a restart.
    let reloaded = LocalAuthority::load(settings(Some(dir.path())), clock.clone()).unwrap();
    assert_eq!(
        reloaded.trust_store().current().wit_jwks,
        a.trust_store().current().wit_jwks
    );
    // At two thirds the successor signs; both stay published, so a WIT-SVID
    // of the old key still verifies.
    tokio::time::advance(Duration::from_secs(100)).await;
    a.rotate().unwrap();
    let wit = a
        .mint_wit(&id("/w"), &cnf, Duration::from_secs(100_000))
        .unwrap();
    assert_ne!(jwt_kid(&wit.token), first_kid);
    let b = a.trust_store().current();
    verify_wit_with_jsonwebtoken(&wit.token, &b.wit_jwks);
    assert!(b.wit_keys.iter().any(|k| k.kid == first_kid));
    // Nothing outlives its key.
    assert!(until(wit.issued_at, wit.not_after) <= Duration::from_secs(600));
    // The old key leaves the bundle when it expires.
    tokio::time::advance(Duration::from_secs(200)).await;
    a.rotate().unwrap();
    assert!(
        a.trust_store()
            .current()
            .wit_keys
            .iter()
            .all(|k| k.kid != first_kid)
    );
}

fn rsa_settings(dir: Option<&Path>) -> AuthoritySettings {
    AuthoritySettings {
        jwt_key_type: JwtKeyType::Rsa2048,
        ..settings(dir)
    }
}

/// `jwt_key_type = "rsa-2048"`: JWT-SVIDs are RS256 under an RSA key the
/// bundle's JWKS publishes (`kty` RSA, `n`, `e`), verified by jsonwebtoken
/// and the spiffe crate and by our own validator; our RSA key verifies only
/// RS256, never another padding or hash under the same key id. WIT-SVID and
/// access-token keys stay P-256.
#[tokio::test(start_paused = true)]
async fn rsa_jwt_keys_sign_rs256_and_roll_over_with_overlap() {
    let clock = Arc::new(TokioClock::new());
    let a = LocalAuthority::load(rsa_settings(None), clock.clone()).unwrap();
    let jwt = a
        .mint_jwt(&id("/w"), &["db".to_string()], Duration::from_secs(500))
        .unwrap();
    let header = jsonwebtoken::decode_header(&jwt.token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    let bundle = a.trust_store().current();
    let jwks: serde_json::Value = serde_json::from_slice(&bundle.jwks).unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(
        (key["kty"].as_str(), key["use"].as_str()),
        (Some("RSA"), Some("jwt-svid"))
    );
    assert_eq!(key["e"], "AQAB");
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let dk = jsonwebtoken::DecodingKey::from_jwk(set.find(header.kid.as_deref().unwrap()).unwrap())
        .unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&["db"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(&jwt.token, &dk, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "spiffe://example.org/w");
    let spiffe_bundle = spiffe::JwtBundle::from_jwt_authorities(td(), &bundle.jwks).unwrap();
    let mut spiffe_set = spiffe::JwtBundleSet::new();
    spiffe_set.add_bundle(spiffe_bundle);
    spiffe::JwtSvid::parse_and_validate(&jwt.token, &spiffe_set, &["db"]).unwrap();
    assert!(a.trust_store().validate_jwt(&jwt.token, "db").is_ok());
    // The same signature under another RSA alg name is refused.
    let (head, rest) = jwt.token.split_once('.').unwrap();
    let mut h: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head)
            .unwrap(),
    )
    .unwrap();
    for alg in ["PS256", "RS384", "ES256"] {
        h["alg"] = alg.into();
        let relabelled = format!(
            "{}.{rest}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.to_string())
        );
        assert!(
            matches!(
                a.trust_store().validate_jwt(&relabelled, "db"),
                Err(jws::JwtError::KeyAlgorithm { .. })
            ),
            "{alg}"
        );
    }
    assert!(bundle.wit_keys.iter().all(|k| k.alg() == "ES256"));
    assert!(
        a.trust_store()
            .access_keys()
            .iter()
            .all(|k| k.alg() == "ES256")
    );

    // Rollover as for EC keys: the RSA successor is published at half-life,
    // signs at two thirds, and the old key stays until it expires.
    let first_kid = jwt_kid(&jwt.token);
    tokio::time::advance(Duration::from_secs(301)).await;
    a.rotate().unwrap();
    assert_eq!(a.trust_store().current().jwt_keys.len(), 2);
    assert!(
        a.trust_store()
            .current()
            .jwt_keys
            .iter()
            .all(|k| k.alg() == "RS256")
    );
    tokio::time::advance(Duration::from_secs(100)).await;
    a.rotate().unwrap();
    let next = a
        .mint_jwt(&id("/w"), &["db".to_string()], Duration::from_secs(60))
        .unwrap();
    assert_ne!(jwt_kid(&next.token), first_kid);
    assert!(
        a.trust_store().validate_jwt(&jwt.token, "db").is_ok(),
        "old token still verifies"
    );
    assert!(a.trust_store().validate_jwt(&next.token, "db").is_ok());
}

/// Persisted EC keys and a config now asking for RSA: an RSA key signs at
/// once, the EC key stays published (its tokens still verify), and a
/// restart keeps both; persisted RSA keys reload as RSA.
#[test]
fn a_changed_jwt_key_type_signs_at_once_and_keeps_the_old_key_published() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(crate::clock::SystemClock);
    let ec = LocalAuthority::load(settings(Some(dir.path())), clock.clone()).unwrap();
    let old = ec
        .mint_jwt(&id("/w"), &["db".to_string()], Duration::from_secs(60))
        .unwrap();
    let rsa = LocalAuthority::load(rsa_settings(Some(dir.path())), clock.clone()).unwrap();
    let new = rsa
        .mint_jwt(&id("/w"), &["db".to_string()], Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(&new.token).unwrap().alg,
        jsonwebtoken::Algorithm::RS256
    );
    assert!(rsa.trust_store().validate_jwt(&old.token, "db").is_ok());
    let mut algs: Vec<_> = rsa
        .trust_store()
        .current()
        .jwt_keys
        .iter()
        .map(|k| k.alg())
        .collect();
    algs.sort();
    assert_eq!(algs, ["ES256", "RS256"]);
    let again = LocalAuthority::load(rsa_settings(Some(dir.path())), clock).unwrap();
    assert_eq!(
        again.trust_store().current().jwks,
        rsa.trust_store().current().jwks
    );
    let newest = again
        .mint_jwt(&id("/w"), &["db".to_string()], Duration::from_secs(60))
        .unwrap();
    assert_eq!(jwt_kid(&newest.token), jwt_kid(&new.token));
}
