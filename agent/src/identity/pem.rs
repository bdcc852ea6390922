//! DER and PEM: the one place certificates and keys are armoured and
//! unarmoured. Decoding uses rustls' PEM reader (the same parser the TLS
//! stack trusts); encoding is plain 64-column armour.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("malformed DER certificate: {0}")]
    Der(#[from] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("malformed PEM: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("no `BEGIN CERTIFICATE` block")]
    NoCertificate,
    #[error("expected a `BEGIN PRIVATE KEY` (PKCS#8) or `BEGIN EC PRIVATE KEY` (SEC1) P-256 key")]
    NoKey,
}

/// Splits concatenated DER certificates (a Workload API chain or bundle).
pub fn split_der_certs(mut der: &[u8]) -> Result<Vec<&[u8]>, PemError> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)?;
        let len = der.len() - rest.len();
        out.push(&der[..len]);
        der = rest;
    }
    Ok(out)
}

/// PEM armour with 64-column lines.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Every `CERTIFICATE` block of `pem`, in order (other blocks are skipped).
pub fn decode_certs(pem: &[u8]) -> Result<Vec<Vec<u8>>, PemError> {
    CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.to_vec()).map_err(PemError::from))
        .collect()
}

/// The first `CERTIFICATE` block of `pem`.
pub fn decode_first_cert(pem: &[u8]) -> Result<Vec<u8>, PemError> {
    decode_certs(pem)?
        .into_iter()
        .next()
        .ok_or(PemError::NoCertificate)
}

/// A P-256 private key as PKCS#8 DER, from a `PRIVATE KEY` (PKCS#8) or an
/// `EC PRIVATE KEY` (SEC1) block.
pub fn decode_private_key(pem: &[u8]) -> Result<Vec<u8>, PemError> {
    decode_key(pem, true)
}

/// A `PRIVATE KEY` (PKCS#8) block only: fleet JWT and access-token keys.
pub fn decode_pkcs8_key(pem: &[u8]) -> Result<Vec<u8>, PemError> {
    decode_key(pem, false)
}

fn decode_key(pem: &[u8], sec1_too: bool) -> Result<Vec<u8>, PemError> {
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(PrivateKeyDer::Pkcs8(der)) => Ok(der.secret_pkcs8_der().to_vec()),
        Ok(PrivateKeyDer::Sec1(der)) if sec1_too => Ok(sec1_to_pkcs8(der.secret_sec1_der())),
        Ok(_) | Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(PemError::NoKey),
        Err(e) => Err(e.into()),
    }
}

/// Wraps a SEC1 `ECPrivateKey` for P-256 in a PKCS#8 `PrivateKeyInfo`
/// (ring and rcgen read only PKCS#8).
fn sec1_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { id-ecPublicKey, prime256v1 }
    const ALG: &[u8] = &[
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut body = vec![0x02, 0x01, 0x00]; // version 0
    body.extend_from_slice(ALG);
    body.extend(der_tlv(0x04, sec1));
    der_tlv(0x30, &body)
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> (rcgen::KeyPair, rcgen::Certificate) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (key, cert)
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let (key, cert) = self_signed();
        let pem = format!(
            "{}{}",
            encode("CERTIFICATE", cert.der()),
            encode("CERTIFICATE", cert.der())
        );
        assert_eq!(decode_certs(pem.as_bytes()).unwrap().len(), 2);
        assert_eq!(
            decode_first_cert(pem.as_bytes()).unwrap(),
            cert.der().to_vec()
        );
        let key_pem = encode("PRIVATE KEY", &key.serialize_der());
        assert_eq!(
            decode_private_key(key_pem.as_bytes()).unwrap(),
            key.serialize_der()
        );
        assert!(matches!(
            decode_private_key(pem.as_bytes()),
            Err(PemError::NoKey)
        ));
        assert!(matches!(
            decode_first_cert(key_pem.as_bytes()),
            Err(PemError::NoCertificate)
        ));
    }

    #[test]
    fn splits_concatenated_der() {
        let (_, cert) = self_signed();
        let both = [cert.der().as_ref(), cert.der().as_ref()].concat();
        assert_eq!(split_der_certs(&both).unwrap().len(), 2);
        assert!(split_der_certs(&both[..both.len() - 1]).is_err());
    }
}
