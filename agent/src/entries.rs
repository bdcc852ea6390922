//! Registration entries: which selector sets get which SPIFFE IDs.
//!
//! An entry matches a workload when every one of its selectors holds (a
//! selector without a value only requires the type to be present). Entries
//! are checked in config order; every matching entry yields an identity, the
//! first one is the workload's default. Templates such as
//! `spiffe://td/ns/{k8s:ns}/sa/{k8s:sa}` fill placeholders from the
//! workload's selectors; a placeholder whose selector is missing or whose
//! value is not a valid path segment makes the entry not match.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tessera_attestor::{Selector, SelectorSet};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder(String),
}

/// A SPIFFE ID with optional `{selector-type}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdTemplate {
    parts: Vec<Part>,
    trust_domain: String,
}

impl IdTemplate {
    /// Parse and validate: with every placeholder replaced by a plain segment
    /// the result must be a valid SPIFFE ID with a non-root path.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| format!("unclosed '{{' in {text:?}"))?;
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let kind = &rest[open + 1..close];
            let sel = Selector::parse(kind).map_err(|_| {
                format!("placeholder {{{kind}}} must name a selector type such as {{k8s:ns}}")
            })?;
            if !sel.value().is_empty() {
                return Err(format!(
                    "placeholder {{{kind}}} must be a selector type without a value"
                ));
            }
            parts.push(Part::Placeholder(sel.kind().to_string()));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched '}}' in {text:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        let sample = render_with(&parts, |_| Some("x"));
        let id = spiffe::SpiffeId::new(&sample)
            .map_err(|e| format!("invalid SPIFFE ID {text:?}: {e}"))?;
        if id.path().is_empty() {
            return Err(format!(
                "{text:?} has no path; workload SPIFFE IDs need one"
            ));
        }
        if sample.len() > 2048 {
            return Err("SPIFFE IDs are limited to 2048 bytes".into());
        }
        if let Some(Part::Literal(first)) = parts.first() {
            let after_scheme = first
                .strip_prefix("spiffe://")
                .ok_or_else(|| format!("{text:?} must start with lowercase \"spiffe://\""))?;
            let Some((td, _)) = after_scheme.split_once('/') else {
                return Err("placeholders are only allowed in the path".into());
            };
            // Parsers normalise case; a config must already be canonical so the
            // ID it shows is the ID that is issued.
            if td != id.trust_domain_name() {
                return Err(format!("trust domain {td:?} must be lowercase"));
            }
        }
        Ok(Self {
            trust_domain: id.trust_domain_name().to_string(),
            parts,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Render for a workload; `None` if a placeholder cannot be filled or the
    /// result is not a valid SPIFFE ID.
    pub fn render(&self, selectors: &SelectorSet) -> Option<spiffe::SpiffeId> {
        let text = render_with(&self.parts, |kind| selectors.first_value(kind));
        // The SPIFFE ID spec caps IDs at 2048 bytes; `SpiffeId::new` does not
        // check it, and a long selector value (found by the `spiffe_id` fuzz
        // target) must not produce an over-long ID.
        if text.len() > 2048 {
            return None;
        }
        spiffe::SpiffeId::new(&text).ok()
    }

    /// The template as written (`{type}` for each placeholder): what parses
    /// back to the same template.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Placeholder(k) => {
                    out.push('{');
                    out.push_str(k);
                    out.push('}');
                }
            }
        }
        out
    }

    /// The literal text before the first placeholder (the whole ID if it has
    /// none).
    pub fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Literal(s)) => s,
            _ => "",
        }
    }

    /// The selector types the template fills in.
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Placeholder(k) => Some(k.as_str()),
            Part::Literal(_) => None,
        })
    }
}

fn render_with<'v>(parts: &[Part], mut value: impl FnMut(&str) -> Option<&'v str>) -> String {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Literal(s) => out.push_str(s),
            Part::Placeholder(kind) => match value(kind) {
                // A value with '/' would add path segments; refuse it.
                Some(v) if !v.is_empty() && !v.contains('/') => out.push_str(v),
                _ => out.push_str("//invalid"),
            },
        }
    }
    out
}

/// One registration entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub template: IdTemplate,
    pub selectors: Vec<Selector>,
    pub hint: Option<String>,
    pub x509_ttl: Duration,
    pub jwt_ttl: Duration,
    pub wit_ttl: Duration,
    /// Foreign trust domains (names, without `spiffe://`) whose bundles the
    /// workload receives and trusts.
    pub federates_with: Arc<[String]>,
}

/// An identity a workload is entitled to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub spiffe_id: spiffe::SpiffeId,
    pub hint: Option<String>,
    pub x509_ttl: Duration,
    pub jwt_ttl: Duration,
    pub wit_ttl: Duration,
    /// The entry's `federates_with`.
    pub federates_with: Arc<[String]>,
}

