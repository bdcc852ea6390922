//! Federation relationships as custom resources: `FederationRelationship`
//! objects (cluster-scoped, group `tessera.dev`), watched by every authority
//! replica next to its config file's `[[federation]]` tables, so a foreign
//! trust domain is federated with (or no longer) without a restart.
//!
//! An object is named after the foreign trust domain (`metadata.name` must
//! equal `spec.trustDomain`, so the API server keeps one per domain) and has
//! the fields of a `[[federation]]` table: `bundleEndpointUrl`,
//! `bundleEndpointProfile`, `endpointSpiffeId` and `bootstrapBundle` (the
//! SPIFFE bundle or PEM itself, not a file); an `https_web` endpoint is
//! checked against the system's CA certificates. Both are checked by
//! [`Relationship::check`]. Each replica writes its verdict as the object's
//! `Ready` condition ([`super::status`]); an invalid object changes
//! nothing (a changed one keeps its last accepted version in force). A
//! trust domain the config file federates with is the config file's: an
//! object for it is refused.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::informer::{self, Change};
use super::kube::KubeClient;
use super::registration::{GROUP, VERSION};
use super::status::{Invalid, StatusWriter, invalid};
use crate::clock::Clock;
use crate::federation::{BootstrapInput, Federation, Field, Relationship, RelationshipInput};
use crate::sync::Mutex;

pub const KIND: &str = "FederationRelationship";
pub const PLURAL: &str = "federationrelationships";

fn collection() -> String {
    format!("/apis/{GROUP}/{VERSION}/{PLURAL}")
}

fn status_path(name: &str) -> String {
    format!("{}/{name}/status", collection())
}

/// Checks one object and turns it into a relationship. `config` lists the
/// trust domains the config file federates with.
pub fn relationship_of(
    obj: &Value,
    own: &spiffe::TrustDomain,
    config: &[String],
) -> Result<Relationship, Invalid> {
    let name = obj["metadata"]["name"]
        .as_str()
        .ok_or_else(|| invalid("metadata.name", "missing"))?;
    let spec = &obj["spec"];
    if !spec.is_object() {
        return Err(invalid(
            "spec",
            "missing; a relationship needs spec.trustDomain, spec.bundleEndpointUrl and spec.bundleEndpointProfile",
        ));
    }
    let text = |field: &str| -> Result<Option<&str>, Invalid> {
        match &spec[field] {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s.as_str())),
            _ => Err(invalid(format!("spec.{field}"), "must be a string")),
        }
    };
    let required = |field: &str, example: &str| -> Result<&str, Invalid> {
        text(field)?
            .ok_or_else(|| invalid(format!("spec.{field}"), format!("missing; e.g. {example}")))
    };
    let trust_domain = required("trustDomain", "\"partner.example\"")?;
    let input = RelationshipInput {
        trust_domain,
        bundle_endpoint_url: required("bundleEndpointUrl", "\"https://bundle.partner.example/\"")?,
        bundle_endpoint_profile: required(
            "bundleEndpointProfile",
            "\"https_spiffe\" or \"https_web\"",
        )?,
        endpoint_spiffe_id: text("endpointSpiffeId")?,
        bootstrap_bundle: text("bootstrapBundle")?.map(|b| BootstrapInput::Inline(b.as_bytes())),
        ca_file: None,
    };
    let relationship = Relationship::check(&input, own).map_err(|e| {
        let field = match e.field {
            Field::TrustDomain => "spec.trustDomain",
            Field::BundleEndpointUrl => "spec.bundleEndpointUrl",
            Field::BundleEndpointProfile | Field::CaFile => "spec.bundleEndpointProfile",
            Field::EndpointSpiffeId => "spec.endpointSpiffeId",
            Field::BootstrapBundle => "spec.bootstrapBundle",
        };
        invalid(field, e.message)
    })?;
    if name != trust_domain {
        return Err(invalid(
            "metadata.name",
            format!(
                "must be the trust domain, {trust_domain:?} (one object per foreign trust domain)"
            ),
        ));
    }
    if config.iter().any(|c| c == trust_domain) {
        return Err(invalid(
            "spec.trustDomain",
            "the authority's config file federates with this trust domain ([[federation]]); remove one of the two",
        ));
    }
    Ok(relationship)
}

