//! DER and PEM helpers shared by the CLI, the local authority and the fleet
//! authority.

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// Splits concatenated DER certificates (a Workload API chain or bundle).
pub fn split_der_certs(mut der: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) =
            x509_parser::parse_x509_certificate(der).context("malformed DER certificate")?;
        let len = der.len() - rest.len();
        out.push(&der[..len]);
        der = rest;
    }
    Ok(out)
}

/// PEM armour with 64-column lines.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