/// The foreign trust domains any of `identities` federates with (names,
/// possibly repeated): what a workload holding them may trust.
pub fn federated_domains(identities: &[Identity]) -> impl Iterator<Item = &str> {
    identities
        .iter()
        .flat_map(|i| i.federates_with.iter().map(String::as_str))
}

/// The ordered set of entries in force, indexed so that matching a workload
/// only looks at entries that can apply to it.
///
/// Every entry is filed under one *anchor*: its first exact selector
/// (`type:value`), or, if it has none, the type of its first selector. An
/// entry can only match a workload that has its anchor, so the candidates for
/// a workload are the entries filed under its selectors and its selector
/// types; they are then checked in full, in config order.
#[derive(Debug, Clone, Default)]
pub struct EntrySet {
    entries: Arc<[Entry]>,
    /// kind -> value -> entry indices (value "" = filed by type only).
    index: Arc<HashMap<String, HashMap<String, Vec<usize>>>>,
}

impl EntrySet {
    pub fn new(entries: Vec<Entry>) -> Self {
        let mut index: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let anchor = entry
                .selectors
                .iter()
                .find(|s| !s.value().is_empty())
                .or_else(|| entry.selectors.first());
            if let Some(a) = anchor {
                index
                    .entry(a.kind().to_string())
                    .or_default()
                    .entry(a.value().to_string())
                    .or_default()
                    .push(i);
            }
        }
        Self {
            entries: entries.into(),
            index: Arc::new(index),
        }
    }

    /// Indices of the entries that can apply to `selectors`, in config order.
    fn candidates(&self, selectors: &SelectorSet) -> Vec<usize> {
        let mut out = Vec::new();
        let mut last_kind = None;
        for s in selectors.iter() {
            let Some(by_value) = self.index.get(s.kind()) else {
                continue;
            };
            if last_kind != Some(s.kind()) {
                // Selectors are sorted, so each type is seen as one run.
                last_kind = Some(s.kind());
                if let Some(typed) = by_value.get("") {
                    out.extend_from_slice(typed);
                }
            }
            if let Some(exact) = by_value.get(s.value()) {
                out.extend_from_slice(exact);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// Identities for a workload, default first. An ID produced by several
    /// entries appears once (first entry wins); so does a non-empty hint,
    /// since hints must be unique within a response.
    pub fn identities_for(&self, selectors: &SelectorSet) -> Vec<Identity> {
        let mut out: Vec<Identity> = Vec::new();
        for entry in self
            .candidates(selectors)
            .into_iter()
            .map(|i| &self.entries[i])
        {
            if !entry.selectors.iter().all(|s| selectors.satisfies(s)) {
                continue;
            }
            if entry
                .template
                .placeholders()
                .any(|k| selectors.first_value(k).is_none())
            {
                continue;
            }
            let Some(spiffe_id) = entry.template.render(selectors) else {
                tracing::debug!(template = ?entry.template, "selector value not usable in a SPIFFE ID; entry skipped");
                continue;
            };
            if out.iter().any(|i| i.spiffe_id == spiffe_id) {
                continue;
            }
            let hint = entry
                .hint
                .clone()
                .filter(|h| !out.iter().any(|i| i.hint.as_deref() == Some(h.as_str())));
            out.push(Identity {
                spiffe_id,
                hint,
                x509_ttl: entry.x509_ttl,
                jwt_ttl: entry.jwt_ttl,
                wit_ttl: entry.wit_ttl,
                federates_with: entry.federates_with.clone(),
            });
        }
        out
    }
}

/// Where an agent's entries come from: its config file (replaced on
/// SIGHUP) and, in upstream mode, the fleet authority's live entries
/// (custom resources in the Kubernetes API). Open streams see every change
/// of either through the one channel they watch; config-file entries come
/// first.
pub struct EntrySources {
    tx: tokio::sync::watch::Sender<EntrySet>,
    parts: crate::sync::Mutex<(Vec<Entry>, Vec<Entry>)>,
}

impl EntrySources {
    pub fn new(local: &EntrySet) -> Self {
        Self {
            tx: tokio::sync::watch::Sender::new(local.clone()),
            parts: crate::sync::Mutex::new((local.iter().cloned().collect(), Vec::new())),
        }
    }

    /// What streams and callers watch.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<EntrySet> {
        self.tx.subscribe()
    }

    /// The config file's entries (at start and on SIGHUP).
    pub fn set_local(&self, local: &EntrySet) {
        let all = {
            let mut parts = self.parts.lock();
            parts.0 = local.iter().cloned().collect();
            parts.0.iter().chain(&parts.1).cloned().collect()
        };
        self.tx.send_replace(EntrySet::new(all));
    }

    /// The fleet's live entries, whole, as the authority last sent them.
    pub fn set_fleet(&self, fleet: Vec<Entry>) {
        let all = {
            let mut parts = self.parts.lock();
            parts.1 = fleet;
            parts.0.iter().chain(&parts.1).cloned().collect()
        };
        self.tx.send_replace(EntrySet::new(all));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, sels: &[&str], hint: Option<&str>) -> Entry {
        Entry {
            template: IdTemplate::parse(id).unwrap(),
            selectors: sels.iter().map(|s| Selector::parse(s).unwrap()).collect(),
            hint: hint.map(str::to_string),
            x509_ttl: Duration::from_secs(3600),
            jwt_ttl: Duration::from_secs(300),
            wit_ttl: Duration::from_secs(3600),
            federates_with: Default::default(),
        }
    }

    fn workload(sels: &[&str]) -> SelectorSet {
        SelectorSet::new(sels.iter().map(|s| Selector::parse(s).unwrap()).collect())
    }

    #[test]
    fn templates_fill_from_selectors() {
        let set = EntrySet::new(vec![entry(
            "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}",
            &["k8s:ns"],
            None,
        )]);
        let ids = set.identities_for(&workload(&["k8s:ns:prod", "k8s:sa:api"]));
        assert_eq!(ids.len(), 1);
        assert_eq!(
            ids[0].spiffe_id.to_string(),
            "spiffe://example.org/ns/prod/sa/api"
        );
        assert!(
            set.identities_for(&workload(&["k8s:ns:prod"])).is_empty(),
            "missing sa"
        );
        assert!(
            set.identities_for(&workload(&["k8s:ns:a/b", "k8s:sa:x"]))
                .is_empty(),
            "slash in value"
        );
        assert!(
            set.identities_for(&workload(&["k8s:ns:..", "k8s:sa:x"]))
                .is_empty(),
            "dot-dot segment"
        );
    }

    #[test]
    fn all_selectors_must_match_and_order_is_kept() {
        let set = EntrySet::new(vec![
            entry(
                "spiffe://example.org/a",
                &["unix:uid:1000", "unix:gid:1000"],
                Some("a"),
            ),
            entry("spiffe://example.org/b", &["unix:uid:1000"], Some("a")),
            entry("spiffe://example.org/a", &["unix:uid"], None),
            entry("spiffe://example.org/c", &["unix:uid:0"], None),
        ]);
        let ids = set.identities_for(&workload(&["unix:uid:1000", "unix:gid:1000"]));
        let names: Vec<_> = ids.iter().map(|i| i.spiffe_id.to_string()).collect();
        assert_eq!(names, ["spiffe://example.org/a", "spiffe://example.org/b"]);
        assert_eq!(ids[0].hint.as_deref(), Some("a"));
        assert_eq!(ids[1].hint, None, "duplicate hint dropped");
        let ids = set.identities_for(&workload(&["unix:uid:1000"]));
        assert_eq!(ids[0].spiffe_id.to_string(), "spiffe://example.org/b");
    }

    #[test]
    fn the_index_finds_exactly_what_a_full_scan_finds() {
        let entries = vec![
            entry(
                "spiffe://example.org/a",
                &["unix:uid:1", "unix:gid:2"],
                None,
            ),
            entry("spiffe://example.org/b", &["unix:gid:2"], None),
            entry("spiffe://example.org/ns/{k8s:ns}", &["k8s:ns"], None),
            entry(
                "spiffe://example.org/c",
                &["k8s:ns", "k8s:pod-label:app:web"],
                None,
            ),
            entry(
                "spiffe://example.org/d",
                &["unix:uid", "k8s:sa:default"],
                None,
            ),
            entry("spiffe://example.org/e", &["unix:uid:1"], None),
        ];
        let set = EntrySet::new(entries.clone());
        let workloads: [&[&str]; 6] = [
            &["unix:uid:1", "unix:gid:2"],
            &["unix:uid:1"],
            &["unix:gid:2", "k8s:ns:prod"],
            &[
                "k8s:ns:prod",
                "k8s:pod-label:app:web",
                "k8s:sa:default",
                "unix:uid:9",
            ],
            &["k8s:sa:default"],
            &[],
        ];
        for w in workloads {
            let sels = workload(w);
            let scanned: Vec<String> = entries
                .iter()
                .filter(|e| e.selectors.iter().all(|s| sels.satisfies(s)))
                .filter_map(|e| e.template.render(&sels))
                .map(|id| id.to_string())
                .collect();
            let indexed: Vec<String> = set
                .identities_for(&sels)
                .iter()
                .map(|i| i.spiffe_id.to_string())
                .collect();
            assert_eq!(indexed, scanned, "workload {w:?}");
        }
    }

    #[test]
    fn template_validation() {
        assert!(
            IdTemplate::parse("spiffe://example.org").is_err(),
            "no path"
        );
        assert!(IdTemplate::parse("spiffe://example.org/{k8s:ns").is_err());
        assert!(IdTemplate::parse("spiffe://example.org/{k8s:ns:x}").is_err());
        assert!(IdTemplate::parse("spiffe://{k8s:ns}/x").is_err());
        assert!(IdTemplate::parse("spiffe://example.org/u-{unix:uid}").is_ok());
    }
}
