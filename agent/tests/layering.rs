//! The agent crate's layers (docs/architecture.md, "Module map"), checked
//! from the source: every top-level module imports only modules of its own
//! layer or below, and services do not import each other. A new module must
//! be given a layer here, so the map cannot silently go stale.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layer of each top-level module, lowest first.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "foundations",
        &[
            "clock",
            "sync",
            "fsutil",
            "metrics",
            "entries",
            "audit",
            "rate_limit",
            "revocation",
        ],
    ),
    ("identity and transport", &["identity", "transport"]),
    ("callers", &["caller"]),
    // Federation fetches and keeps other trust domains' bundles for the
    // trust store; it imports no service, and the fleet authority builds on
    // it (relationships as custom resources, bundles kept in the fleet
    // store), so it sits below the services rather than beside them.
    ("trust sources", &["federation"]),
    (
        "services",
        &["workload_api", "sds", "exchange", "fleet", "https", "admin"],
    ),
    ("wiring", &["config", "app"]),
    ("edge", &["cli"]),
];

/// Services stand side by side: none may reach into another.
const SERVICES: &str = "services";

fn layer_of(module: &str) -> Option<(usize, &'static str)> {
    LAYERS
        .iter()
        .enumerate()
        .find(|(_, (_, modules))| modules.contains(&module))
        .map(|(rank, (name, _))| (rank, *name))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` without its `#[cfg(test)] mod name { ... }` blocks: tests may
/// drive a module from above (a server test uses the CLI's client).
fn without_test_modules(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let header_end = after.find(['{', ';']).unwrap_or(after.len());
        if !after[..header_end].contains("mod ") || after[header_end..].starts_with(';') {
            // `#[cfg(test)] mod tests;` (a file of its own, scanned apart)
            // or an attribute on something else: keep it.
            out.push_str(&after[..header_end]);
            rest = &after[header_end..];
            continue;
        }
        let mut depth = 0usize;
        let mut end = after.len();
        for (j, c) in after[header_end..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = header_end + j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// `crate::name` paths (also inside `crate::{a, b::c}`), comments removed.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let code: String = without_test_modules(text)
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
        rest = after;
    }
    found
}

#[test]
fn modules_import_only_their_own_layer_or_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = top.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        // Test-only files (`tests.rs` beside a module) are not part of it.
        if rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        imports
            .entry(module.clone())
            .or_default()
            .extend(crate_imports(&text).into_iter().filter(|m| *m != module));
    }
    let mut wrong = Vec::new();
    for (module, deps) in &imports {
        let Some((rank, layer)) = layer_of(module) else {
            wrong.push(format!("{module} has no layer in tests/layering.rs"));
            continue;
        };
        for dep in deps {
            let Some((dep_rank, dep_layer)) = layer_of(dep) else {
                continue; // not a module of this crate (e.g. a macro path)
            };
            if dep_rank > rank {
                wrong.push(format!(
                    "{module} ({layer}) imports {dep} ({dep_layer}), a higher layer"
                ));
            } else if dep_rank == rank && layer == SERVICES {
                wrong.push(format!(
                    "{module} imports {dep}: services do not import each other"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "layering broken:\n  {}",
        wrong.join("\n  ")
    );
    // The test itself must see the crate: a broken scan passes nothing.
    assert!(imports["app"].contains("identity") && imports["cli"].contains("app"));
}

#[test]
fn the_scanner_reads_grouped_and_plain_paths() {
    let found = crate_imports(
        "use crate::{a, b::c};\nlet x = crate::d::e; // crate::f\n\
         #[cfg(test)]\nmod tests {\n    fn t() { if x { crate::g::h(); } }\n}\n",
    );
    assert_eq!(found.into_iter().collect::<Vec<_>>(), vec!["a", "b", "d"]);
}
