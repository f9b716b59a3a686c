//! The shape of the crate, checked from its source: the module import graph
//! has no cycle, the pure core (`src/model/`) imports nothing outside itself
//! and builds without the runtime crates, the product never imports the
//! tooling, and no file grows past 800 lines.
//!
//! The graph is read from the text: every `crate::a::b` path (in `use` lines
//! and inline) and every `super::` path that leaves a module is an edge from
//! the file's top-level module to the one it names. Unit tests
//! (`#[cfg(test)] mod tests`, and `tests.rs` files) and comments are left
//! out, since test code may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crate's source files, as (module path, text without tests and comments).
fn modules() -> BTreeMap<Vec<String>, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut out = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let mut parts: Vec<String> = rel
            .with_extension("")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        if parts == ["lib"] || parts == ["main"] || parts.last().is_some_and(|p| p == "tests") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("a source file is readable");
        out.insert(parts, strip(&text));
    }
    out
}

/// The text without `//` comments and without the `#[cfg(test)] mod tests { .. }` block.
fn strip(text: &str) -> String {
    let mut code = String::with_capacity(text.len());
    for line in text.lines() {
        let line = match line.find("//") {
            // A `//` inside a string literal is rare in this crate and
            // harmless: it can only hide a path, never invent one.
            Some(i) => &line[..i],
            None => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    // Cut each test module by matching its braces, so code after one is
    // still read.
    while let Some(start) = code.find("#[cfg(test)]\nmod tests") {
        let Some(open) = code[start..].find('{').map(|i| start + i) else {
            break;
        };
        let mut depth = 0usize;
        let mut end = code.len();
        for (i, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        code.replace_range(start..end, "");
    }
    code
}

/// Every path `prefix::a::b…` in `code`, as its segments. A group
/// (`prefix::{a::X, b}`) gives one path per member, its first segment only.
fn paths_after<'a>(code: &'a str, prefix: &'a str) -> impl Iterator<Item = Vec<String>> + 'a {
    code.match_indices(prefix).flat_map(move |(i, _)| {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            return Vec::new();
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            return group[..end]
                .split(',')
                .filter_map(|member| {
                    let ident: String = member
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    (!ident.is_empty()).then(|| vec![ident])
                })
                .collect();
        }
        let mut segments = Vec::new();
        for s in rest.split("::") {
            let ident: String = s
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if ident.is_empty() {
                break;
            }
            let whole = ident.len() == s.len();
            segments.push(ident);
            if !whole {
                break;
            }
        }
        vec![segments]
    })
}

/// Edges between top-level modules: who imports whom.
fn graph(modules: &BTreeMap<Vec<String>, String>) -> BTreeMap<String, BTreeSet<String>> {
    let tops: BTreeSet<String> = modules.keys().map(|m| m[0].clone()).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, code) in modules {
        let from = &module[0];
        let entry = edges.entry(from.clone()).or_default();
        for path in paths_after(code, "crate::") {
            if let Some(to) = path.first().filter(|t| tops.contains(*t) && *t != from) {
                entry.insert(to.clone());
            }
        }
    }
    edges
}

/// A cycle in `edges`, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = stack.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in edges.keys() {
        let mut stack = Vec::new();
        if let Some(c) = visit(node, edges, &mut marks, &mut stack) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_cycle() {
    let modules = modules();
    let edges = graph(&modules);
    assert!(
        edges.len() > 20,
        "the graph reader found only {} modules; it no longer reads the source",
        edges.len()
    );
    assert!(
        edges["pipeline"].contains("source") && edges["source"].contains("router"),
        "the graph reader misses known imports: {edges:#?}"
    );
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "import cycle among the modules of src/: {}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("c".into());
    edges.entry("c".into()).or_default().insert("a".into());
    edges.entry("d".into()).or_default().insert("a".into());
    let cycle = find_cycle(&edges).expect("a -> b -> c -> a is a cycle");
    assert_eq!(cycle.first(), cycle.last());
    edges.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&edges), None);
}

#[test]
fn the_model_imports_nothing_outside_itself() {
    let runtime_crates = [
        "rdkafka",
        "actix",
        "actix_rt",
        "actix_web",
        "sled",
        "tokio",
        "tracing",
        "metrics",
        "opentelemetry",
        "reqwest",
        "futures",
    ];
    let mut offences = Vec::new();
    for (module, code) in modules().iter().filter(|(m, _)| m[0] == "model") {
        let name = module.join("::");
        for path in paths_after(code, "crate::") {
            if path.first().is_some_and(|p| p != "model") {
                offences.push(format!("{name} imports crate::{}", path.join("::")));
            }
        }
        for krate in runtime_crates {
            let uses = paths_after(code, &format!("{krate}::")).count()
                + code.matches(&format!("use {krate}")).count();
            if uses > 0 {
                offences.push(format!("{name} uses the crate {krate}"));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "model/ is the pure core: {offences:#?}"
    );
}

#[test]
fn the_product_does_not_import_the_tooling() {
    let mut offences = Vec::new();
    for (module, code) in modules() {
        if module[0] == "tools" || module[0] == "cli" {
            continue;
        }
        for path in paths_after(&code, "crate::") {
            if path.first().is_some_and(|p| p == "tools" || p == "cli") {
                offences.push(format!(
                    "{} imports crate::{}",
                    module.join("::"),
                    path.join("::")
                ));
            }
        }
    }
    assert!(offences.is_empty(), "{offences:#?}");
}

#[test]
fn no_source_file_is_over_800_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut long = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let lines = std::fs::read_to_string(&path)
                    .expect("readable")
                    .lines()
                    .count();
                if lines > 800 {
                    long.push(format!("{} has {lines} lines", path.display()));
                }
            }
        }
    }
    assert!(
        long.is_empty(),
        "split these files along their seams: {long:?}"
    );
}

/// `cargo check --lib --no-default-features` builds the crate without the
/// `runtime` feature: `model` alone, with rdkafka, actix, sled and tokio not
/// even in the dependency graph. It uses its own target directory, so it does
/// not wait for the lock of the `cargo test` that runs it.
#[test]
fn the_model_builds_without_the_runtime_crates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tree = cargo(
        root,
        &[
            "tree",
            "--no-default-features",
            "--edges",
            "normal",
            "--prefix",
            "none",
        ],
    );
    for krate in ["rdkafka ", "actix ", "sled ", "tokio "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(krate)),
            "without the runtime feature the crate still depends on {krate}:\n{tree}"
        );
    }
    cargo(
        root,
        &["check", "--lib", "--no-default-features", "--quiet"],
    );
}

/// Runs cargo in `root` with its own target directory, and returns what it
/// printed; fails the test, with cargo's errors, when cargo fails.
fn cargo(root: &Path, args: &[&str]) -> String {
    let out =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(root)
            .env("CARGO_TARGET_DIR", root.join("target").join("model-check"))
            .args(args)
            .output()
            .expect("cargo runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cargo {}:\n{stderr}", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
