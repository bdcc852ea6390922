//! Shared bits of the mTLS demo: both workloads get their X509-SVIDs from the
//! agent named by `SPIFFE_ENDPOINT_SOCKET` and rotate them live through
//! `spiffe::X509Source`; `spiffe-rustls` turns the source into rustls configs
//! that only accept the peer SPIFFE ID given on the command line.

#![forbid(unsafe_code)]

use anyhow::Context;

/// The SPIFFE ID in a peer's leaf certificate (its single URI SAN).
pub fn peer_spiffe_id(
    certs: Option<&[tokio_rustls::rustls::pki_types::CertificateDer<'_>]>,
) -> anyhow::Result<String> {
    let leaf = certs
        .and_then(|c| c.first())
        .context("peer sent no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .context("unparsable peer certificate")?;
    let san = cert
        .subject_alternative_name()?
        .context("peer certificate has no SAN")?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .context("peer certificate has no URI SAN")
}

/// `--flag value` from the command line.
pub fn arg(name: &str) -> anyhow::Result<String> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == name {
            return args.next().with_context(|| format!("{name} needs a value"));
        }
    }
    anyhow::bail!("missing {name}")
}

/// The X.509 source for this process, from `SPIFFE_ENDPOINT_SOCKET`.
/// Gives up after 10 s: the source retries PermissionDenied forever, which
/// for a demo means "no entry matches this process".
pub async fn source() -> anyhow::Result<spiffe::X509Source> {
    let hint = "cannot get an X509-SVID from the agent (is SPIFFE_ENDPOINT_SOCKET set and an entry registered for this process?)";
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        spiffe::X509Source::new(),
    )
    .await
    .context(hint)?
    .context(hint)
}
