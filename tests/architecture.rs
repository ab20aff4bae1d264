//! The boundaries the code keeps, checked from the source: no import
//! cycles between modules (in the proxy and in the bench), and the sans-io
//! core neither touches the io_uring shell nor may use `unsafe` or read the
//! clock (the attributes that make the compiler and clippy enforce it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every module of a crate: its path (`shard::conn`) and its file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut mods = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        if parts.first().is_some_and(|p| p == "bin") {
            continue; // binaries are crate roots of their own
        }
        if parts.last().is_some_and(|l| l == "mod" || l == "lib" || l == "main") {
            parts.pop();
        }
        if parts.last().is_some_and(|l| l == "tests") {
            continue; // unit tests may reach anything
        }
        mods.insert(parts.join("::"), f);
    }
    mods
}

/// The source without comments and without its `#[cfg(test)] mod tests`.
fn code(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap();
    let s = s.split("#[cfg(test)]\nmod tests").next().unwrap_or("").to_string();
    s.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The modules each module refers to (`crate::a::b`, `super::x`, and the
/// items of `use crate::{..}` / `use super::{..}`), other than itself and
/// its own submodules (which it declares).
fn edges(mods: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let resolve = |path: &[&str]| -> Option<String> { (1..=path.len()).rev().map(|i| path[..i].join("::")).find(|c| mods.contains_key(c)) };
    let mut out = BTreeMap::new();
    for (m, file) in mods {
        let src = code(file);
        let me: Vec<&str> = if m.is_empty() { vec![] } else { m.split("::").collect() };
        let parent: Vec<&str> = me.iter().take(me.len().saturating_sub(1)).copied().collect();
        let mut targets = BTreeSet::new();
        let mut add = |base: &[&str], rest: &str| {
            let mut p: Vec<&str> = base.to_vec();
            p.extend(rest.split("::").map(str::trim).filter(|s| !s.is_empty()));
            if let Some(t) = resolve(&p)
                && t != *m
                && !(m.is_empty() || t.starts_with(&format!("{m}::")))
            {
                targets.insert(t);
            }
        };
        let bytes = src.as_bytes();
        for (kw, base) in [("crate::", &[][..]), ("super::", &parent[..])] {
            let mut from = 0;
            while let Some(i) = src[from..].find(kw) {
                let start = from + i;
                from = start + kw.len();
                if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                    continue;
                }
                let rest = &src[from..];
                if let Some(group) = rest.strip_prefix('{') {
                    let inner = group.split('}').next().unwrap_or("");
                    for item in inner.split(',') {
                        add(base, item.split_whitespace().next().unwrap_or(""));
                    }
                } else {
                    let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
                    add(base, path.trim_end_matches(':'));
                }
            }
        }
        out.insert(m.clone(), targets);
    }
    out
}

/// Every cycle (strongly connected set of more than one module).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Kosaraju: order by finish time, then walk the reversed graph.
    fn visit(v: &str, g: &BTreeMap<String, BTreeSet<String>>, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(v.to_string()) {
            return;
        }
        for w in g.get(v).into_iter().flatten() {
            visit(w, g, seen, order);
        }
        order.push(v.to_string());
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for v in g.keys() {
        visit(v, g, &mut seen, &mut order);
    }
    let mut rev: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, bs) in g {
        for b in bs {
            rev.entry(b.clone()).or_default().insert(a.clone());
        }
    }
    let mut assigned = BTreeSet::new();
    let mut out = Vec::new();
    for v in order.iter().rev() {
        let mut comp = Vec::new();
        let mut stack = vec![v.clone()];
        while let Some(x) = stack.pop() {
            if !assigned.insert(x.clone()) {
                continue;
            }
            comp.push(x.clone());
            stack.extend(rev.get(&x).into_iter().flatten().cloned());
        }
        if comp.len() > 1 {
            comp.sort();
            out.push(comp);
        }
    }
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let crates = ["src", "bench/src", "crates/holdfast-link/src", "crates/holdfast-wsm/src", "crates/holdfast-wsm-ref/src"];
    for src in crates.map(|c| root().join(c)) {
        let mods = modules(&src);
        let g = edges(&mods);
        let found = cycles(&g);
        assert!(found.is_empty(), "import cycles in {}: {found:?}", src.display());
    }
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    g.entry("d".into()).or_default().insert("a".into());
    assert_eq!(cycles(&g), vec![vec!["a".to_string(), "b".into(), "c".into()]]);
    // And it sees the edges of real code: the shell's tunnel uses its socket I/O.
    let g = edges(&modules(&root().join("src")));
    assert!(g["shard::tunnel"].contains("shard::io"), "{:?}", g["shard::tunnel"]);
    assert!(g["shard::tunnel"].contains("session::tunnel"));
}

