//! The key material itself: a CA certificate with its signing key, an ES256
//! JWT key, and the certificate profiles they sign (the CA's own, and an
//! X509-SVID leaf).

use std::time::{Duration, SystemTime};

use prost::bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use super::jws::{self, JwsSigner, JwtKeyType};
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

/// One JWS signing key (JWT-SVIDs, WIT-SVIDs or access tokens): ES256, or
/// RS256 for JWT-SVIDs when `jwt_key_type` names RSA.
#[derive(Debug)]
pub struct JwtKey {
    pub(super) signer: JwsSigner,
    pub(super) key_pkcs8: Vec<u8>,
}

impl JwtKey {
    /// A fresh P-256 key with a random key id.
    pub fn generate(_: KeyTimes) -> Result<Self, SignError> {
        Self::generate_of(JwtKeyType::EcP256)
    }

    /// A fresh key of `kind` with a random key id. RSA keys are generated
    /// by the `rsa` crate (ring cannot generate them) and handed to ring as
    /// PKCS#8, so every signature is ring's constant-time code; key
    /// generation itself is not the decryption timing oracle of
    /// RUSTSEC-2023-0071 (see deny.toml).
    pub fn generate_of(kind: JwtKeyType) -> Result<Self, SignError> {
        let pkcs8 = match kind {
            JwtKeyType::EcP256 => {
                let rng = ring::rand::SystemRandom::new();
                ring::signature::EcdsaKeyPair::generate_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &rng,
                )
                .map_err(|_| SignError::Crypto)?
                .as_ref()
                .to_vec()
            }
            JwtKeyType::Rsa2048 => generate_rsa_pkcs8(2048)?,
            JwtKeyType::Rsa4096 => generate_rsa_pkcs8(4096)?,
        };
        Self::from_pkcs8(jws::random_kid(), pkcs8).map_err(|_| SignError::Crypto)
    }

    pub fn from_pkcs8(kid: String, key_pkcs8: Vec<u8>) -> Result<Self, ring::error::KeyRejected> {
        let signer = JwsSigner::from_pkcs8(kid, &key_pkcs8)?;
        Ok(Self { signer, key_pkcs8 })
    }

    /// Which `jwt_key_type` this key is, if the config can name it.
    pub fn key_type(&self) -> Option<JwtKeyType> {
        self.signer.key_type()
    }

    pub fn kid(&self) -> &str {
        self.signer.kid()
    }

    pub fn public_jwk(&self) -> jws::PublicJwk {
        self.signer.public_jwk()
    }

    /// Signs `claims` with JOSE header `typ`.
    pub fn sign<C: serde::Serialize + ?Sized>(
        &self,
        typ: &str,
        claims: &C,
    ) -> Result<String, SignError> {
        self.signer.sign(typ, claims).map_err(|_| SignError::Crypto)
    }

    /// Signs claims already serialised as a JSON object.
    pub fn sign_json(&self, typ: &str, claims: &[u8]) -> Result<String, SignError> {
        self.signer
            .sign_json(typ, claims)
            .map_err(|_| SignError::Crypto)
    }
}

/// The system RNG (ring's) for the `rsa` crate's key generation.
struct SystemRng(ring::rand::SystemRandom);

impl rsa::rand_core::RngCore for SystemRng {
    fn next_u32(&mut self) -> u32 {
        rsa::rand_core::impls::next_u32_via_fill(self)
    }
    fn next_u64(&mut self) -> u64 {
        rsa::rand_core::impls::next_u64_via_fill(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        ring::rand::SecureRandom::fill(&self.0, dest).expect("system RNG");
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rsa::rand_core::CryptoRng for SystemRng {}

/// A new RSA private key of `bits` (e = 65537), as PKCS#8 DER.
fn generate_rsa_pkcs8(bits: usize) -> Result<Vec<u8>, SignError> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut SystemRng(ring::rand::SystemRandom::new()), bits)
        .map_err(|_| SignError::Crypto)?;
    let der = key.to_pkcs8_der().map_err(|_| SignError::Crypto)?;
    Ok(der.as_bytes().to_vec())
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system RNG");
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and 16 bytes long
    SerialNumber::from_slice(&b)
}
