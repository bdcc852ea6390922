//! Which SPIFFE IDs a node may have signed.
//!
//! The authority trusts only what it can check itself: the node's own
//! identity (`tessera:node:<name>`) and, for Kubernetes nodes, the pods the
//! API server has scheduled on that node (every `k8s:` selector, built from
//! the API's pod objects exactly as the agent builds them from the kubelet's).
//! An entry entitles a node to an ID when, for the node or one container of a
//! pod on it, every selector of a type the authority can verify matches and
//! the ID template renders to that ID from those facts alone. Selectors only
//! the node can see (`unix:uid`, paths) are the agent's to check: a
//! compromised node can lie about them, but only among its own workloads.
//! An entry with no verifiable selector entitles no node at all.

use tessera_attestor::pods::{self, PodList};
use tessera_attestor::{Selector, SelectorSet};

use super::{NODE_SELECTOR, Node, NodeKind};
use crate::entries::{Entry, EntrySet};

/// Selector types whose facts the authority checks itself.
pub fn verifiable(kind: &str) -> bool {
    kind == NODE_SELECTOR || kind.starts_with("k8s:")
}

/// Facts about `node`: one set for the node itself and, on Kubernetes, one per
/// container of each live pod scheduled on it.
pub fn facts(node: &Node, pods: Option<&PodList>) -> Vec<SelectorSet> {
    let node_sel = Selector::new(NODE_SELECTOR, &node.name);
    let mut out = vec![SelectorSet::new(vec![node_sel.clone()])];
    if node.kind != NodeKind::Kubernetes {
        return out;
    }
    for pod in pods.into_iter().flat_map(|l| &l.items) {
        if pod.spec.node_name != node.name
            || matches!(pod.status.phase.as_str(), "Succeeded" | "Failed")
        {
            continue;
        }
        for c in pod
            .status
            .container_statuses
            .iter()
            .chain(&pod.status.init_container_statuses)
            .chain(&pod.status.ephemeral_container_statuses)
        {
            let mut s = pods::selectors(pod, c);
            s.push(node_sel.clone());
            out.push(SelectorSet::new(s));
        }
    }
    out
}

/// The first entry (config order) that entitles a node with `facts` to `id`.
pub fn entitling_entry<'e>(
    entries: &'e EntrySet,
    facts: &[SelectorSet],
    id: &spiffe::SpiffeId,
) -> Option<&'e Entry> {
    if super::is_reserved(id) {
        return None;
    }
    entries.iter().find(|e| {
        let mut checked = e
            .selectors
            .iter()
            .filter(|s| verifiable(s.kind()))
            .peekable();
        if checked.peek().is_none() {
            return false;
        }
        let checked: Vec<&Selector> = checked.collect();
        facts.iter().any(|f| {
            checked.iter().all(|s| f.satisfies(s)) && e.template.render(f).as_ref() == Some(id)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entries::IdTemplate;
    use std::time::Duration;

    fn entry(template: &str, selectors: &[&str]) -> Entry {
        Entry {
            template: IdTemplate::parse(template).unwrap(),
            selectors: selectors
                .iter()
                .map(|s| Selector::parse(s).unwrap())
                .collect(),
            hint: None,
            x509_ttl: Duration::from_secs(3600),
            jwt_ttl: Duration::from_secs(300),
        }
    }

    fn pod_list(json: &str) -> PodList {
        serde_json::from_str(json).unwrap()
    }

    const PODS: &str = r#"{"kind":"PodList","apiVersion":"v1","items":[
      {"metadata":{"name":"web-1","namespace":"shop","uid":"u1","labels":{"app":"web"}},
       "spec":{"serviceAccountName":"web","nodeName":"node-a"},
       "status":{"phase":"Running","containerStatuses":[{"name":"web","image":"shop/web:1","imageID":"sha256:1","containerID":"containerd://c1"}]}},
      {"metadata":{"name":"old-1","namespace":"shop","uid":"u2"},
       "spec":{"serviceAccountName":"batch","nodeName":"node-a"},
       "status":{"phase":"Succeeded","containerStatuses":[{"name":"job","image":"shop/job:1","imageID":"","containerID":"containerd://c2"}]}}
    ]}"#;

    #[test]
    fn kubernetes_nodes_get_only_what_runs_on_them() {
        let entries = EntrySet::new(vec![
            entry("spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}", &["k8s:ns"]),
            entry("spiffe://example.org/uid-only", &["unix:uid:1000"]),
            entry("spiffe://example.org/vm/{tessera:node}", &["tessera:node"]),
        ]);
        let a = Node {
            kind: NodeKind::Kubernetes,
            name: "node-a".into(),
        };
        let b = Node {
            kind: NodeKind::Kubernetes,
            name: "node-b".into(),
        };
        let list = pod_list(PODS);
        let id = |s: &str| spiffe::SpiffeId::new(s).unwrap();
        let fa = facts(&a, Some(&list));
        let fb = facts(&b, Some(&list));
        assert!(
            entitling_entry(&entries, &fa, &id("spiffe://example.org/ns/shop/sa/web")).is_some()
        );
        // Not on node B.
        assert!(
            entitling_entry(&entries, &fb, &id("spiffe://example.org/ns/shop/sa/web")).is_none()
        );
        // A finished pod entitles nothing.
        assert!(
            entitling_entry(&entries, &fa, &id("spiffe://example.org/ns/shop/sa/batch")).is_none()
        );
        // An entry the authority cannot check at all entitles nobody.
        assert!(entitling_entry(&entries, &fa, &id("spiffe://example.org/uid-only")).is_none());
        // The node's own facts.
        assert!(entitling_entry(&entries, &fb, &id("spiffe://example.org/vm/node-b")).is_some());
        assert!(entitling_entry(&entries, &fb, &id("spiffe://example.org/vm/node-a")).is_none());
    }

    #[test]
    fn unverifiable_selectors_are_left_to_the_agent_but_reserved_ids_never_issue() {
        let entries = EntrySet::new(vec![
            entry(
                "spiffe://example.org/vm-a/db",
                &["tessera:node:vm-a", "unix:uid:999"],
            ),
            entry(
                "spiffe://example.org/tessera/node/join/{tessera:node}",
                &["tessera:node"],
            ),
        ]);
        let a = Node {
            kind: NodeKind::Joined,
            name: "vm-a".into(),
        };
        let b = Node {
            kind: NodeKind::Joined,
            name: "vm-b".into(),
        };
        let db = spiffe::SpiffeId::new("spiffe://example.org/vm-a/db").unwrap();
        assert!(entitling_entry(&entries, &facts(&a, None), &db).is_some());
        assert!(entitling_entry(&entries, &facts(&b, None), &db).is_none());
        let node_id = spiffe::SpiffeId::new("spiffe://example.org/tessera/node/join/vm-a").unwrap();
        assert!(entitling_entry(&entries, &facts(&a, None), &node_id).is_none());
    }
}
