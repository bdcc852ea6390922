//! SPIFFE federation (SPIFFE Federation spec): trusting other trust
//! domains, and letting them trust this one.
//!
//! * [`endpoint`]: the bundle endpoint, serving this trust domain's SPIFFE
//!   bundle over HTTPS in the `https_web` or `https_spiffe` profile. The
//!   fleet authority serves it for a fleet; a single-node agent can too.
//! * [`refresh`]: for each foreign trust domain (`[[federation]]`), fetch
//!   its bundle from its endpoint ([`fetch`]), install it in the
//!   [`crate::identity::TrustStore`] (workloads whose entries list it in
//!   `federates_with` then receive and trust it), keep it ([`state`]: in
//!   `data_dir` on a single node, in the fleet store at the authority) so
//!   a restart starts from it, and poll again at its `spiffe_refresh_hint`.
//! * [`url`]: the endpoint URLs.
//!
//! In fleet mode the authority fetches; agents receive the foreign bundles
//! with the trust domain's own (`fleet::wire::BundleDoc::federated`).
//! Relationships come from the config file and, at the authority, from
//! `FederationRelationship` objects (`fleet::federation`), both through
//! [`refresh::Federation::update`].

pub mod endpoint;
pub mod fetch;
pub mod refresh;
pub mod state;
pub mod url;

use std::path::PathBuf;
use std::time::Duration;

pub use endpoint::{BundleEndpoint, EndpointConfig, EndpointProfile};
pub use refresh::Federation;

/// The SPIFFE ID a bundle endpoint presents in the `https_spiffe` profile:
/// the reserved path, so no workload can be issued it.
pub fn endpoint_spiffe_id(td: &spiffe::TrustDomain) -> spiffe::SpiffeId {
    spiffe::SpiffeId::new(format!("{}/tessera/bundle-endpoint", td.id_string()))
        .expect("a trust domain and a fixed path make a SPIFFE ID")
}

/// How a foreign bundle endpoint authenticates itself (Federation spec §5).
#[derive(Debug, Clone, PartialEq)]
pub enum Profile {
    /// A Web PKI server certificate for the URL's host, checked against
    /// `ca_file` or the system's CA certificates.
    HttpsWeb { ca_file: Option<PathBuf> },
    /// An X509-SVID with `endpoint_id`, checked against the latest bundle
    /// of that ID's trust domain: the one fetched last, or at first the
    /// `bootstrap_bundle` (a SPIFFE bundle or PEM certificates).
    HttpsSpiffe {
        endpoint_id: spiffe::SpiffeId,
        bootstrap_bundle: Option<Bootstrap>,
    },
}

/// Where a relationship's bootstrap bundle comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Bootstrap {
    /// A file named by the config (`bootstrap_bundle`), read when needed.
    File(PathBuf),
    /// A bundle given inline (a `FederationRelationship` object's
    /// `spec.bootstrapBundle`), checked when the object was.
    Inline(Box<crate::identity::ForeignBundle>),
}

impl Profile {
    pub fn name(&self) -> &'static str {
        match self {
            Profile::HttpsWeb { .. } => "https_web",
            Profile::HttpsSpiffe { .. } => "https_spiffe",
        }
    }
}

/// One federation relationship: whose bundle, from where, and how the
/// endpoint is authenticated. Each is named explicitly (spec §4.1: the
/// trust domain is never inferred from the URL).
#[derive(Debug, Clone, PartialEq)]
pub struct Relationship {
    pub trust_domain: spiffe::TrustDomain,
    pub url: url::EndpointUrl,
    pub profile: Profile,
}

/// Bounds on how often a foreign bundle is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshBounds {
    /// Used when a bundle has no `spiffe_refresh_hint` (spec: "low,
    /// e.g. 5 minutes").
    pub default: Duration,
    /// A hint below this is raised to it, so a foreign endpoint cannot
    /// make us poll it in a tight loop.
    pub min: Duration,
    /// A hint above this is lowered to it, so a key rotation is never
    /// missed for long.
    pub max: Duration,
}

impl Default for RefreshBounds {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(300),
            min: Duration::from_secs(5),
            max: Duration::from_secs(3600),
        }
    }
}

impl RefreshBounds {
    /// When to fetch next after a success with `hint`.
    pub fn interval(&self, hint: Option<Duration>) -> Duration {
        hint.unwrap_or(self.default).clamp(self.min, self.max)
    }
}

/// A relationship's fields as an operator wrote them: a config file's
/// `[[federation]]` table or a `FederationRelationship` object. Both are
/// checked by [`Relationship::check`], so they accept the same things.
#[derive(Debug, Clone, Copy)]
pub struct RelationshipInput<'a> {
    pub trust_domain: &'a str,
    pub bundle_endpoint_url: &'a str,
    pub bundle_endpoint_profile: &'a str,
    pub endpoint_spiffe_id: Option<&'a str>,
    pub bootstrap_bundle: Option<BootstrapInput<'a>>,
    pub ca_file: Option<&'a std::path::Path>,
}

