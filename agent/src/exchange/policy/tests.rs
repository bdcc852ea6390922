use std::path::Path;
use std::time::Duration;

use super::load;
use super::*;

const AGENT: &str = "spiffe://example.org/agent";
const NOTES: &str = "https://notes.example/mcp";

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

struct Req {
    principal: String,
    selectors: Vec<String>,
    audience: String,
    scopes: Vec<String>,
    task: String,
    ttl: i64,
    depth: i64,
    delegator: Option<String>,
    approved: bool,
}

impl Req {
    fn new(scopes: &[&str]) -> Self {
        Self {
            principal: AGENT.to_owned(),
            selectors: strings(&["unix:uid:1000"]),
            audience: NOTES.to_owned(),
            scopes: strings(scopes),
            task: "task-1".to_owned(),
            ttl: 300,
            depth: 0,
            delegator: None,
            approved: false,
        }
    }

    fn as_request(&self) -> PolicyRequest<'_> {
        PolicyRequest {
            principal: &self.principal,
            selectors: &self.selectors,
            audience: &self.audience,
            scopes: &self.scopes,
            task_id: &self.task,
            requested_ttl_secs: self.ttl,
            delegation_depth: self.depth,
            delegator: self.delegator.as_deref(),
            approved: self.approved,
        }
    }
}

fn store_with(policies: &str) -> (tempfile::TempDir, PolicyStore) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policies.cedar", policies);
    let store = PolicyStore::load(Some(dir.path())).unwrap();
    (dir, store)
}

fn allowed(store: &PolicyStore, req: &Req) -> Vec<bool> {
    store
        .evaluate(&req.as_request())
        .scopes
        .iter()
        .map(|s| s.allowed)
        .collect()
}

const READ_POLICY: &str = r#"
@id("agent-reads-notes")
permit(
  principal == Tessera::Workload::"spiffe://example.org/agent",
  action == Tessera::Action::"notes:read",
  resource == Tessera::Audience::"https://notes.example/mcp"
);
"#;

#[test]
fn allow() {
    let (_d, store) = store_with(READ_POLICY);
    assert_eq!(store.policy_count(), 1);
    let d = store.evaluate(&Req::new(&["notes:read"]).as_request());
    assert_eq!(d.scopes.len(), 1);
    let s = &d.scopes[0];
    assert!(s.allowed, "{s:?}");
    assert_eq!(s.scope, "notes:read");
    assert_eq!(s.policy_ids, vec!["agent-reads-notes".to_owned()]);
    assert_eq!(s.max_ttl, None);
    assert!(!s.approval_required);
    assert!(s.errors.is_empty());
    assert!(d.all_allowed());

    // Other principal, other audience: denied.
    let mut req = Req::new(&["notes:read"]);
    req.principal = "spiffe://example.org/other".into();
    assert_eq!(allowed(&store, &req), [false]);
    let mut req = Req::new(&["notes:read"]);
    req.audience = "https://other.example".into();
    assert_eq!(allowed(&store, &req), [false]);
}

#[test]
fn deny_by_default() {
    let store = PolicyStore::load(None).unwrap();
    assert_eq!(store.policy_count(), 0);
    assert_eq!(store.reload().unwrap(), ReloadOutcome::Unchanged);
    let d = store.evaluate(&Req::new(&["notes:read", "x"]).as_request());
    assert!(
        d.scopes
            .iter()
            .all(|s| !s.allowed && s.policy_ids.is_empty())
    );
    assert!(!d.all_allowed());

    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "README.md", "not a policy");
    let store = PolicyStore::load(Some(dir.path())).unwrap();
    assert_eq!(store.policy_count(), 0);
    assert_eq!(allowed(&store, &Req::new(&["notes:read"])), [false]);

    // No scopes: an empty decision, not "all allowed".
    assert!(!store.evaluate(&Req::new(&[]).as_request()).all_allowed());
}

#[test]
fn missing_dir_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = PolicyStore::load(Some(&dir.path().join("nope"))).unwrap_err();
    assert!(matches!(err, PolicyError::Dir { .. }), "{err}");
}

