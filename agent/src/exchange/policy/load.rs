//! Reading, parsing and validating a policy directory into a [`PolicySnapshot`].

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use cedar_policy::{
    ActionConstraint, Authorizer, Effect, Entities, EntityTypeName, EntityUid, Policy, PolicyId,
    PolicySet, ResourceConstraint, Schema, SchemaFragment, ValidationMode, Validator,
};
use miette::Diagnostic;

use super::index::{ActionKeys, Index, MAX_CROSS_SLICES, ResourceKey};
use super::{Location, PolicyError, PolicyMeta, PolicySnapshot};

pub(super) const WORKLOAD_TYPE: &str = "Tessera::Workload";
pub(super) const AUDIENCE_TYPE: &str = "Tessera::Audience";
pub(super) const ACTION_TYPE: &str = "Tessera::Action";

/// One source file of the policy directory.
pub(super) struct SourceFile {
    pub(super) path: PathBuf,
    pub(super) name: String,
    pub(super) text: String,
}

/// The relevant files of a policy directory, sorted by name.
pub(super) struct DirFiles {
    pub(super) fingerprint: u64,
    pub(super) policies: Vec<SourceFile>,
    pub(super) schemas: Vec<SourceFile>,
}

/// Hidden files, editor temporaries and anything not `*.cedar` /
/// `*.cedarschema` are ignored.
fn file_kind(name: &str) -> Option<bool> {
    if name.starts_with('.') || name.starts_with('#') || name.ends_with('~') {
        return None;
    }
    if name.ends_with(".cedarschema") {
        Some(true)
    } else if name.ends_with(".cedar") {
        Some(false)
    } else {
        None
    }
}

pub(super) fn read_dir(dir: &Path) -> Result<DirFiles, PolicyError> {
    let dir_err = |source| PolicyError::Dir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut found: Vec<(String, PathBuf, bool)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_err)? {
        let entry = entry.map_err(dir_err)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(is_schema) = file_kind(&name) else {
            continue;
        };
        let path = entry.path();
        // Follows symlinks (Kubernetes ConfigMap volumes are symlinks).
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => found.push((name, path, is_schema)),
            Ok(_) => {}
            Err(e) => {
                return Err(PolicyError::Read {
                    file: path,
                    message: e.to_string(),
                });
            }
        }
    }
    found.sort();
    let mut hasher = DefaultHasher::new();
    let mut files = DirFiles {
        fingerprint: 0,
        policies: Vec::new(),
        schemas: Vec::new(),
    };
    for (name, path, is_schema) in found {
        let text = std::fs::read_to_string(&path).map_err(|e| PolicyError::Read {
            file: path.clone(),
            message: e.to_string(),
        })?;
        (&name, &text).hash(&mut hasher);
        let file = SourceFile { path, name, text };
        if is_schema {
            files.schemas.push(file);
        } else {
            files.policies.push(file);
        }
    }
    files.fingerprint = hasher.finish();
    Ok(files)
}

fn type_name(name: &str) -> Result<EntityTypeName, PolicyError> {
    EntityTypeName::from_str(name).map_err(|e| PolicyError::Index(format!("{name}: {e}")))
}

/// The snapshot for "no policy directory": everything denied.
pub(super) fn empty_snapshot() -> Result<PolicySnapshot, PolicyError> {
    Ok(PolicySnapshot {
        fingerprint: 0,
        policy_count: 0,
        index: Index::build(type_name(ACTION_TYPE)?, &[], 0).map_err(PolicyError::Index)?,
        meta: HashMap::new(),
        base_entities: Entities::empty(),
        workload_type: type_name(WORKLOAD_TYPE)?,
        audience_type: type_name(AUDIENCE_TYPE)?,
        authorizer: Authorizer::new(),
        principals: Default::default(),
    })
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(col).unwrap_or(u32::MAX),
    )
}

