//! The key material itself: a CA certificate with its signing key, an ES256
//! JWT key, and the certificate profiles they sign (the CA's own, and an
//! X509-SVID leaf).

use std::time::{Duration, SystemTime};

use prost::bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use super::jws::{self, Es256Signer};
use super::keyring::{BACKDATE, KeyTimes};
use super::signer::SignError;
use super::svid::SignedCert;

/// One CA certificate and its signing key.
pub struct CaKey {
    pub cert_der: Bytes,
    /// The certificate's notBefore; no SVID it signs starts earlier.
    not_before: SystemTime,
    issuer: Issuer<'static, KeyPair>,
    pub(super) key_pkcs8: Vec<u8>,
}

impl std::fmt::Debug for CaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaKey").finish_non_exhaustive()
    }
}

/// Why key material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("CA certificate: {0}")]
    Certificate(#[from] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("CA key: {0}")]
    Key(#[from] rcgen::Error),
}

impl CaKey {
    pub fn from_parts(cert_der: Vec<u8>, key_pkcs8: Vec<u8>) -> Result<Self, KeyError> {
        let not_before = x509_parser::parse_x509_certificate(&cert_der)?
            .1
            .validity()
            .not_before
            .timestamp();
        let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(not_before.max(0) as u64);
        let key = KeyPair::try_from(key_pkcs8.as_slice())?;
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)?;
        Ok(Self {
            cert_der: Bytes::from(cert_der),
            not_before,
            issuer,
            key_pkcs8,
        })
    }

    /// A new self-signed CA for `td`, valid for `times`.
    pub fn generate(td: &spiffe::TrustDomain, times: KeyTimes) -> Result<Self, SignError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.not_before =
            (SystemTime::UNIX_EPOCH + Duration::from_secs(times.created) - BACKDATE).into();
        params.not_after = (SystemTime::UNIX_EPOCH + Duration::from_secs(times.not_after)).into();
        params.serial_number = Some(random_serial());
        params.subject_alt_names = vec![SanType::URI(td.id_string().try_into()?)];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        dn.push(DnType::CommonName, format!("Tessera CA {}", td.as_str()));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = false;
        let cert = params.self_signed(&key)?;
        Self::from_parts(cert.der().to_vec(), key.serialize_der()).map_err(|_| SignError::Crypto)
    }

    /// Signs an X509-SVID leaf for `id` over `public_key`, valid from now
    /// (backdated, never before the CA) to `not_after`.
    pub fn sign_leaf(
        &self,
        id: &spiffe::SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        now: SystemTime,
        not_after: SystemTime,
        dns_names: &[String],
    ) -> Result<SignedCert, SignError> {
        let mut params = CertificateParams::default();
        // Never before the CA's own notBefore (the clock may have gone back).
        params.not_before = (now - BACKDATE).max(self.not_before).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.clone().try_into()?));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        dn.push(DnType::OrganizationalUnitName, id.trust_domain_name());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(SignedCert {
            cert_der: Bytes::copy_from_slice(cert.der()),
            issued_at: now,
            not_after,
        })
    }
}

/// One ES256 signing key (JWT-SVIDs or access tokens).
#[derive(Debug)]
pub struct JwtKey {
    pub(super) signer: Es256Signer,
    pub(super) key_pkcs8: Vec<u8>,
}

impl JwtKey {
    /// A fresh key with a random key id.
    pub fn generate(_: KeyTimes) -> Result<Self, SignError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|_| SignError::Crypto)?;
        Self::from_pkcs8(jws::random_kid(), pkcs8.as_ref().to_vec()).map_err(|_| SignError::Crypto)
    }

    pub fn from_pkcs8(kid: String, key_pkcs8: Vec<u8>) -> Result<Self, ring::error::KeyRejected> {
        let signer = Es256Signer::from_pkcs8(kid, &key_pkcs8)?;
        Ok(Self { signer, key_pkcs8 })
    }

    pub fn kid(&self) -> &str {
        self.signer.kid()
    }

    pub fn public_jwk(&self) -> jws::PublicJwk {
        self.signer.public_jwk()
    }

    /// Signs `claims` with JOSE header `typ`.
    pub fn sign(&self, typ: &str, claims: &serde_json::Value) -> Result<String, SignError> {
        self.signer.sign(typ, claims).map_err(|_| SignError::Crypto)
    }
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system RNG");
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and 16 bytes long
    SerialNumber::from_slice(&b)
}
