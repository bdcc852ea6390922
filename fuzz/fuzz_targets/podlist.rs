//! The kubelet's `/pods` PodList JSON and the `k8s:` selectors derived from
//! it. Input: the response body, as the attestor decodes it
//! (`serde_json::from_slice`).
//!
//! Properties beyond "no panic": every listed container is found again by its
//! own pod UID and bare container ID (the lookup Kubernetes attestation
//! does); every derived selector is a `k8s:` selector with a non-empty value;
//! an entry template such as `spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}`
//! rendered from pod facts stays in its trust domain and keeps its shape (a
//! namespace or service account name cannot add or remove path segments).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_agent::entries::IdTemplate;
use tessera_attestor::SelectorSet;
use tessera_attestor::pods::{self, PodList};

fuzz_target!(|data: &[u8]| {
    let Ok(list) = serde_json::from_slice::<PodList>(data) else {
        return;
    };
    let template =
        IdTemplate::parse("spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}/c/{k8s:container-name}")
            .expect("fixed template");
    for pod in &list.items {
        let statuses = pod
            .status
            .container_statuses
            .iter()
            .chain(&pod.status.init_container_statuses)
            .chain(&pod.status.ephemeral_container_statuses);
        for status in statuses {
            let (found_pod, found) = list
                .find(Some(&pod.metadata.uid), status.bare_id())
                .expect("a listed container is found by its pod UID and ID");
            assert_eq!(found_pod.metadata.uid, pod.metadata.uid);
            assert_eq!(found.bare_id(), status.bare_id());
            assert!(list.find(None, status.bare_id()).is_some());

            let selectors = pods::selectors(pod, status);
            for s in &selectors {
                assert!(s.kind().starts_with("k8s:"), "{s:?}");
                assert!(!s.value().is_empty(), "{s:?}");
            }
            let set = SelectorSet::new(selectors);
            if let Some(id) = template.render(&set) {
                assert_eq!(id.trust_domain_name(), "example.org");
                let segments: Vec<&str> = id.path().split('/').collect();
                assert_eq!(segments.len(), 7, "{id}");
                assert_eq!(
                    (segments[0], segments[1], segments[3], segments[5]),
                    ("", "ns", "sa", "c"),
                    "{id}"
                );
                assert_eq!(segments[2], pod.metadata.namespace);
                assert_eq!(segments[4], pod.spec.service_account_name);
            }
        }
    }
});
