use std::time::Duration;

use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use super::*;
use crate::clock::SystemClock;
use crate::identity::{AuthoritySettings, LocalAuthority};

fn td(name: &str) -> spiffe::TrustDomain {
    spiffe::TrustDomain::new(name).unwrap()
}

fn identity(id: &str) -> Identity {
    Identity {
        spiffe_id: spiffe::SpiffeId::new(id).unwrap(),
        hint: None,
        x509_ttl: Duration::from_secs(3600),
        jwt_ttl: Duration::from_secs(300),
        wit_ttl: Duration::from_secs(3600),
        federates_with: Default::default(),
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn two_identities() -> Vec<Identity> {
    vec![
        identity("spiffe://example.org/front"),
        identity("spiffe://example.org/admin"),
    ]
}

fn bundles() -> VisibleBundles {
    VisibleBundles::new(
        td("example.org"),
        Bytes::from_static(b"own"),
        [(td("partner.test"), Bytes::from_static(b"partner"))],
    )
}

fn resolved(list: &[&str]) -> Result<Vec<Wanted>, Status> {
    resolve(
        &names(list),
        &two_identities(),
        &bundles(),
        &SdsConfig::default(),
    )
}

fn cert(name: &str, identity: usize) -> Wanted {
    Wanted::Certificate {
        name: name.into(),
        identity,
    }
}

fn bundle(name: &str, domain: &str) -> Wanted {
    Wanted::Bundle {
        name: name.into(),
        domain: td(domain),
    }
}

#[test]
fn no_names_means_every_bundle_then_every_certificate() {
    let all = vec![
        bundle("spiffe://example.org", "example.org"),
        bundle("spiffe://partner.test", "partner.test"),
        cert("spiffe://example.org/front", 0),
        cert("spiffe://example.org/admin", 1),
    ];
    assert_eq!(resolved(&[]).unwrap(), all);
    assert_eq!(resolved(&["", ""]).unwrap(), all, "empty names are ignored");
}

#[test]
fn each_name_resolves_on_its_own_under_the_name_asked_for() {
    assert_eq!(
        resolved(&[
            "ROOTCA",
            "spiffe://example.org",
            "default",
            "spiffe://example.org/front",
            "spiffe://example.org/admin",
            "ALL",
            "spiffe://partner.test",
            "ROOTCA",
        ])
        .unwrap(),
        vec![
            bundle("ROOTCA", "example.org"),
            bundle("spiffe://example.org", "example.org"),
            cert("default", 0),
            cert("spiffe://example.org/front", 0),
            cert("spiffe://example.org/admin", 1),
            Wanted::AllBundles { name: "ALL".into() },
            bundle("spiffe://partner.test", "partner.test"),
        ]
    );
}

#[test]
fn names_the_caller_may_not_have_are_invalid_argument_and_listed() {
    for (list, listed) in [
        (
            &["spiffe://example.org/someone-else"][..],
            "[\"spiffe://example.org/someone-else\"]",
        ),
        (
            &["ROOTCA", "spiffe://other.test", "rootca"],
            "[\"rootca\", \"spiffe://other.test\"]",
        ),
        // Exact strings only: no trailing slash, no case folding.
        (&["spiffe://example.org/"], "[\"spiffe://example.org/\"]"),
        (
            &["SPIFFE://example.org/front"],
            "[\"SPIFFE://example.org/front\"]",
        ),
    ] {
        let status = resolved(list).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{list:?}");
        assert!(status.message().ends_with(listed), "{}", status.message());
    }
}

#[test]
fn configured_names_replace_the_defaults() {
    let config = SdsConfig {
        default_svid_name: "my-cert".into(),
        default_bundle_name: "my-ca".into(),
        default_all_bundles_name: "every-ca".into(),
        disable_spiffe_cert_validation: false,
    };
    let got = resolve(
        &names(&["my-cert", "my-ca", "every-ca"]),
        &two_identities(),
        &bundles(),
        &config,
    )
    .unwrap();
    assert_eq!(
        got,
        vec![
            cert("my-cert", 0),
            bundle("my-ca", "example.org"),
            Wanted::AllBundles {
                name: "every-ca".into()
            },
        ]
    );
    let status = resolve(&names(&["default"]), &two_identities(), &bundles(), &config).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[test]
fn needed_identities_are_listed_once() {
    let wanted = resolved(&[
        "default",
        "ROOTCA",
        "spiffe://example.org/front",
        "spiffe://example.org/admin",
    ])
    .unwrap();
    assert_eq!(needed_identities(&wanted), [0, 1]);
    assert!(needed_identities(&resolved(&["ALL", "ROOTCA"]).unwrap()).is_empty());
}

fn node(
    metadata: Option<(&str, prost_types::value::Kind)>,
    version: Option<(u32, u32)>,
) -> config_core::Node {
    use config_core::node::UserAgentVersionType;
    config_core::Node {
        metadata: metadata.map(|(k, v)| prost_types::Struct {
            fields: [(k.to_string(), prost_types::Value { kind: Some(v) })].into(),
        }),
        user_agent_version_type: version.map(|(major, minor)| {
            UserAgentVersionType::UserAgentBuildVersion(config_core::BuildVersion {
                version: Some(
                    tessera_workload_api::sds::envoy::r#type::v3::SemanticVersion {
                        major_number: major,
                        minor_number: minor,
                        patch: 0,
                    },
                ),
                metadata: None,
            })
        }),
        ..Default::default()
    }
}

#[test]
fn the_spiffe_validator_unless_disabled_or_too_old() {
    use prost_types::value::Kind;
    let on = SdsConfig::default();
    let off = SdsConfig {
        disable_spiffe_cert_validation: true,
        ..SdsConfig::default()
    };
    let key = DISABLE_SPIFFE_VALIDATION_KEY;
    let s = |text: &str| Kind::StringValue(text.into());
    for (node, config, want) in [
        (node(None, None), &on, Validation::Spiffe),
        (node(None, None), &off, Validation::TrustedCa),
        (node(None, Some((1, 40))), &on, Validation::Spiffe),
        (node(None, Some((1, 18))), &on, Validation::Spiffe),
        (node(None, Some((1, 17))), &on, Validation::TrustedCa),
        (node(None, Some((2, 0))), &on, Validation::Spiffe),
        (
            node(Some((key, Kind::BoolValue(true))), None),
            &on,
            Validation::TrustedCa,
        ),
        (
            node(Some((key, s("true"))), None),
            &on,
            Validation::TrustedCa,
        ),
        (node(Some((key, s("T"))), None), &on, Validation::TrustedCa),
        (
            node(Some((key, Kind::BoolValue(false))), None),
            &off,
            Validation::Spiffe,
        ),
        (node(Some((key, s("0"))), None), &off, Validation::Spiffe),
        // Unreadable values leave the config's choice.
        (node(Some((key, s("yes"))), None), &on, Validation::Spiffe),
        (
            node(Some((key, Kind::NumberValue(1.0))), None),
            &off,
            Validation::TrustedCa,
        ),
        // An old Envoy cannot be talked into the validator it lacks.
        (
            node(Some((key, s("false"))), Some((1, 17))),
            &on,
            Validation::TrustedCa,
        ),
    ] {
        assert_eq!(
            Validation::for_node(&node, config),
            want,
            "{node:?} {config:?}"
        );
    }
}

/// A real X509-SVID and bundle from an in-memory authority.
fn issued() -> (Arc<X509Svid>, VisibleBundles) {
    let authority = LocalAuthority::load(
        AuthoritySettings {
            trust_domain: td("example.org"),
            ca_ttl: Duration::from_secs(3600),
            jwt_key_ttl: Duration::from_secs(3600),
            jwt_key_type: Default::default(),
            state_dir: None,
            ca_files: None,
        },
        Arc::new(SystemClock),
    )
    .unwrap();
    let svid = authority
        .issue_x509(
            &spiffe::SpiffeId::new("spiffe://example.org/front").unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let cas = authority.trust_store().current().x509.clone();
    let bundles = VisibleBundles::new(td("example.org"), cas.clone(), [(td("partner.test"), cas)]);
    (Arc::new(svid), bundles)
}

fn secrets(anys: &[prost_types::Any]) -> Vec<tls::Secret> {
    anys.iter()
        .map(|a| {
            assert_eq!(a.type_url, sds::SECRET_TYPE_URL);
            tls::Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn inline_bytes(source: &Option<config_core::DataSource>) -> &[u8] {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(config_core::data_source::Specifier::InlineBytes(b)) => b,
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

fn spiffe_domains(context: &tls::CertificateValidationContext) -> Vec<(String, Vec<Vec<u8>>)> {
    assert!(context.trusted_ca.is_none());
    let ext = context.custom_validator_config.as_ref().unwrap();
    assert_eq!(ext.name, "envoy.tls.cert_validator.spiffe");
    let any = ext.typed_config.as_ref().unwrap();
    assert_eq!(any.type_url, sds::SPIFFE_VALIDATOR_TYPE_URL);
    tls::SpiffeCertValidatorConfig::decode(any.value.as_slice())
        .unwrap()
        .trust_domains
        .iter()
        .map(|d| {
            let certs = CertificateDer::pem_slice_iter(inline_bytes(&d.trust_bundle))
                .map(|c| c.unwrap().to_vec())
                .collect();
            (d.name.clone(), certs)
        })
        .collect()
}

#[test]
fn certificates_are_the_svid_chain_and_its_pkcs8_key_in_pem() {
    let (svid, bundles) = issued();
    let wanted = [cert("default", 0)];
    let built = secrets(
        &build(
            &wanted,
            |_| Some(svid.clone()),
            &bundles,
            Validation::Spiffe,
        )
        .unwrap(),
    );
    let [secret] = &built[..] else {
        panic!("{built:?}")
    };
    assert_eq!(secret.name, "default");
    let Some(tls::secret::Type::TlsCertificate(c)) = &secret.r#type else {
        panic!("{secret:?}")
    };
    // Read back with rustls' PEM reader and x509-parser, not our codec.
    let chain: Vec<_> = CertificateDer::pem_slice_iter(inline_bytes(&c.certificate_chain))
        .map(|c| c.unwrap())
        .collect();
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0].as_ref(), &svid.chain_der[..]);
    let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(
        format!("{:?}", san.value).contains("spiffe://example.org/front"),
        "{san:?}"
    );
    let key = PrivatePkcs8KeyDer::from_pem_slice(inline_bytes(&c.private_key)).unwrap();
    assert_eq!(key.secret_pkcs8_der(), &svid.key_pkcs8[..]);
    // The key is the certificate's: ring derives the same public key.
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        key.secret_pkcs8_der(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    use ring::signature::KeyPair;
    assert_eq!(
        pair.public_key().as_ref(),
        leaf.public_key().subject_public_key.data.as_ref()
    );
}

#[test]
fn validation_contexts_in_both_styles() {
    let (svid, bundles) = issued();
    let own_cas: Vec<Vec<u8>> = pem::split_der_certs(bundles.cas(&td("example.org")).unwrap())
        .unwrap()
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    let wanted = [
        bundle("ROOTCA", "example.org"),
        Wanted::AllBundles { name: "ALL".into() },
    ];
    let built = secrets(
        &build(
            &wanted,
            |_| Some(svid.clone()),
            &bundles,
            Validation::Spiffe,
        )
        .unwrap(),
    );
    let contexts: Vec<_> = built
        .iter()
        .map(|s| match &s.r#type {
            Some(tls::secret::Type::ValidationContext(c)) => (s.name.as_str(), spiffe_domains(c)),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        contexts,
        vec![
            ("ROOTCA", vec![("example.org".to_string(), own_cas.clone())]),
            (
                "ALL",
                vec![
                    ("example.org".to_string(), own_cas.clone()),
                    ("partner.test".to_string(), own_cas.clone())
                ]
            ),
        ]
    );

    // The plain style: one trust domain in trusted_ca; ALL cannot be one.
    let built = secrets(&build(&wanted[..1], |_| None, &bundles, Validation::TrustedCa).unwrap());
    let Some(tls::secret::Type::ValidationContext(c)) = &built[0].r#type else {
        panic!("{built:?}")
    };
    assert!(c.custom_validator_config.is_none());
    let cas: Vec<_> = CertificateDer::pem_slice_iter(inline_bytes(&c.trusted_ca))
        .map(|c| c.unwrap().to_vec())
        .collect();
    assert_eq!(cas, own_cas);
    let status = build(&wanted[1..], |_| None, &bundles, Validation::TrustedCa).unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
}

#[test]
fn a_missing_svid_is_unavailable() {
    let (_, bundles) = issued();
    let status = build(
        &[cert("default", 0)],
        |_| None,
        &bundles,
        Validation::Spiffe,
    )
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
}
