//! Policy slicing: a ready [`PolicySet`] per (action, audience) key.
//!
//! Every policy is filed under its action keys (`action == A`, `action in
//! [A, B]` including the members of action groups, or *any*) and its resource
//! key (`resource == / in Tessera::Audience::"x"`, or *any*). The slice for a
//! request (a, r) is `P(a,r) ∪ P(a,*) ∪ P(*,r) ∪ P(*,*)`; it contains every
//! policy whose scope can match, so evaluating it gives the same decision as
//! evaluating the whole set. Unknown actions and audiences fall back to the
//! `*` slices.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cedar_policy::{EntityId, EntityTypeName, EntityUid, Policy, PolicySet};

/// Above this many (action, audience) combinations coming only from
/// unconstrained policies, those combinations are not precomputed: such a
/// lookup evaluates two disjoint slices instead of one.
pub(super) const MAX_CROSS_SLICES: usize = 10_000;

/// The actions a policy's scope can match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ActionKeys {
    Any,
    Some(Vec<String>),
}

/// The audience a policy's scope can match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ResourceKey {
    Any,
    One(String),
}

pub(super) struct Slice {
    set: PolicySet,
    len: usize,
}

impl Slice {
    fn new<'p>(policies: impl IntoIterator<Item = &'p Policy>) -> Result<Self, String> {
        let set = PolicySet::from_policies(policies.into_iter().cloned())
            .map_err(|e| format!("building a policy slice: {e}"))?;
        let len = set.num_of_policies();
        Ok(Self { set, len })
    }
}

struct ActionEntry {
    uid: EntityUid,
    /// `P(a,*) ∪ P(*,*)`, for audiences with no specific policy.
    default: Slice,
    /// `P(a,r) ∪ P(a,*) ∪ P(*,r) ∪ P(*,*)`.
    by_resource: HashMap<String, Slice>,
}

pub(super) struct Index {
    action_type: EntityTypeName,
    actions: HashMap<String, ActionEntry>,
    /// `P(*,*)`.
    any: Slice,
    /// `P(*,r) ∪ P(*,*)`, for actions no policy names.
    any_by_resource: HashMap<String, Slice>,
    /// `P(*,r)` alone; filled only when the cross product was too large.
    rr_only: HashMap<String, Slice>,
}

/// The slices to evaluate for one (scope, audience): one, or two disjoint ones.
pub(super) struct Lookup<'a> {
    first: &'a Slice,
    second: Option<&'a Slice>,
    uid: Option<&'a EntityUid>,
    action_type: &'a EntityTypeName,
}

impl Lookup<'_> {
    /// No policy can match: deny without calling Cedar.
    pub(super) fn is_empty(&self) -> bool {
        self.first.len == 0 && self.second.is_none_or(|s| s.len == 0)
    }

    pub(super) fn sets(&self) -> impl Iterator<Item = &PolicySet> {
        std::iter::once(self.first)
            .chain(self.second)
            .filter(|s| s.len > 0)
            .map(|s| &s.set)
    }

    pub(super) fn action_uid(&self, scope: &str) -> EntityUid {
        match self.uid {
            Some(uid) => uid.clone(),
            None => {
                EntityUid::from_type_name_and_id(self.action_type.clone(), EntityId::new(scope))
            }
        }
    }
}

impl Index {
    pub(super) fn build(
        action_type: EntityTypeName,
        policies: &[(Policy, ActionKeys, ResourceKey)],
        max_cross_slices: usize,
    ) -> Result<Self, String> {
        // Disjoint buckets of policy indices.
        let mut any_any: Vec<usize> = Vec::new();
        let mut aa: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut rr: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut exact: BTreeMap<&str, BTreeMap<&str, Vec<usize>>> = BTreeMap::new();
        for (i, (_, actions, resource)) in policies.iter().enumerate() {
            match (actions, resource) {
                (ActionKeys::Any, ResourceKey::Any) => any_any.push(i),
                (ActionKeys::Any, ResourceKey::One(r)) => rr.entry(r).or_default().push(i),
                (ActionKeys::Some(list), ResourceKey::Any) => {
                    for a in dedup(list) {
                        aa.entry(a).or_default().push(i);
                    }
                }
                (ActionKeys::Some(list), ResourceKey::One(r)) => {
                    for a in dedup(list) {
                        exact.entry(a).or_default().entry(r).or_default().push(i);
                    }
                }
            }
        }
        let all_actions: BTreeSet<&str> = aa.keys().chain(exact.keys()).copied().collect();
        let cross = all_actions.len().saturating_mul(rr.len());
        let precompute_cross = cross <= max_cross_slices;

        let slice = |parts: &[&[usize]]| -> Result<Slice, String> {
            let mut idx: Vec<usize> = parts.iter().flat_map(|p| p.iter().copied()).collect();
            idx.sort_unstable();
            idx.dedup();
            Slice::new(idx.into_iter().map(|i| &policies[i].0))
        };
        let empty: Vec<usize> = Vec::new();

        let mut actions = HashMap::with_capacity(all_actions.len());
        for a in &all_actions {
            let a_any = aa.get(a).unwrap_or(&empty);
            let a_exact = exact.get(a);
            let mut resources: BTreeSet<&str> = a_exact
                .map(|m| m.keys().copied().collect())
                .unwrap_or_default();
            if precompute_cross {
                resources.extend(rr.keys().copied());
            }
            let mut by_resource = HashMap::with_capacity(resources.len());
            for r in resources {
                let e = a_exact.and_then(|m| m.get(r)).unwrap_or(&empty);
                let r_any = rr.get(r).unwrap_or(&empty);
                by_resource.insert(r.to_owned(), slice(&[e, a_any, r_any, &any_any])?);
            }
            let uid = EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(a));
            actions.insert(
                (*a).to_owned(),
                ActionEntry {
                    uid,
                    default: slice(&[a_any, &any_any])?,
                    by_resource,
                },
            );
        }
        let mut any_by_resource = HashMap::with_capacity(rr.len());
        let mut rr_only = HashMap::new();
        for (r, r_any) in &rr {
            any_by_resource.insert((*r).to_owned(), slice(&[r_any, &any_any])?);
            if !precompute_cross {
                rr_only.insert((*r).to_owned(), slice(&[r_any])?);
            }
        }
        Ok(Self {
            action_type,
            actions,
            any: slice(&[&any_any])?,
            any_by_resource,
            rr_only,
        })
    }

    pub(super) fn lookup(&self, scope: &str, audience: &str) -> Lookup<'_> {
        let (first, second, uid) = match self.actions.get(scope) {
            Some(entry) => match entry.by_resource.get(audience) {
                Some(s) => (s, None, Some(&entry.uid)),
                None => (&entry.default, self.rr_only.get(audience), Some(&entry.uid)),
            },
            None => (
                self.any_by_resource.get(audience).unwrap_or(&self.any),
                None,
                None,
            ),
        };
        Lookup {
            first,
            second,
            uid,
            action_type: &self.action_type,
        }
    }
}

fn dedup(list: &[String]) -> BTreeSet<&str> {
    list.iter().map(String::as_str).collect()
}
