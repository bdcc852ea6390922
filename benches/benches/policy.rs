//! criterion benchmarks for the token-exchange policy store
//! (`tessera_agent::exchange::policy`): one decision for one scope with 2 and with
//! 1,000 loaded policies (each policy for its own audience and scope, i.e.
//! unrelated to the request but one), against the raw cost of one Cedar
//! `Authorizer::is_authorized` call over the whole 1,000-policy set, which is
//! what an unsliced store would pay.
//!
//! ```sh
//! cargo bench -p tessera-benches --bench policy -- --quick
//! ```

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::str::FromStr;
use std::time::Duration;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid,
    PolicySet, Request, RestrictedExpression,
};
use criterion::{Criterion, criterion_group, criterion_main};
use tessera_agent::exchange::policy::{PolicyRequest, PolicyStore};

const PRINCIPAL: &str = "spiffe://example.org/agents/planner";

/// `n` policies, policy `i` for scope `svc<i>:read` on audience `https://svc<i>.example/mcp`.
fn policies(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "@id(\"svc{i}-read\") @max_ttl(\"5m\")\n\
                 permit(principal, action == Tessera::Action::\"svc{i}:read\",\n\
                 \x20      resource == Tessera::Audience::\"https://svc{i}.example/mcp\")\n\
                 when {{ principal.selectors.contains(\"k8s:ns:prod\") && context.requested_ttl <= 600 }};\n"
            )
        })
        .collect()
}

fn store(n: usize) -> (tempfile::TempDir, PolicyStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("bench.cedar"), policies(n)).expect("write policies");
    let store = PolicyStore::load(Some(dir.path())).expect("load policies");
    assert_eq!(store.policy_count(), n);
    (dir, store)
}

fn uid(ty: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(
        EntityTypeName::from_str(ty).expect("type name"),
        EntityId::new(id),
    )
}

fn benches(c: &mut Criterion) {
    let selectors = vec!["k8s:ns:prod".to_owned(), "unix:uid:1000".to_owned()];
    let scopes = vec!["svc0:read".to_owned()];
    let unknown_scopes = vec!["nobody:read".to_owned()];
    let request = |scopes| PolicyRequest {
        principal: PRINCIPAL,
        selectors: &selectors,
        audience: "https://svc0.example/mcp",
        scopes,
        task_id: "task-42",
        requested_ttl_secs: 300,
        delegation_depth: 0,
        delegator: None,
        approved: false,
    };

    let mut group = c.benchmark_group("policy");
    for n in [2, 1000] {
        let (_dir, store) = store(n);
        let req = request(&scopes);
        assert!(store.evaluate(&req).all_allowed());
        group.bench_function(format!("evaluate_1_scope/{n}_policies"), |b| {
            b.iter(|| store.evaluate(black_box(&req)))
        });
        if n == 1000 {
            let req = request(&unknown_scopes);
            assert!(!store.evaluate(&req).scopes[0].allowed);
            group.bench_function(format!("evaluate_unreferenced_scope/{n}_policies"), |b| {
                b.iter(|| store.evaluate(black_box(&req)))
            });
        }
    }

    // Raw Cedar over the full set: inputs built once, only the authorizer call timed.
    for n in [2, 1000] {
        let set = PolicySet::from_str(&policies(n)).expect("policies");
        let principal = uid("Tessera::Workload", PRINCIPAL);
        let attrs = HashMap::from([
            (
                "spiffe_id".to_owned(),
                RestrictedExpression::new_string(PRINCIPAL.to_owned()),
            ),
            (
                "trust_domain".to_owned(),
                RestrictedExpression::new_string("example.org".to_owned()),
            ),
            (
                "path".to_owned(),
                RestrictedExpression::new_string("/agents/planner".to_owned()),
            ),
            (
                "selectors".to_owned(),
                RestrictedExpression::new_set(
                    selectors
                        .iter()
                        .map(|s| RestrictedExpression::new_string(s.clone())),
                ),
            ),
        ]);
        let entity = Entity::new(principal.clone(), attrs, HashSet::new()).expect("entity");
        let entities = Entities::from_entities([entity], None).expect("entities");
        let context = Context::from_pairs([
            (
                "task".to_owned(),
                RestrictedExpression::new_string("task-42".to_owned()),
            ),
            (
                "requested_ttl".to_owned(),
                RestrictedExpression::new_long(300),
            ),
            (
                "delegation_depth".to_owned(),
                RestrictedExpression::new_long(0),
            ),
            (
                "delegator".to_owned(),
                RestrictedExpression::new_string(String::new()),
            ),
            ("approved".to_owned(), RestrictedExpression::new_bool(false)),
            (
                "scopes".to_owned(),
                RestrictedExpression::new_set([RestrictedExpression::new_string(
                    "svc0:read".to_owned(),
                )]),
            ),
        ])
        .expect("context");
        let request = Request::new(
            principal,
            uid("Tessera::Action", "svc0:read"),
            uid("Tessera::Audience", "https://svc0.example/mcp"),
            context,
            None,
        )
        .expect("request");
        let authorizer = Authorizer::new();
        assert_eq!(
            authorizer
                .is_authorized(&request, &set, &entities)
                .decision(),
            Decision::Allow
        );
        group.bench_function(format!("cedar_is_authorized_full_set/{n}_policies"), |b| {
            b.iter(|| authorizer.is_authorized(black_box(&request), &set, &entities))
        });
    }
    group.finish();
}

criterion_group! {
    name = policy;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(policy);
