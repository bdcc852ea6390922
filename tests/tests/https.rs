//! The HTTPS face over a real TLS connection, judged by rustls/webpki (the
//! certificate chain and name), x509-parser (the certificate's names) and
//! jsonwebtoken (a JWT-SVID checked against the keys the face serves).
//! Operator certificate files are made with openssl(1) and replaced while
//! the agent runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tessera_tests::{TestAgent, https_get as get};

fn host_port(issuer: &str) -> String {
    issuer.trim_start_matches("https://").to_string()
}

/// The face's certificate is issued by the trust domain's CA for
/// `localhost` (and names its SPIFFE ID); discovery names the issuer the
/// JWT-SVIDs carry, and a JWT-SVID verifies against the keys at `jwks_uri`.
#[tokio::test]
async fn the_face_serves_discovery_and_keys_under_a_certificate_of_the_trust_domain() {
    let mut agent = TestAgent::start(&format!(
        "{}[https]\nlisten = \"127.0.0.1:0\"\n",
        TestAgent::entry_for_me("face", "default")
    ))
    .await;
    let issuer = agent.running().https_issuer.clone().expect("https issuer");
    assert!(issuer.starts_with("https://localhost:"), "{issuer}");
    let ctx = agent
        .spiffe_client()
        .await
        .fetch_x509_context()
        .await
        .unwrap();
    let roots = tessera_tests::example_org_cas(&ctx);

    let addr = host_port(&issuer);
    let (meta, leaf) = get(&addr, &roots, "/.well-known/openid-configuration")
        .await
        .unwrap();
    assert_eq!(meta["issuer"], issuer.as_str());
    assert_eq!(meta["jwks_uri"], format!("{issuer}/keys"));
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| format!("{n}"))
        .collect();
    assert!(sans.iter().any(|n| n.contains("localhost")), "{sans:?}");
    assert!(
        sans.iter()
            .any(|n| n.contains("spiffe://example.org/tessera/https")),
        "{sans:?}"
    );

    // A JWT-SVID carries the issuer and verifies with the face's keys.
    let token = agent.jwt_svid("relying-party").await;
    let (jwks, _) = get(&addr, &roots, "/keys").await.unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks).unwrap();
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(jwks.find(&kid).expect("kid at /keys")).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["relying-party"]);
    v.set_issuer(&[issuer.as_str()]);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "spiffe://example.org/face");

    // The SPIFFE bundle (an https_web bundle endpoint): its X.509
    // authorities are the Workload API's CAs, and its JWT authorities, read
    // by the spiffe crate, verify the JWT-SVID.
    let (bundle, _) = get(&addr, &roots, "/bundle").await.unwrap();
    assert!(bundle["spiffe_refresh_hint"].as_u64().is_some(), "{bundle}");
    let keys = bundle["keys"].as_array().unwrap();
    let with_use = |u: &'static str| keys.iter().filter(move |k| k["use"] == u);
    let mut cas: Vec<Vec<u8>> = with_use("x509-svid")
        .map(|k| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(k["x5c"][0].as_str().unwrap())
                .unwrap()
        })
        .collect();
    let mut expected = roots.clone();
    cas.sort();
    expected.sort();
    assert_eq!(cas, expected);
    let jwt_keys = serde_json::json!({"keys": with_use("jwt-svid").collect::<Vec<_>>()});
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let jwt_bundle =
        spiffe::JwtBundle::from_jwt_authorities(td, jwt_keys.to_string().as_bytes()).unwrap();
    let set: spiffe::JwtBundleSet = [jwt_bundle].into_iter().collect();
    let svid = spiffe::JwtSvid::parse_and_validate(&token, &set, &["relying-party"])
        .expect("the bundle's JWT authorities verify the JWT-SVID");
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/face");

    // A client that does not trust the trust domain's CA refuses the face.
    let (stranger, _, _, _) = openssl_cert(agent.dir.path(), "stranger");
    assert!(get(&addr, &[stranger], "/keys").await.is_err());
    agent.stop().await;
}

/// A CA and a `localhost` leaf it issued, P-256, by openssl(1), as a public
/// CA would hand them out: (CA DER, leaf DER, leaf PEM path, key PEM path).
fn openssl_cert(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>, PathBuf, PathBuf) {
    let path = |ext: &str| dir.join(format!("{name}.{ext}"));
    let openssl = |args: &[&str]| tessera_tests::fake_kubelet::openssl(dir, args);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let (ca_key, ca_crt) = (format!("{name}-ca.key"), format!("{name}-ca.crt"));
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                &ca_key,
                "-out",
                &ca_crt,
                "-subj",
                &format!("/CN={name} CA"),
                "-days",
                "1",
            ],
        ]
        .concat(),
    );
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"],
        ]
        .concat(),
    );
    std::fs::write(
        path("ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let ext = format!("{name}.ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &crt,
        "-days",
        "1",
        "-extfile",
        &ext,
    ]);
    let der = |file: &str| {
        let pem = std::fs::read(dir.join(file)).unwrap();
        x509_parser::pem::parse_x509_pem(&pem).unwrap().1.contents
    };
    (der(&ca_crt), der(&crt), path("crt"), path("key"))
}

/// Operator files (a public CA's certificate, here openssl's self-signed
/// one) are served, and a replacement is picked up while the agent runs;
/// a half-written replacement keeps the current certificate.
#[tokio::test]
async fn operator_certificate_files_are_served_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let (first_ca, first, cert, key) = openssl_cert(dir.path(), "first");
    let live_cert = dir.path().join("https.crt");
    let live_key = dir.path().join("https.key");
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let body = format!(
        "{}[https]\nlisten = \"127.0.0.1:0\"\nissuer = \"https://localhost\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nreload_interval = \"100ms\"\n",
        TestAgent::entry_for_me("face", "default"),
        live_cert.display(),
        live_key.display()
    );
    let (second_ca, second, cert2, key2) = openssl_cert(dir.path(), "second");
    let mut agent = TestAgent::start_in(dir, &body).await;
    let addr = agent
        .running()
        .https_addr
        .expect("bound address")
        .to_string();
    let (meta, leaf) = get(
        &addr,
        std::slice::from_ref(&first_ca),
        "/.well-known/openid-configuration",
    )
    .await
    .unwrap();
    assert_eq!(meta["issuer"], "https://localhost");
    assert_eq!(leaf, first);

    // Half a file: the current certificate stays.
    std::fs::write(&live_cert, b"-----BEGIN CERTIFICATE-----\nMIIB").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        get(&addr, std::slice::from_ref(&first_ca), "/keys")
            .await
            .unwrap()
            .1,
        first
    );

    // The replacement, key first then certificate, as a rotation tool would.
    std::fs::copy(&key2, &live_key).unwrap();
    std::fs::copy(&cert2, &live_cert).unwrap();
    let mut served = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok((_, leaf)) = get(&addr, std::slice::from_ref(&second_ca), "/keys").await {
            served = leaf;
            break;
        }
    }
    assert_eq!(
        served, second,
        "the replaced certificate was not served within 5 s"
    );
    agent.stop().await;
}