#[test]
fn forbid_overrides_permit() {
    let (_d, store) = store_with(&format!(
        "{READ_POLICY}\n@id(\"no-agents\") forbid(principal, action, resource) when {{ principal.path like \"/agent*\" }};"
    ));
    let d = store.evaluate(&Req::new(&["notes:read"]).as_request());
    assert!(!d.scopes[0].allowed);
    assert_eq!(d.scopes[0].policy_ids, vec!["no-agents".to_owned()]);
}

#[test]
fn selector_based_permit() {
    let (_d, store) = store_with(
        r#"permit(principal, action == Tessera::Action::"notes:read", resource)
           when { principal.selectors.contains("k8s:ns:prod") && principal.trust_domain == "example.org" };"#,
    );
    let mut req = Req::new(&["notes:read"]);
    assert_eq!(allowed(&store, &req), [false]);
    req.selectors = strings(&["k8s:ns:prod", "unix:uid:1000"]);
    let d = store.evaluate(&req.as_request());
    assert!(d.scopes[0].allowed);
    assert_eq!(d.scopes[0].policy_ids, vec!["policies.cedar#0".to_owned()]);
    req.principal = "spiffe://other.org/agent".into();
    assert_eq!(allowed(&store, &req), [false]);
}

#[test]
fn a_kept_principal_entity_serves_only_the_same_principal_and_selectors() {
    let (_d, store) = store_with(
        r#"permit(principal, action == Tessera::Action::"notes:read", resource)
           when { principal.selectors.contains("k8s:ns:prod") };"#,
    );
    let mut req = Req::new(&["notes:read"]);
    req.selectors = strings(&["k8s:ns:prod"]);
    // Twice: built, then kept; the same answer both times.
    assert_eq!(allowed(&store, &req), [true]);
    assert_eq!(allowed(&store, &req), [true]);
    // Lists that a naive join would run together are other callers.
    for selectors in [
        &["k8s:ns:pro", "d"][..],
        &["k8s:ns:prod\n"][..],
        &["k8s:ns:prod1"][..],
        &[][..],
    ] {
        req.selectors = strings(selectors);
        assert_eq!(allowed(&store, &req), [false], "{selectors:?}");
    }
    req.selectors = strings(&["k8s:ns:prod"]);
    assert_eq!(allowed(&store, &req), [true]);
    assert_ne!(
        principal_key("a", &strings(&["1:b"])),
        principal_key("a1:b", &[])
    );
    assert_ne!(
        principal_key("a", &strings(&["b", "c"])),
        principal_key("a", &strings(&["b\nc"]))
    );
}

#[test]
fn per_scope_decisions() {
    let (_d, store) = store_with(READ_POLICY);
    let req = Req::new(&["notes:read", "notes:write", "never:mentioned"]);
    let d = store.evaluate(&req.as_request());
    let got: Vec<(&str, bool)> = d
        .scopes
        .iter()
        .map(|s| (s.scope.as_str(), s.allowed))
        .collect();
    assert_eq!(
        got,
        [
            ("notes:read", true),
            ("notes:write", false),
            ("never:mentioned", false)
        ]
    );
    assert!(!d.all_allowed());
}

#[test]
fn max_ttl_is_min_over_determining_policies() {
    let (_d, store) = store_with(
        r#"
@id("long") @max_ttl("10m")
permit(principal, action == Tessera::Action::"notes:read", resource);
@id("short") @max_ttl("90s")
permit(principal, action in [Tessera::Action::"notes:read", Tessera::Action::"notes:write"], resource)
  when { context.requested_ttl <= 3600 };
@id("tiny-but-not-applicable") @max_ttl("1s")
permit(principal, action == Tessera::Action::"notes:read", resource) when { context.task == "other" };
@id("no-cap")
permit(principal, action == Tessera::Action::"notes:list", resource);
"#,
    );
    let d = store.evaluate(&Req::new(&["notes:read", "notes:write", "notes:list"]).as_request());
    assert_eq!(d.scopes[0].policy_ids, strings(&["long", "short"]));
    assert_eq!(d.scopes[0].max_ttl, Some(Duration::from_secs(90)));
    assert_eq!(d.scopes[1].max_ttl, Some(Duration::from_secs(90)));
    assert_eq!(d.scopes[2].max_ttl, None);
    assert!(d.all_allowed());

    let mut req = Req::new(&["notes:read"]);
    req.ttl = 7200;
    let d = store.evaluate(&req.as_request());
    assert_eq!(d.scopes[0].policy_ids, strings(&["long"]));
    assert_eq!(d.scopes[0].max_ttl, Some(Duration::from_secs(600)));
}