fn location_at(file: &SourceFile, offset: Option<usize>) -> Location {
    let (line, col) = match offset {
        Some(o) => {
            let (l, c) = line_col(&file.text, o);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    Location {
        file: file.path.clone(),
        line,
        col,
    }
}

/// Offset of the first labelled span of a diagnostic.
fn diag_offset(d: &dyn Diagnostic) -> Option<usize> {
    d.labels()?.next().map(|l| l.offset())
}

/// The diagnostic's message and help text.
fn diag_message(d: &dyn Diagnostic) -> String {
    let mut msg = d.to_string();
    if let Some(help) = d.help() {
        let _ = write!(msg, " (help: {help})");
    }
    msg
}

/// A parsed policy and where it came from.
struct Loaded {
    policy: Policy,
    file: usize,
    offset: Option<usize>,
}

fn parse_file(
    file: &SourceFile,
    file_idx: usize,
    out: &mut Vec<Loaded>,
) -> Result<(), PolicyError> {
    let set = PolicySet::from_str(&file.text).map_err(|e| {
        let offset = diag_offset(&e);
        let mut message = diag_message(&e);
        let more = e.iter().count().saturating_sub(1);
        if more > 0 {
            let _ = write!(message, " (and {more} more error(s))");
        }
        PolicyError::Parse {
            location: location_at(file, offset),
            message,
        }
    })?;
    if set.templates().next().is_some() {
        return Err(PolicyError::Template {
            location: location_at(file, None),
        });
    }
    // Default ids are `policy<N>` in source order.
    let mut policies: Vec<(usize, Policy)> = set
        .policies()
        .enumerate()
        .map(|(i, p)| {
            let n = AsRef::<str>::as_ref(p.id())
                .strip_prefix("policy")
                .and_then(|n| n.parse().ok())
                .unwrap_or(i);
            (n, p.clone())
        })
        .collect();
    policies.sort_by_key(|(n, _)| *n);
    let mut search_from = 0;
    for (n, policy) in policies {
        let id = match policy.annotation("id") {
            Some(id) => id.to_owned(),
            None => format!("{}#{n}", file.name),
        };
        // Locate the policy's text (for error messages), searching forward.
        let offset = policy.to_cedar().and_then(|src| {
            let found = file.text.get(search_from..)?.find(src.as_str())? + search_from;
            search_from = found + src.len();
            Some(found)
        });
        out.push(Loaded {
            policy: policy.new_id(PolicyId::new(id)),
            file: file_idx,
            offset,
        });
    }
    Ok(())
}

fn annotation_error(files: &[SourceFile], l: &Loaded, message: String) -> PolicyError {
    PolicyError::Annotation {
        location: location_at(&files[l.file], l.offset),
        policy_id: l.policy.id().to_string(),
        message,
    }
}

fn policy_meta(files: &[SourceFile], l: &Loaded) -> Result<PolicyMeta, PolicyError> {
    let p = &l.policy;
    if p.annotation("id").is_some_and(|id| id.trim().is_empty()) {
        return Err(annotation_error(files, l, "@id must not be empty".into()));
    }
    let max_ttl = match p.annotation("max_ttl") {
        None => None,
        Some(v) => match humantime::parse_duration(v.trim()) {
            Ok(d) if d > Duration::ZERO => Some(d),
            Ok(_) => {
                return Err(annotation_error(
                    files,
                    l,
                    format!("@max_ttl(\"{v}\") must be greater than zero"),
                ));
            }
            Err(e) => {
                return Err(annotation_error(
                    files,
                    l,
                    format!("@max_ttl(\"{v}\") is not a duration such as \"300s\" or \"5m\": {e}"),
                ));
            }
        },
    };
    Ok(PolicyMeta {
        max_ttl,
        require_approval: p.annotation("require_approval").is_some()
            && p.effect() == Effect::Permit,
        allow_delegation: p.annotation("allow_delegation").is_some()
            && p.effect() == Effect::Permit,
        bearer: p.annotation("bearer").is_some() && p.effect() == Effect::Permit,
    })
}

/// The built-in schema: the two entity types, the context record, and one
/// action per scope literal the policies reference.
pub(super) fn builtin_schema_text(actions: &BTreeSet<String>) -> String {
    let mut s = String::from(
        "namespace Tessera {\n\
         \x20 entity Workload = {\n\
         \x20   spiffe_id: String,\n\
         \x20   trust_domain: String,\n\
         \x20   path: String,\n\
         \x20   selectors: Set<String>,\n\
         \x20 };\n\
         \x20 entity Audience;\n\
         \x20 type RequestContext = {\n\
         \x20   task: String,\n\
         \x20   requested_ttl: Long,\n\
         \x20   delegation_depth: Long,\n\
         \x20   delegator: String,\n\
         \x20   approved: Bool,\n\
         \x20   scopes: Set<String>,\n\
         \x20 };\n",
    );
    if !actions.is_empty() {
        s.push_str("  action ");
        for (i, a) in actions.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            s.push('"');
            s.push_str(&escape_cedar_string(a));
            s.push('"');
        }
        s.push_str(
            " appliesTo {\n    principal: [Workload],\n    resource: [Audience],\n    context: RequestContext,\n  };\n",
        );
    }
    s.push_str("}\n");
    s
}

fn escape_cedar_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

fn load_custom_schema(files: &[SourceFile]) -> Result<Schema, PolicyError> {
    let mut fragments = Vec::with_capacity(files.len());
    for file in files {
        let (fragment, _warnings) =
            SchemaFragment::from_cedarschema_str(&file.text).map_err(|e| PolicyError::Schema {
                location: location_at(file, diag_offset(&e)),
                message: diag_message(&e),
            })?;
        fragments.push(fragment);
    }
    let whole = |message: String| PolicyError::Schema {
        location: Location {
            file: files[0].path.clone(),
            line: None,
            col: None,
        },
        message,
    };
    let schema = Schema::from_schema_fragments(fragments).map_err(|e| whole(diag_message(&e)))?;
    for required in [WORKLOAD_TYPE, AUDIENCE_TYPE] {
        if !schema.entity_types().any(|t| t.to_string() == required) {
            return Err(whole(format!(
                "the schema must declare entity type {required}"
            )));
        }
    }
    Ok(schema)
}

fn is_type(uid: &EntityUid, ty: &str) -> bool {
    uid.type_name().to_string() == ty
}

fn action_keys(policy: &Policy, members: &HashMap<String, Vec<String>>) -> ActionKeys {
    let uids = match policy.action_constraint() {
        ActionConstraint::Any => return ActionKeys::Any,
        ActionConstraint::Eq(uid) => vec![uid],
        ActionConstraint::In(uids) => uids,
    };
    let mut keys = Vec::with_capacity(uids.len());
    for uid in &uids {
        if !is_type(uid, ACTION_TYPE) {
            // Cannot match a Tessera action; file it under "any" (always safe).
            return ActionKeys::Any;
        }
        let id = uid.id().unescaped();
        keys.push(id.to_owned());
        if let Some(m) = members.get(id) {
            keys.extend(m.iter().cloned());
        }
    }
    ActionKeys::Some(keys)
}

fn resource_key(policy: &Policy) -> ResourceKey {
    let uid = match policy.resource_constraint() {
        ResourceConstraint::Eq(uid) | ResourceConstraint::In(uid) => uid,
        ResourceConstraint::IsIn(_, uid) => uid,
        ResourceConstraint::Any | ResourceConstraint::Is(_) => return ResourceKey::Any,
    };
    // The request's audience has no parents, so `in` only matches itself.
    if is_type(&uid, AUDIENCE_TYPE) {
        ResourceKey::One(uid.id().unescaped().to_owned())
    } else {
        ResourceKey::Any
    }
}

pub(super) fn build_snapshot(files: &DirFiles) -> Result<PolicySnapshot, PolicyError> {
    build_snapshot_with(files, true, MAX_CROSS_SLICES)
}

/// `sliced == false` (tests) files every policy under "any action, any
/// audience": every request then evaluates the whole set. At most
/// `max_cross` cross-product slices are precomputed (see [`Index::build`]).
pub(super) fn build_snapshot_with(
    files: &DirFiles,
    sliced: bool,
    max_cross: usize,
) -> Result<PolicySnapshot, PolicyError> {
    let mut loaded = Vec::new();
    for (i, file) in files.policies.iter().enumerate() {
        parse_file(file, i, &mut loaded)?;
    }
    let src = &files.policies;

    // Unique ids, annotations, referenced actions.
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(loaded.len());
    let mut meta = HashMap::with_capacity(loaded.len());
    let mut actions = BTreeSet::new();
    for (i, l) in loaded.iter().enumerate() {
        let id = l.policy.id().to_string();
        if let Some(&first) = seen.get(&id) {
            let f = &loaded[first];
            return Err(PolicyError::DuplicateId {
                id,
                first: location_at(&src[f.file], f.offset),
                second: location_at(&src[l.file], l.offset),
            });
        }
        meta.insert(id.clone(), policy_meta(src, l)?);
        seen.insert(id, i);
        for uid in l.policy.entity_literals() {
            if is_type(&uid, ACTION_TYPE) {
                actions.insert(uid.id().unescaped().to_owned());
            }
        }
    }

    let custom = !files.schemas.is_empty();
    let schema = if custom {
        load_custom_schema(&files.schemas)?
    } else {
        let text = builtin_schema_text(&actions);
        Schema::from_cedarschema_str(&text)
            .map_err(|e| PolicyError::Index(format!("built-in schema: {}", diag_message(&e))))?
            .0
    };

    let full = PolicySet::from_policies(loaded.iter().map(|l| l.policy.clone()))
        .map_err(|e| PolicyError::Index(e.to_string()))?;
    let result = Validator::new(schema.clone()).validate(&full, ValidationMode::Strict);
    let errors: Vec<_> = result.validation_errors().collect();
    if let Some(first) = errors.first() {
        let policy_id = first.policy_id().to_string();
        let (location, _) = match seen.get(&policy_id).map(|&i| &loaded[i]) {
            Some(l) => {
                let offset = diag_offset(*first).or(l.offset);
                (location_at(&src[l.file], offset), ())
            }
            None => (
                Location {
                    file: PathBuf::from("<policies>"),
                    line: None,
                    col: None,
                },
                (),
            ),
        };
        let mut message = diag_message(*first);
        if errors.len() > 1 {
            let _ = write!(message, " (and {} more error(s))", errors.len() - 1);
        }
        return Err(PolicyError::Validation {
            location,
            policy_id,
            message,
        });
    }

    // Action groups of a custom schema: group id -> member action ids.
    let base_entities = if custom {
        schema
            .action_entities()
            .map_err(|e| PolicyError::Index(format!("schema actions: {e}")))?
    } else {
        Entities::empty()
    };
    let mut members: HashMap<String, Vec<String>> = HashMap::new();
    for entity in base_entities.iter() {
        let uid = entity.uid();
        if !is_type(&uid, ACTION_TYPE) {
            continue;
        }
        if let Some(ancestors) = base_entities.ancestors(&uid) {
            for group in ancestors.filter(|g| is_type(g, ACTION_TYPE)) {
                members
                    .entry(group.id().unescaped().to_owned())
                    .or_default()
                    .push(uid.id().unescaped().to_owned());
            }
        }
    }

    let indexed: Vec<(Policy, ActionKeys, ResourceKey)> = loaded
        .into_iter()
        .map(|l| {
            let (a, r) = if sliced {
                (action_keys(&l.policy, &members), resource_key(&l.policy))
            } else {
                (ActionKeys::Any, ResourceKey::Any)
            };
            (l.policy, a, r)
        })
        .collect();
    let policy_count = indexed.len();
    let index =
        Index::build(type_name(ACTION_TYPE)?, &indexed, max_cross).map_err(PolicyError::Index)?;
    Ok(PolicySnapshot {
        fingerprint: files.fingerprint,
        policy_count,
        index,
        meta,
        base_entities,
        workload_type: type_name(WORKLOAD_TYPE)?,
        audience_type: type_name(AUDIENCE_TYPE)?,
        authorizer: Authorizer::new(),
        principals: Default::default(),
    })
}