#[derive(Default)]
struct State {
    config: Vec<Relationship>,
    /// Accepted objects by name.
    live: BTreeMap<String, Relationship>,
}

/// The relationships in force at the authority: its config file's and the
/// accepted objects', handed to [`Federation::update`] at every change.
pub struct Relationships {
    federation: Arc<Federation>,
    state: Mutex<State>,
}

impl Relationships {
    /// Puts the config file's relationships in force.
    pub fn new(federation: Arc<Federation>, config: Vec<Relationship>) -> Arc<Self> {
        let this = Arc::new(Self {
            federation,
            state: Mutex::new(State {
                config,
                ..State::default()
            }),
        });
        this.publish(&this.state.lock());
        this
    }

    /// Replaces the config file's relationships (SIGHUP).
    pub fn set_config(&self, config: Vec<Relationship>) {
        let mut state = self.state.lock();
        state.config = config;
        self.publish(&state);
    }

    fn config_domains(&self) -> Vec<String> {
        self.state
            .lock()
            .config
            .iter()
            .map(|r| r.trust_domain.as_str().to_string())
            .collect()
    }

    /// Applies a (re)list (`present`: every object's name) or a watch event.
    fn apply(
        &self,
        present: Option<&[String]>,
        accepted: Vec<(String, Relationship)>,
        removed: Option<&str>,
    ) {
        let mut state = self.state.lock();
        let before = state.live.clone();
        if let Some(present) = present {
            state.live.retain(|name, _| present.contains(name));
        }
        if let Some(name) = removed {
            state.live.remove(name);
        }
        for (name, r) in accepted {
            state.live.insert(name, r);
        }
        if state.live != before {
            tracing::info!(
                objects = state.live.len(),
                "FederationRelationship objects in force changed"
            );
            self.publish(&state);
        }
    }

    fn publish(&self, state: &State) {
        let config_domains: Vec<&str> = state
            .config
            .iter()
            .map(|r| r.trust_domain.as_str())
            .collect();
        let all = state
            .config
            .iter()
            .chain(
                state
                    .live
                    .values()
                    // The config file's own wins (the object is refused, but
                    // may have been accepted before the config named it).
                    .filter(|r| !config_domains.contains(&r.trust_domain.as_str())),
            )
            .cloned()
            .collect();
        self.federation.update(all);
    }
}

