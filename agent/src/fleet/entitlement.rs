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
        // A container the kubelet has not reported yet is known from the
        // spec (`Pod::complete_statuses_from_spec`): its first SVID must not
        // wait for the status to reach the API server.
        let mut completed = pod.clone();
        let pod = if completed.complete_statuses_from_spec() {
            &completed
        } else {
            pod
        };
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

/// Why `entry` can never yield an SVID in fleet mode, if so. In fleet mode
/// such an entry is skipped at load with a warning; kept, every call of a
/// caller matching it would only be refused.
///
/// * Its ID template uses a value only the node can see (`{unix:uid}`): the
///   authority can never render the ID from facts it checks, on either side.
/// * On the authority (`authority = true`), it has no selector the authority
///   can verify: it entitles no node. (An agent's entry may still have only
///   `unix:*` selectors: the ID it gives is checked against the authority's
///   own entries.)
pub fn never_entitled(entry: &Entry, authority: bool) -> Option<String> {
    if let Some(p) = entry.template.placeholders().find(|p| !verifiable(p)) {
        return Some(format!(
            "its SPIFFE ID uses {{{p}}}, a value only the node can see, so the fleet authority can never confirm the ID"
        ));
    }
    if authority && !entry.selectors.iter().any(|s| verifiable(s.kind())) {
        return Some(format!(
            "it has no selector the fleet authority can verify ({NODE_SELECTOR} or k8s:*), so it entitles no node"
        ));
    }
    None
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
            wit_ttl: Duration::from_secs(3600),
            federates_with: Default::default(),
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
    fn entries_no_node_can_have_are_named() {
        let uid_template = entry("spiffe://example.org/u/{unix:uid}", &["k8s:ns:shop"]);
        for side in [true, false] {
            assert!(
                never_entitled(&uid_template, side)
                    .unwrap()
                    .contains("{unix:uid}")
            );
        }
        let unix_only = entry("spiffe://example.org/u", &["unix:uid:0"]);
        assert!(
            never_entitled(&unix_only, true)
                .unwrap()
                .contains("no selector")
        );
        // On a node, the ID may be entitled by another of the authority's entries.
        assert_eq!(never_entitled(&unix_only, false), None);
        let fine = entry(
            "spiffe://example.org/ns/{k8s:ns}",
            &["k8s:ns", "unix:uid:0"],
        );
        assert_eq!(never_entitled(&fine, true), None);
    }

    #[test]
    fn a_container_not_yet_reported_is_known_from_the_spec() {
        let entries = EntrySet::new(vec![
            entry(
                "spiffe://example.org/ns/{k8s:ns}/c/{k8s:container-name}",
                &["k8s:ns:shop", "k8s:container-image:shop/web:2"],
            ),
            entry(
                "spiffe://example.org/pinned",
                &["k8s:ns:shop", "k8s:container-image:sha256:beef"],
            ),
        ]);
        let list = pod_list(
            r#"{"items":[{"metadata":{"name":"web-2","namespace":"shop","uid":"u3"},
              "spec":{"serviceAccountName":"web","nodeName":"node-a",
                      "containers":[{"name":"web","image":"shop/web:2"}]},
              "status":{"phase":"Pending"}}]}"#,
        );
        let a = Node {
            kind: NodeKind::Kubernetes,
            name: "node-a".into(),
        };
        let f = facts(&a, Some(&list));
        let id = |s: &str| spiffe::SpiffeId::new(s).unwrap();
        assert!(
            entitling_entry(&entries, &f, &id("spiffe://example.org/ns/shop/c/web")).is_some(),
            "entitled from the spec before the kubelet reports"
        );
        // What only the kubelet's report can say (the image ID) is not assumed.
        assert!(entitling_entry(&entries, &f, &id("spiffe://example.org/pinned")).is_none());
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
