//! What Tessera reads from a DER certificate: its SPIFFE ID and its end.

/// A certificate's notAfter.
pub fn not_after(cert_der: &[u8]) -> Option<std::time::SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// A certificate's serial number as a number in lowercase hex, without
/// separators or leading zeros (`0a1b` and `00:0A:1B` are both `a1b`), so
/// that any spelling an operator copies compares equal.
pub fn serial_hex(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let hex: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let digits = hex.trim_start_matches('0');
    Some(if digits.is_empty() {
        "0".into()
    } else {
        digits.to_string()
    })
}

/// The one `spiffe://` URI SAN of a certificate.
pub fn spiffe_id_of(cert_der: &[u8]) -> Option<spiffe::SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    spiffe::SpiffeId::new(first).ok()
}
