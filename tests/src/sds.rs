//! Reading what the agent's Envoy SDS service answers, shared by the SDS
//! and federation suites: secrets decoded from their `Any`, inline PEM read
//! back with rustls' PEM reader, and the trust domains of a
//! `SPIFFECertValidatorConfig`.

use prost::Message;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tessera_workload_api::sds::{self, config_core, discovery, tls};

/// A DiscoveryRequest for Secrets named `names`.
pub fn request(names: &[&str], version: &str, nonce: &str) -> discovery::DiscoveryRequest {
    discovery::DiscoveryRequest {
        version_info: version.into(),
        node: None,
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: sds::SECRET_TYPE_URL.into(),
        response_nonce: nonce.into(),
        error_detail: None,
    }
}

/// The Secrets of a response (every resource must be one).
pub fn secrets(response: &discovery::DiscoveryResponse) -> Vec<tls::Secret> {
    assert_eq!(response.type_url, sds::SECRET_TYPE_URL);
    response
        .resources
        .iter()
        .map(|any| {
            assert_eq!(any.type_url, sds::SECRET_TYPE_URL);
            tls::Secret::decode(any.value.as_slice()).unwrap()
        })
        .collect()
}

/// The bytes of an inline data source.
pub fn inline(source: &Option<config_core::DataSource>) -> &[u8] {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(config_core::data_source::Specifier::InlineBytes(b)) => b,
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

/// The DER certificates of a PEM document.
pub fn pem_certs(pem: &[u8]) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem)
        .map(|c| c.unwrap().to_vec())
        .collect()
}

/// The trust domains and CAs of a validation context with the SPIFFE validator.
pub fn spiffe_validator(secret: &tls::Secret) -> Vec<(String, Vec<Vec<u8>>)> {
    let Some(tls::secret::Type::ValidationContext(context)) = &secret.r#type else {
        panic!("not a validation context: {secret:?}")
    };
    let ext = context
        .custom_validator_config
        .as_ref()
        .expect("the SPIFFE validator");
    assert_eq!(ext.name, sds::SPIFFE_VALIDATOR_NAME);
    let config = ext.typed_config.as_ref().unwrap();
    assert_eq!(config.type_url, sds::SPIFFE_VALIDATOR_TYPE_URL);
    tls::SpiffeCertValidatorConfig::decode(config.value.as_slice())
        .unwrap()
        .trust_domains
        .iter()
        .map(|d| (d.name.clone(), pem_certs(inline(&d.trust_bundle))))
        .collect()
}