/// The sans-io core: protocol machines fed bytes, events and `now`.
const CORE: &[&str] = &["blame", "session", "link", "ws", "tls::record", "tls::keys", "tls::handshake", "upgrade::snapshot"];

#[test]
fn the_sans_io_core_never_reaches_the_shell_and_forbids_unsafe_and_clock_reads() {
    let src = root().join("src");
    let mods = modules(&src);
    let g = edges(&mods);
    for (m, file) in &mods {
        let Some(top) = CORE.iter().find(|c| m == *c || m.starts_with(&format!("{c}::"))) else { continue };
        if m.ends_with("harness") {
            continue; // tests only
        }
        for t in &g[m] {
            assert!(!t.starts_with("shard") && t != "proxy" && t != "main", "{m} reaches the shell module {t}");
        }
        let text = code(file);
        assert!(!text.contains("monoio"), "{m} uses the runtime");
        // The attributes sit in the module's own file or in an ancestor's
        // (an inner attribute covers the submodules).
        let _ = top;
        let parts: Vec<&str> = m.split("::").collect();
        let attrs: String =
            (1..=parts.len()).filter_map(|i| mods.get(&parts[..i].join("::"))).map(|f| std::fs::read_to_string(f).unwrap()).collect();
        assert!(attrs.contains("#![forbid(unsafe_code)]"), "{m}: no #![forbid(unsafe_code)]");
        assert!(attrs.contains("#![deny(clippy::disallowed_methods)]"), "{m}: clock reads are not denied");
    }
}

/// The `[dependencies]` keys of a manifest.
fn dependencies(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut deps = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            inside = l == "[dependencies]";
            continue;
        }
        if inside && let Some((k, _)) = l.split_once('=') {
            deps.push(k.trim().to_string());
        }
    }
    deps
}

#[test]
fn the_link_crate_needs_no_runtime_and_the_edge_does_not_link_redis() {
    let mut link = dependencies(&root().join("crates/holdfast-link/Cargo.toml"));
    link.sort();
    assert_eq!(link, ["serde", "thiserror"], "holdfast-link: plain data and errors only");
    let lib = std::fs::read_to_string(root().join("crates/holdfast-link/src/lib.rs")).unwrap();
    assert!(lib.contains("#![forbid(unsafe_code)]") && lib.contains("#![deny(clippy::disallowed_methods)]"));
    for (m, file) in modules(&root().join("crates/holdfast-link/src")) {
        let text = code(&file);
        for io in ["std::net", "std::fs", "std::thread", "monoio", "tokio"] {
            assert!(!text.contains(io), "holdfast-link::{m} does I/O ({io})");
        }
    }
    let wsm = dependencies(&root().join("crates/holdfast-wsm/Cargo.toml"));
    assert!(!wsm.iter().any(|d| d == "redis" || d == "holdfast" || d == "monoio"), "holdfast-wsm: {wsm:?}");
    let edge = dependencies(&root().join("Cargo.toml"));
    assert!(!edge.iter().any(|d| d == "redis"), "the edge package: {edge:?}");
    // And transitively, as cargo resolves it.
    let out = std::process::Command::new(env!("CARGO"))
        .args(["tree", "-p", "holdfast", "-e", "normal", "--prefix", "none", "--offline"])
        .current_dir(root())
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cargo tree: {}", String::from_utf8_lossy(&out.stderr));
    assert!(tree.lines().any(|l| l.starts_with("holdfast-link ")), "{tree}");
    assert!(!tree.lines().any(|l| l.starts_with("redis ")), "the edge links redis:\n{tree}");
}