/// A bootstrap bundle as given: a file to read, or the document itself.
#[derive(Debug, Clone, Copy)]
pub enum BootstrapInput<'a> {
    File(&'a std::path::Path),
    Inline(&'a [u8]),
}

/// The field of [`RelationshipInput`] a [`FieldError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    TrustDomain,
    BundleEndpointUrl,
    BundleEndpointProfile,
    EndpointSpiffeId,
    BootstrapBundle,
    CaFile,
}

/// Why a relationship is refused: the field at fault and what is wrong. A
/// field that is missing is reported as itself (the caller points at what
/// it has, e.g. the profile that needs it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FieldError {
    pub field: Field,
    pub message: String,
}

fn field_error(field: Field, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

impl Relationship {
    /// Checks a relationship of a trust domain whose own name is `own`.
    pub fn check(
        input: &RelationshipInput<'_>,
        own: &spiffe::TrustDomain,
    ) -> Result<Self, FieldError> {
        let name = input.trust_domain;
        let td = spiffe::TrustDomain::new(name)
            .ok()
            .filter(|td| td.as_str() == name)
            .ok_or_else(|| {
                field_error(
                    Field::TrustDomain,
                    "must be a bare, lowercase trust domain name such as \"partner.example\"",
                )
            })?;
        if &td == own {
            return Err(field_error(
                Field::TrustDomain,
                "is this agent's own trust domain",
            ));
        }
        let url = url::EndpointUrl::parse(input.bundle_endpoint_url)
            .map_err(|e| field_error(Field::BundleEndpointUrl, e.to_string()))?;
        let profile = match input.bundle_endpoint_profile {
            "https_web" => {
                if input.endpoint_spiffe_id.is_some() {
                    return Err(field_error(
                        Field::EndpointSpiffeId,
                        "only used with bundle_endpoint_profile = \"https_spiffe\"",
                    ));
                }
                if input.bootstrap_bundle.is_some() {
                    return Err(field_error(
                        Field::BootstrapBundle,
                        "only used with bundle_endpoint_profile = \"https_spiffe\"",
                    ));
                }
                Profile::HttpsWeb {
                    ca_file: input.ca_file.map(std::path::Path::to_path_buf),
                }
            }
            "https_spiffe" => {
                if input.ca_file.is_some() {
                    return Err(field_error(
                        Field::CaFile,
                        "only used with https_web; an https_spiffe endpoint is checked against its trust domain's bundle (bootstrap_bundle at first)",
                    ));
                }
                let id_text = input.endpoint_spiffe_id.ok_or_else(|| {
                    field_error(
                        Field::EndpointSpiffeId,
                        "is required with https_spiffe: the SPIFFE ID the endpoint's certificate must carry",
                    )
                })?;
                let endpoint_id = spiffe::SpiffeId::new(id_text).map_err(|e| {
                    field_error(Field::EndpointSpiffeId, format!("not a SPIFFE ID: {e}"))
                })?;
                let same_domain = endpoint_id.is_member_of(&td);
                let bootstrap_bundle = match (input.bootstrap_bundle, same_domain) {
                    (Some(given), true) => {
                        let parse = |bytes: &[u8]| {
                            crate::identity::ForeignBundle::from_file_contents(td.clone(), bytes)
                        };
                        Some(match given {
                            BootstrapInput::File(path) => {
                                let bytes = std::fs::read(path).map_err(|e| {
                                    field_error(
                                        Field::BootstrapBundle,
                                        format!("cannot read {}: {e}", path.display()),
                                    )
                                })?;
                                parse(&bytes).map_err(|e| {
                                    field_error(
                                        Field::BootstrapBundle,
                                        format!(
                                            "{}: not a SPIFFE bundle or PEM certificates: {e}",
                                            path.display()
                                        ),
                                    )
                                })?;
                                Bootstrap::File(path.to_path_buf())
                            }
                            BootstrapInput::Inline(bytes) => {
                                Bootstrap::Inline(Box::new(parse(bytes).map_err(|e| {
                                    field_error(
                                        Field::BootstrapBundle,
                                        format!("not a SPIFFE bundle or PEM certificates: {e}"),
                                    )
                                })?))
                            }
                        })
                    }
                    (None, true) => {
                        return Err(field_error(
                            Field::BootstrapBundle,
                            "is required with https_spiffe when the endpoint belongs to the trust domain it serves: the bundle (SPIFFE JSON or PEM) that authenticates the first fetch",
                        ));
                    }
                    (Some(_), false) => {
                        return Err(field_error(
                            Field::BootstrapBundle,
                            format!(
                                "is not used: the endpoint's ID is in {:?}, whose bundle authenticates it",
                                endpoint_id.trust_domain_name()
                            ),
                        ));
                    }
                    (None, false) => None,
                };
                Profile::HttpsSpiffe {
                    endpoint_id,
                    bootstrap_bundle,
                }
            }
            _ => {
                return Err(field_error(
                    Field::BundleEndpointProfile,
                    "must be \"https_web\" or \"https_spiffe\"",
                ));
            }
        };
        Ok(Relationship {
            trust_domain: td,
            url,
            profile,
        })
    }
}