#[test]
fn require_approval_and_forbid_unless_approved() {
    let (_d, store) = store_with(
        r#"
@id("write") @require_approval
permit(principal, action == Tessera::Action::"notes:write", resource);
@id("delete") @require_approval("true")
permit(principal, action == Tessera::Action::"notes:delete", resource);
@id("read")
permit(principal, action == Tessera::Action::"notes:read", resource);
@id("delete-needs-human")
forbid(principal, action == Tessera::Action::"notes:delete", resource) unless { context.approved };
"#,
    );
    let mut req = Req::new(&["notes:read", "notes:write", "notes:delete"]);
    let d = store.evaluate(&req.as_request());
    let flags: Vec<(bool, bool)> = d
        .scopes
        .iter()
        .map(|s| (s.allowed, s.approval_required))
        .collect();
    assert_eq!(flags, [(true, false), (true, true), (false, false)]);
    assert_eq!(d.scopes[2].policy_ids, strings(&["delete-needs-human"]));

    req.approved = true;
    let d = store.evaluate(&req.as_request());
    let flags: Vec<(bool, bool)> = d
        .scopes
        .iter()
        .map(|s| (s.allowed, s.approval_required))
        .collect();
    assert_eq!(flags, [(true, false), (true, true), (true, true)]);
}

#[test]
fn delegation_depth_condition() {
    let (_d, store) = store_with(
        r#"
permit(principal, action == Tessera::Action::"notes:read", resource)
  when { context.delegation_depth == 0 ||
         (context.delegation_depth <= 1 && context.delegator like "spiffe://example.org/agents/*") };
"#,
    );
    let mut req = Req::new(&["notes:read"]);
    assert_eq!(allowed(&store, &req), [true]);
    req.depth = 1;
    req.delegator = Some("spiffe://example.org/agents/planner".into());
    assert_eq!(allowed(&store, &req), [true]);
    req.delegator = Some("spiffe://evil.org/x".into());
    assert_eq!(allowed(&store, &req), [false]);
    req.delegator = Some("spiffe://example.org/agents/planner".into());
    req.depth = 2;
    assert_eq!(allowed(&store, &req), [false]);
}

#[test]
fn scope_combinations_can_be_forbidden() {
    let (_d, store) = store_with(
        r#"
permit(principal, action, resource == Tessera::Audience::"https://notes.example/mcp");
@id("no-read-and-share")
forbid(principal, action == Tessera::Action::"notes:share", resource)
  when { context.scopes.contains("notes:read") };
"#,
    );
    assert_eq!(
        allowed(&store, &Req::new(&["notes:read", "notes:share"])),
        [true, false]
    );
    assert_eq!(allowed(&store, &Req::new(&["notes:share"])), [true]);
}

