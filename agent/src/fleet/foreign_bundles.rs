//! Foreign bundles kept in the fleet store, so an authority replica that
//! starts while a foreign bundle endpoint is down serves the bundle the
//! fleet last fetched (not only the bootstrap bundle), and authenticates an
//! `https_spiffe` endpoint with it.
//!
//! On Kubernetes each foreign trust domain's bundle is a `FederatedBundle`
//! object in the store's namespace, named after the trust domain, holding
//! the document exactly as its endpoint served it (`spec.bundle`). Every
//! replica reads them once at start and writes (server-side apply) what it
//! fetches when the document changes; the objects are public keys only. A
//! relationship that ends deletes its object. Another store implements
//! [`KeptBundles`] the same way.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::kube::KubeClient;
use super::registration::{GROUP, VERSION};
use crate::federation::state::{KeptBundles, SaveFuture};
use crate::identity::ForeignBundle;
use crate::sync::Mutex;

pub const KIND: &str = "FederatedBundle";
pub const PLURAL: &str = "federatedbundles";
const FIELD_MANAGER: &str = "tessera-authority";

/// `FederatedBundle` objects in one namespace.
pub struct FederatedBundles {
    kube: Arc<KubeClient>,
    namespace: String,
    /// What was read at start, and what this replica wrote since.
    kept: Mutex<HashMap<String, ForeignBundle>>,
}

/// The object name of `td`'s bundle: the trust domain itself when it is a
/// valid object name (DNS subdomain), else a digest of it. The object's
/// `spec.trustDomain` is what counts; the name only keeps one per domain.
pub fn object_name(td: &spiffe::TrustDomain) -> String {
    let name = td.as_str();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        return name.to_string();
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    format!("td-{}", hex::encode(&digest.as_ref()[..16]))
}

impl FederatedBundles {
    /// Reads the kept bundles of `namespace`. The API server unreachable or
    /// refusing: logged, and the replica starts from bootstrap bundles.
    pub async fn load(kube: Arc<KubeClient>, namespace: String) -> Arc<Self> {
        for verb in ["list", "create", "patch", "delete"] {
            kube.also_need(verb, GROUP, PLURAL, &namespace);
        }
        let path = format!("/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}");
        let mut kept = HashMap::new();
        match kube
            .json(hyper::Method::GET, &path, "application/json", None)
            .await
        {
            Ok(list) => {
                for obj in list["items"].as_array().into_iter().flatten() {
                    match bundle_of(obj) {
                        Ok(b) => {
                            kept.insert(b.trust_domain.as_str().to_string(), b);
                        }
                        Err(why) => {
                            tracing::warn!(object = %obj["metadata"]["name"], error = %why, "ignoring a FederatedBundle object")
                        }
                    }
                }
                tracing::info!(namespace = %namespace, bundles = kept.len(), "foreign bundles kept in the fleet store read");
            }
            Err(e) => {
                tracing::warn!(namespace = %namespace, error = %e, "cannot read the foreign bundles kept in the fleet store (FederatedBundle objects); starting from bootstrap bundles");
            }
        }
        Arc::new(Self {
            kube,
            namespace,
            kept: Mutex::new(kept),
        })
    }

    fn object_path(&self, td: &spiffe::TrustDomain) -> String {
        format!(
            "/apis/{GROUP}/{VERSION}/namespaces/{}/{PLURAL}/{}",
            self.namespace,
            object_name(td)
        )
    }
}

/// The bundle an object holds, checked against the trust domain it names.
fn bundle_of(obj: &Value) -> Result<ForeignBundle, String> {
    let spec = &obj["spec"];
    let name = spec["trustDomain"]
        .as_str()
        .ok_or("spec.trustDomain missing")?;
    let td = spiffe::TrustDomain::new(name).map_err(|e| format!("spec.trustDomain: {e}"))?;
    if obj["metadata"]["name"].as_str() != Some(object_name(&td).as_str()) {
        return Err(format!("not the object of {name}"));
    }
    let doc = spec["bundle"].as_str().ok_or("spec.bundle missing")?;
    ForeignBundle::parse(td, doc.as_bytes()).map_err(|e| format!("spec.bundle: {e}"))
}

impl KeptBundles for FederatedBundles {
    fn load(&self, td: &spiffe::TrustDomain) -> Option<ForeignBundle> {
        self.kept.lock().get(td.as_str()).cloned()
    }

    fn save(&self, bundle: Arc<ForeignBundle>) -> SaveFuture {
        let (kube, path, namespace) = (
            self.kube.clone(),
            self.object_path(&bundle.trust_domain),
            self.namespace.clone(),
        );
        self.kept.lock().insert(
            bundle.trust_domain.as_str().to_string(),
            bundle.as_ref().clone(),
        );
        Box::pin(async move {
            let document = std::str::from_utf8(&bundle.document)
                .map_err(|_| "the bundle is not UTF-8 text".to_string())?;
            let body = json!({
                "apiVersion": format!("{GROUP}/{VERSION}"),
                "kind": KIND,
                "metadata": {"name": object_name(&bundle.trust_domain), "namespace": namespace},
                "spec": {
                    "trustDomain": bundle.trust_domain.as_str(),
                    "sequence": bundle.sequence,
                    "bundle": document,
                },
            });
            kube.json(
                hyper::Method::PATCH,
                &format!("{path}?fieldManager={FIELD_MANAGER}&force=true"),
                "application/apply-patch+yaml",
                Some(&body),
            )
            .await
            .map(|_| ())
            .map_err(|e| format!("writing FederatedBundle {path}: {e}"))
        })
    }

    fn remove(&self, td: &spiffe::TrustDomain) {
        self.kept.lock().remove(td.as_str());
        let (kube, path) = (self.kube.clone(), self.object_path(td));
        tokio::spawn(async move {
            match kube
                .json(hyper::Method::DELETE, &path, "application/json", None)
                .await
            {
                Ok(_) => {}
                Err(e) if e.status == Some(404) => {}
                Err(e) => {
                    tracing::warn!(path, error = %e, "cannot delete the kept bundle of an ended federation")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_the_trust_domain_when_they_can_be() {
        let td = |n: &str| spiffe::TrustDomain::new(n).unwrap();
        assert_eq!(object_name(&td("partner.example")), "partner.example");
        let odd = object_name(&td("under_score.example"));
        assert!(odd.starts_with("td-") && odd.len() == 35, "{odd}");
        assert_ne!(odd, object_name(&td("under-score.example")));
    }

    #[test]
    fn an_object_is_read_only_for_the_trust_domain_it_names() {
        let doc = r#"{"keys": [], "spiffe_sequence": 4}"#;
        let obj = json!({"metadata": {"name": "partner.example"},
                         "spec": {"trustDomain": "partner.example", "bundle": doc}});
        let b = bundle_of(&obj).unwrap();
        assert_eq!(b.sequence, Some(4));
        assert_eq!(&b.document[..], doc.as_bytes());
        let mut moved = obj.clone();
        moved["metadata"]["name"] = json!("other.example");
        assert!(
            bundle_of(&moved).is_err(),
            "an object named for another domain"
        );
        let mut broken = obj;
        broken["spec"]["bundle"] = json!("{");
        assert!(bundle_of(&broken).is_err());
    }
}