/// Watches `FederationRelationship` objects until `shutdown`, writing each
/// object's verdict to its status.
pub fn start(
    kube: Arc<KubeClient>,
    relationships: Arc<Relationships>,
    td: spiffe::TrustDomain,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) {
    for verb in ["list", "watch"] {
        kube.also_need(verb, GROUP, PLURAL, "");
    }
    let statuses = StatusWriter::start(kube.clone(), clock, shutdown.clone());
    tokio::spawn(async move {
        let check = |obj: &Value| -> Option<(String, Option<Relationship>)> {
            let name = obj["metadata"]["name"].as_str()?.to_string();
            let verdict = relationship_of(obj, &td, &relationships.config_domains());
            if let Err(e) = &verdict {
                tracing::warn!(object = %format!("{KIND}/{name}"), error = %e, "federation relationship refused");
            }
            let summary = verdict.as_ref().map(|r| {
                format!(
                    "{} from {} ({})",
                    r.trust_domain.as_str(),
                    r.url,
                    r.profile.name()
                )
            });
            statuses.report(status_path(&name), obj, summary.as_deref().map_err(|e| *e));
            Some((name, verdict.ok()))
        };
        informer::run(
            &kube,
            &collection(),
            PLURAL,
            &shutdown,
            |change| match change {
                Change::Reset(items) => {
                    let mut present = Vec::new();
                    let mut accepted = Vec::new();
                    for obj in &items {
                        if let Some((name, verdict)) = check(obj) {
                            present.push(name.clone());
                            if let Some(r) = verdict {
                                accepted.push((name, r));
                            }
                        }
                    }
                    relationships.apply(Some(&present), accepted, None);
                }
                Change::Upsert(obj) => {
                    if let Some((name, Some(r))) = check(&obj) {
                        relationships.apply(None, vec![(name, r)], None);
                    }
                }
                Change::Delete(obj) => {
                    if let Some(name) = obj["metadata"]["name"].as_str() {
                        relationships.apply(None, Vec::new(), Some(name));
                    }
                }
                Change::Synced => {}
            },
        )
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn td() -> spiffe::TrustDomain {
        spiffe::TrustDomain::new("example.org").unwrap()
    }

    /// Refused for the profile before it is parsed.
    const PEM: &str = "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n";

    fn object(name: &str, spec: Value) -> Value {
        json!({"metadata": {"name": name, "generation": 1}, "spec": spec})
    }

    fn field(name: &str, spec: Value) -> String {
        relationship_of(&object(name, spec), &td(), &["config.example".into()])
            .unwrap_err()
            .field
    }

    #[test]
    fn an_https_web_object_becomes_a_relationship() {
        let r = relationship_of(
            &object(
                "cloud.example",
                json!({"trustDomain": "cloud.example", "bundleEndpointUrl": "https://cloud.example/bundle",
                       "bundleEndpointProfile": "https_web"}),
            ),
            &td(),
            &[],
        )
        .unwrap();
        assert_eq!(r.trust_domain.as_str(), "cloud.example");
        assert_eq!(
            r.profile,
            crate::federation::Profile::HttpsWeb { ca_file: None }
        );
    }

    #[test]
    fn invalid_objects_name_the_field() {
        let web = |td: &str| json!({"trustDomain": td, "bundleEndpointUrl": "https://x.example/", "bundleEndpointProfile": "https_web"});
        assert_eq!(field("a.example", json!(null)), "spec");
        assert_eq!(
            field(
                "a.example",
                json!({"bundleEndpointUrl": "https://x/", "bundleEndpointProfile": "https_web"})
            ),
            "spec.trustDomain"
        );
        assert_eq!(field("Bad", web("Bad")), "spec.trustDomain");
        assert_eq!(
            field("example.org", web("example.org")),
            "spec.trustDomain",
            "its own"
        );
        assert_eq!(
            field("config.example", web("config.example")),
            "spec.trustDomain",
            "the config file's"
        );
        assert_eq!(field("other.example", web("a.example")), "metadata.name");
        assert_eq!(
            field(
                "a.example",
                json!({"trustDomain": "a.example", "bundleEndpointUrl": "http://x/", "bundleEndpointProfile": "https_web"})
            ),
            "spec.bundleEndpointUrl"
        );
        assert_eq!(
            field(
                "a.example",
                json!({"trustDomain": "a.example", "bundleEndpointUrl": "https://x/", "bundleEndpointProfile": "ftp"})
            ),
            "spec.bundleEndpointProfile"
        );
        assert_eq!(
            field(
                "a.example",
                json!({"trustDomain": "a.example", "bundleEndpointUrl": "https://x/", "bundleEndpointProfile": "https_spiffe"})
            ),
            "spec.endpointSpiffeId"
        );
        assert_eq!(
            field(
                "a.example",
                json!({"trustDomain": "a.example", "bundleEndpointUrl": "https://x/", "bundleEndpointProfile": "https_spiffe",
                                      "endpointSpiffeId": "spiffe://a.example/server"})
            ),
            "spec.bootstrapBundle",
            "required when the endpoint is in the domain it serves"
        );
        assert_eq!(
            field(
                "a.example",
                json!({"trustDomain": "a.example", "bundleEndpointUrl": "https://x/", "bundleEndpointProfile": "https_spiffe",
                                      "endpointSpiffeId": "spiffe://a.example/server", "bootstrapBundle": "not a bundle"})
            ),
            "spec.bootstrapBundle"
        );
        assert_eq!(
            field(
                "a.example",
                json!({"trustDomain": "a.example", "bundleEndpointUrl": "https://x/", "bundleEndpointProfile": "https_web",
                                      "bootstrapBundle": PEM})
            ),
            "spec.bootstrapBundle",
            "https_web has none"
        );
        assert_eq!(
            field(
                "a.example",
                json!({"trustDomain": "a.example", "bundleEndpointUrl": 7, "bundleEndpointProfile": "https_web"})
            ),
            "spec.bundleEndpointUrl"
        );
    }
}