#[test]
fn reload_valid_invalid_and_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-read.cedar", READ_POLICY);
    let store = PolicyStore::load(Some(dir.path())).unwrap();
    let req = Req::new(&["notes:read", "notes:write"]);
    assert_eq!(allowed(&store, &req), [true, false]);
    assert_eq!(store.reload().unwrap(), ReloadOutcome::Unchanged);

    // Ignored files do not count as changes.
    write(dir.path(), ".#20-write.cedar", "garbage");
    write(dir.path(), "20-write.cedar~", "garbage");
    write(dir.path(), "20-write.cedar.swp", "garbage");
    assert_eq!(store.reload().unwrap(), ReloadOutcome::Unchanged);

    // A valid change.
    write(
        dir.path(),
        "20-write.cedar",
        r#"permit(principal, action == Tessera::Action::"notes:write", resource);"#,
    );
    assert_eq!(
        store.reload().unwrap(),
        ReloadOutcome::Reloaded { policies: 2 }
    );
    assert_eq!(allowed(&store, &req), [true, true]);
    assert_eq!(store.reload().unwrap(), ReloadOutcome::Unchanged);

    // An invalid change: error naming the file, old decisions kept.
    write(
        dir.path(),
        "30-bad.cedar",
        "permit(principal, action == Tessera::Action::\"x\", resource)\n  when { context.nope == 1 };",
    );
    let err = store.reload().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("30-bad.cedar:2:"), "{msg}");
    assert!(matches!(err, PolicyError::Validation { .. }), "{msg}");
    assert_eq!(store.policy_count(), 2);
    assert_eq!(allowed(&store, &req), [true, true]);

    // Fixing it reloads.
    std::fs::remove_file(dir.path().join("30-bad.cedar")).unwrap();
    std::fs::remove_file(dir.path().join("20-write.cedar")).unwrap();
    assert_eq!(
        store.reload().unwrap(),
        ReloadOutcome::Reloaded { policies: 1 }
    );
    assert_eq!(allowed(&store, &req), [true, false]);
}

fn load_err(files: &[(&str, &str)]) -> PolicyError {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        write(dir.path(), name, text);
    }
    PolicyStore::load(Some(dir.path())).unwrap_err()
}

#[test]
fn parse_error_names_file_line_col() {
    let err = load_err(&[(
        "a.cedar",
        "permit(principal, action, resource);\n\npermit(principal, action, resource) when { ??? };\n",
    )]);
    let msg = err.to_string();
    assert!(matches!(err, PolicyError::Parse { .. }), "{msg}");
    assert!(msg.contains("a.cedar:3:"), "{msg}");
}

#[test]
fn unknown_entity_type_fails_validation() {
    let err = load_err(&[(
        "a.cedar",
        r#"permit(principal == User::"alice", action, resource);"#,
    )]);
    assert!(matches!(err, PolicyError::Validation { .. }), "{err}");
    assert!(err.to_string().contains("a.cedar:1:"), "{err}");
}

#[test]
fn duplicate_id_rejected() {
    let err = load_err(&[
        (
            "a.cedar",
            "@id(\"same\") permit(principal, action, resource);",
        ),
        (
            "b.cedar",
            "\n@id(\"same\") forbid(principal, action, resource);",
        ),
    ]);
    let msg = err.to_string();
    assert!(matches!(err, PolicyError::DuplicateId { .. }), "{msg}");
    assert!(
        msg.contains("a.cedar:1:1") && msg.contains("b.cedar:2:1"),
        "{msg}"
    );

    // Also a clash between an explicit id and a default one.
    let err = load_err(&[(
        "a.cedar",
        "permit(principal, action, resource);\n@id(\"a.cedar#0\") permit(principal, action, resource);",
    )]);
    assert!(matches!(err, PolicyError::DuplicateId { .. }), "{err}");
}

#[test]
fn bad_max_ttl_rejected() {
    for bad in ["soon", "", "0s", "-5s"] {
        let err = load_err(&[(
            "a.cedar",
            &format!(
                "permit(principal, action, resource);\n@id(\"p\") @max_ttl(\"{bad}\") permit(principal, action, resource);"
            ),
        )]);
        let msg = err.to_string();
        assert!(matches!(err, PolicyError::Annotation { .. }), "{msg}");
        assert!(msg.contains("`p`") && msg.contains("a.cedar:2:1"), "{msg}");
    }
}

#[test]
fn templates_rejected() {
    let err = load_err(&[(
        "a.cedar",
        "permit(principal == ?principal, action, resource);",
    )]);
    assert!(matches!(err, PolicyError::Template { .. }), "{err}");
}

