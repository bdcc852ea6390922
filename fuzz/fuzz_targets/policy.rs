//! Cedar policy loading for token exchange: the input is written as the one
//! `*.cedar` file of a policy directory, loaded with `PolicyStore::load`, and
//! when it loads, a request is evaluated against it.
//!
//! Input: the policy file's text (UTF-8).
//!
//! Properties beyond "no panic": the built-in schema the store derives from
//! a parsed policy set is always valid Cedar (an error from it is a bug in
//! the store, not in the input); errors name the file; a decision has one
//! entry per requested scope, in request order, and an allowed scope names
//! the policies that allowed it.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tessera_agent::exchange::policy::{PolicyError, PolicyRequest, PolicyStore};

static DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = DIR.path().join("fuzz.cedar");
    std::fs::write(&path, text).unwrap();
    let store = match PolicyStore::load(Some(DIR.path())) {
        Ok(store) => store,
        Err(PolicyError::Index(message)) if message.starts_with("built-in schema") => {
            panic!("the schema derived from parsed policies is invalid: {message}")
        }
        Err(e) => {
            assert!(e.to_string().contains("fuzz.cedar"), "{e}");
            return;
        }
    };
    // Scopes and audiences named in the input, plus fixed ones.
    let mut scopes = literals(text, "Action::\"");
    scopes.push("notes:read".into());
    let mut audiences = literals(text, "Audience::\"");
    audiences.push("https://notes.example/mcp".into());
    let selectors = vec!["unix:uid:1000".to_string(), "k8s:ns:prod".to_string()];
    for audience in audiences.iter().take(4) {
        for depth in [0, 1] {
            let req = PolicyRequest {
                principal: "spiffe://example.org/demo/notes-agent",
                selectors: &selectors,
                audience,
                scopes: &scopes,
                task_id: "t-1",
                requested_ttl_secs: 300,
                delegation_depth: depth,
                delegator: (depth > 0).then_some("spiffe://example.org/planner"),
                approved: depth == 0,
            };
            let decision = store.evaluate(&req);
            assert_eq!(decision.scopes.len(), scopes.len());
            for (d, s) in decision.scopes.iter().zip(&scopes) {
                assert_eq!(&d.scope, s);
                if d.allowed {
                    assert!(!d.policy_ids.is_empty(), "{d:?}");
                }
            }
        }
    }
});

/// Plain (escape-free) string literals following `prefix`, at most 8.
fn literals(text: &str, prefix: &str) -> Vec<String> {
    text.match_indices(prefix)
        .filter_map(|(at, _)| {
            let rest = &text[at + prefix.len()..];
            let end = rest.find('"')?;
            let lit = &rest[..end];
            (!lit.contains('\\')).then(|| lit.to_string())
        })
        .take(8)
        .collect()
}