#[test]
fn evaluation_errors_are_reported_not_fatal() {
    let (_d, store) = store_with(
        r#"
@id("overflow")
permit(principal, action == Tessera::Action::"notes:read", resource)
  when { context.requested_ttl * 4611686018427387904 > 0 };
@id("ok")
permit(principal, action == Tessera::Action::"notes:read", resource) when { context.requested_ttl < 10 };
"#,
    );
    let mut req = Req::new(&["notes:read"]);
    let d = store.evaluate(&req.as_request());
    assert!(!d.scopes[0].allowed);
    assert_eq!(d.scopes[0].errors.len(), 1);
    assert!(
        d.scopes[0].errors[0].contains("overflow"),
        "{:?}",
        d.scopes[0].errors
    );
    req.ttl = 0;
    assert_eq!(allowed(&store, &req), [true]);
}

#[test]
fn weird_inputs_do_not_panic() {
    let (_d, store) = store_with(
        r#"permit(principal, action, resource) when { principal.path like "/agent*" };"#,
    );
    let mut req = Req::new(&["", "\"quoted\\", "ünïcode", "a\nb"]);
    req.principal = "spiffe://".into();
    req.audience = "\0".into();
    req.task = String::new();
    req.ttl = i64::MIN;
    req.depth = i64::MAX;
    let d = store.evaluate(&req.as_request());
    assert_eq!(d.scopes.len(), 4);
    assert!(d.scopes.iter().all(|s| !s.allowed));
    req.principal = "not a uri".into();
    store.evaluate(&req.as_request());
}

#[test]
fn custom_schema_with_action_groups() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "schema.cedarschema",
        r#"
namespace Tessera {
  entity Workload = { spiffe_id: String, trust_domain: String, path: String, selectors: Set<String> };
  entity Audience;
  type RequestContext = { task: String, requested_ttl: Long, delegation_depth: Long,
                          delegator: String, approved: Bool, scopes: Set<String> };
  action "notes:all";
  action "notes:read", "notes:write" in ["notes:all"]
    appliesTo { principal: [Workload], resource: [Audience], context: RequestContext };
  action "other"
    appliesTo { principal: [Workload], resource: [Audience], context: RequestContext };
}
"#,
    );
    write(
        dir.path(),
        "p.cedar",
        r#"permit(principal, action in Tessera::Action::"notes:all", resource);"#,
    );
    let store = PolicyStore::load(Some(dir.path())).unwrap();
    assert_eq!(
        allowed(
            &store,
            &Req::new(&["notes:read", "notes:write", "other", "x"])
        ),
        [true, true, false, false]
    );

    // A policy naming an action the schema lacks fails validation.
    write(
        dir.path(),
        "q.cedar",
        r#"permit(principal, action == Tessera::Action::"undeclared", resource);"#,
    );
    let err = store.reload().unwrap_err();
    assert!(err.to_string().contains("q.cedar:1:"), "{err}");

    // A schema missing the Tessera types is rejected.
    let err = load_err(&[
        ("s.cedarschema", "entity User;"),
        ("p.cedar", "permit(principal, action, resource);"),
    ]);
    assert!(matches!(err, PolicyError::Schema { .. }), "{err}");
    let err = load_err(&[("s.cedarschema", "entity User; garbage")]);
    assert!(err.to_string().contains("s.cedarschema:1:"), "{err}");
}

#[test]
fn builtin_schema_escapes_action_names() {
    let (_d, store) =
        store_with(r#"permit(principal, action == Tessera::Action::"we\"ird\\scope", resource);"#);
    assert_eq!(allowed(&store, &Req::new(&["we\"ird\\scope"])), [true]);
}

/// A policy set mixing action/resource-constrained and unconstrained
/// policies, permits and forbids with `when` / `unless`.
const MIXED: &str = r#"
@id("read-notes")
permit(principal, action == Tessera::Action::"notes:read", resource == Tessera::Audience::"notes");
@id("write-prod") @max_ttl("120s")
permit(principal, action in [Tessera::Action::"notes:write", Tessera::Action::"notes:delete"],
       resource == Tessera::Audience::"notes")
  when { principal.selectors.contains("k8s:ns:prod") };
@id("agents-on-tools") @max_ttl("1h")
permit(principal, action, resource == Tessera::Audience::"tools") when { principal.path like "/agents/*" };
@id("admin-all") @require_approval
permit(principal == Tessera::Workload::"spiffe://example.org/admin", action, resource);
@id("docs-read-anywhere")
permit(principal, action == Tessera::Action::"docs:read", resource) when { context.requested_ttl <= 600 };
@id("overflowy")
permit(principal, action == Tessera::Action::"docs:read", resource == Tessera::Audience::"docs")
  when { context.requested_ttl * 4611686018427387904 > 0 };
@id("no-deep-delegation")
forbid(principal, action, resource) when { context.delegation_depth > 1 };
@id("delete-needs-approval")
forbid(principal, action == Tessera::Action::"notes:delete", resource) unless { context.approved };
@id("no-read-write-combo-delegated")
forbid(principal, action == Tessera::Action::"notes:write", resource == Tessera::Audience::"notes")
  when { context.scopes.contains("notes:read") && context.delegator != "" };
@id("exec-home-td-only")
forbid(principal, action == Tessera::Action::"tools:exec", resource)
  unless { principal.trust_domain == "example.org" };
@id("no-dev-on-docs")
forbid(principal, action, resource == Tessera::Audience::"docs") when { principal.selectors.contains("k8s:ns:dev") };
@id("build-exec")
permit(principal, action == Tessera::Action::"tools:exec", resource == Tessera::Audience::"tools")
  when { context.task like "build-*" };
"#;

fn assert_slicing_equivalent(files: &[(&str, &str)], scopes: &[&str], audiences: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        write(dir.path(), name, text);
    }
    let files = load::read_dir(dir.path()).unwrap();
    let sliced = load::build_snapshot_with(&files, true, 10_000).unwrap();
    let overflow = load::build_snapshot_with(&files, true, 0).unwrap();
    let full = load::build_snapshot_with(&files, false, 0).unwrap();

    let principals: [(&str, &[&str]); 4] = [
        ("spiffe://example.org/agents/planner", &["k8s:ns:prod"]),
        ("spiffe://example.org/admin", &[]),
        ("spiffe://other.org/agents/x", &["k8s:ns:dev"]),
        ("not-a-spiffe-id", &["k8s:ns:prod", "k8s:ns:dev"]),
    ];
    let mut scope_lists: Vec<Vec<&str>> = scopes.iter().map(|s| vec![*s]).collect();
    scope_lists.push(scopes.to_vec());
    let (mut checked, mut allowed, mut denied) = (0, 0, 0);
    for (principal, selectors) in principals {
        for audience in audiences {
            for scopes in &scope_lists {
                for bits in 0..32u32 {
                    let mut req = Req::new(scopes);
                    req.principal = principal.into();
                    req.selectors = strings(selectors);
                    req.audience = (*audience).into();
                    req.ttl = if bits & 1 == 0 { 60 } else { 3600 };
                    req.depth = if bits & 2 == 0 { 0 } else { 2 };
                    req.delegator = (bits & 4 != 0).then(|| "spiffe://example.org/parent".into());
                    req.approved = bits & 8 != 0;
                    req.task = if bits & 16 == 0 { "build-7" } else { "chat" }.into();
                    let r = req.as_request();
                    let want = full.evaluate(&r);
                    assert_eq!(sliced.evaluate(&r), want, "sliced: {r:?}");
                    assert_eq!(overflow.evaluate(&r), want, "overflow: {r:?}");
                    for s in &want.scopes {
                        checked += 1;
                        if s.allowed {
                            allowed += 1;
                        } else if !s.policy_ids.is_empty() {
                            denied += 1;
                        }
                    }
                }
            }
        }
    }
    // The comparison exercised allows and explicit forbids.
    assert!(allowed > checked / 20, "{allowed}/{checked}");
    assert!(denied > checked / 20, "{denied}/{checked}");
}

#[test]
fn slicing_never_changes_a_decision() {
    assert_slicing_equivalent(
        &[("mixed.cedar", MIXED)],
        &[
            "notes:read",
            "notes:write",
            "notes:delete",
            "docs:read",
            "tools:exec",
            "unknown:scope",
        ],
        &["notes", "tools", "docs", "unknown"],
    );
}

#[test]
fn slicing_never_changes_a_decision_with_action_groups() {
    let schema = r#"
namespace Tessera {
  entity Workload = { spiffe_id: String, trust_domain: String, path: String, selectors: Set<String> };
  entity Audience;
  type RequestContext = { task: String, requested_ttl: Long, delegation_depth: Long,
                          delegator: String, approved: Bool, scopes: Set<String> };
  action "write-ish";
  action "notes:write", "notes:delete" in ["write-ish"]
    appliesTo { principal: [Workload], resource: [Audience], context: RequestContext };
  action "notes:read", "docs:read", "tools:exec"
    appliesTo { principal: [Workload], resource: [Audience], context: RequestContext };
}
"#;
    let extra = r#"
@id("group-forbid")
forbid(principal, action in Tessera::Action::"write-ish", resource == Tessera::Audience::"tools")
  unless { context.approved };
@id("group-permit")
permit(principal, action in [Tessera::Action::"write-ish"], resource == Tessera::Audience::"tools");
"#;
    assert_slicing_equivalent(
        &[
            ("schema.cedarschema", schema),
            ("mixed.cedar", MIXED),
            ("groups.cedar", extra),
        ],
        &[
            "notes:read",
            "notes:write",
            "notes:delete",
            "docs:read",
            "tools:exec",
            "write-ish",
            "unknown:scope",
        ],
        &["notes", "tools", "docs", "unknown"],
    );
}

#[test]
fn unreferenced_scope_is_denied_without_cedar() {
    let (_d, store) = store_with(READ_POLICY);
    let snap = store.current.load();
    assert!(snap.index.lookup("never:mentioned", NOTES).is_empty());
    assert!(snap.index.lookup("notes:read", "elsewhere").is_empty());
    assert!(!snap.index.lookup("notes:read", NOTES).is_empty());
}

#[test]
fn store_is_shared_across_threads() {
    let (_d, store) = store_with(READ_POLICY);
    let store = Arc::new(store);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for _ in 0..50 {
                    assert_eq!(allowed(&store, &Req::new(&["notes:read"])), [true]);
                    let _ = store.reload();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn unconstrained_policy_applies_to_every_scope() {
    let (_d, store) = store_with("@id(\"all\") permit(principal, action, resource);");
    let d = store.evaluate(&Req::new(&["a", "b"]).as_request());
    assert!(d.all_allowed(), "{d:?}");
}

/// Every ```cedar example in docs/policy.md loads (together, so ids are unique).
#[test]
fn docs_examples_load() {
    let doc = include_str!("../../../../docs/policy.md");
    let dir = tempfile::tempdir().unwrap();
    let mut count = 0;
    for (i, block) in doc.split("```cedar\n").skip(1).enumerate() {
        let body = block.split("```").next().unwrap();
        write(dir.path(), &format!("{i:02}.cedar"), body);
        count += 1;
    }
    assert!(count >= 5);
    let store = PolicyStore::load(Some(dir.path())).unwrap();
    let mut req = Req::new(&["notes:write", "notes:delete", "search:query"]);
    req.principal = "spiffe://example.org/agents/planner".into();
    let d = store.evaluate(&req.as_request());
    assert!(d.scopes[0].allowed && d.scopes[0].approval_required);
    assert_eq!(d.scopes[0].max_ttl, Some(Duration::from_secs(60)));
    assert_eq!(d.scopes[1].policy_ids, strings(&["delete-needs-approval"]));
    assert!(d.scopes[2].allowed);

    // The custom schema example, with its group forbid.
    let schema = doc.split("```cedarschema\n").nth(1).unwrap();
    let schema = schema.split("```").next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "s.cedarschema", schema);
    write(
        dir.path(),
        "p.cedar",
        r#"permit(principal, action, resource);
           forbid(principal, action in Tessera::Action::"notes:write-ish", resource) unless { context.approved };"#,
    );
    let store = PolicyStore::load(Some(dir.path())).unwrap();
    assert_eq!(
        allowed(&store, &Req::new(&["notes:read", "notes:delete"])),
        [true, false]
    );
}
