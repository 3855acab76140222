//! The module layers of the two biggest crates: no import cycles among
//! the top-level modules of halo-proxy and halo-control (a module and its
//! submodules count as one; test code is left out). On failure it prints
//! each cycle and the references that make it.
//!
//! Run: `cargo test -p halo --test layers -- --nocapture` (prints each
//! crate's modules in dependency order).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module -> (module it references -> first file and line).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a source file: `src/a/b.rs` is `[a, b]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// Production code only: a file's text up to its test module.
fn production(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The first path segments named after `crate::` (or the items of a
/// `crate::{...}` group) at each occurrence.
fn crate_refs(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // Items at depth 1 of the group, up to the closing brace
                // (a group over several lines is read from the text).
                let at = text.lines().skip(lineno).collect::<Vec<_>>().join("\n");
                let start = at.find("crate::{").map(|k| k + "crate::{".len()).unwrap_or(0);
                let mut depth = 1;
                let mut item_start = true;
                let body = &at[start..];
                for (k, c) in body.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        ',' if depth == 1 => item_start = true,
                        c if item_start && (c.is_ascii_alphabetic() || c == '_') => {
                            item_start = false;
                            out.push((lineno + 1, ident_at(&body[k..]).to_string()));
                        }
                        _ => {}
                    }
                }
                let _ = group;
            } else {
                out.push((lineno + 1, ident_at(rest).to_string()));
            }
        }
    }
    out
}

fn graph(krate: &str) -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(krate).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let tops: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f).first().cloned()).collect();
    let mut g = Graph::new();
    for f in &files {
        let module = module_of(&src, f);
        let Some(top) = module.first().cloned() else { continue }; // lib.rs: declarations and re-exports
        if f.file_name().is_some_and(|n| n == "tests.rs") || module.iter().any(|m| m == "tests") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let mut refs = crate_refs(production(&text));
        // `super::x` from a top-level file names another top-level module.
        if module.len() == 1 {
            for (lineno, line) in production(&text).lines().enumerate() {
                let mut rest = line.split("//").next().unwrap_or("");
                while let Some(i) = rest.find("super::") {
                    rest = &rest[i + "super::".len()..];
                    refs.push((lineno + 1, ident_at(rest).to_string()));
                }
            }
        }
        let rel = f.strip_prefix(&src).unwrap().display().to_string();
        let edges = g.entry(top.clone()).or_default();
        for (line, to) in refs {
            if to != top && tops.contains(&to) {
                edges.entry(to).or_insert_with(|| format!("{krate}/src/{rel}:{line}"));
            }
        }
    }
    for t in tops {
        g.entry(t).or_default();
    }
    g
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct St<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut St<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on.insert(v);
        for w in s.g[v].keys() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s =
        St { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), out: Vec::new() };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// Modules bottom first: each after everything it uses.
fn layers(g: &Graph) -> Vec<Vec<String>> {
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    while done.len() < g.len() {
        let layer: Vec<String> = g
            .iter()
            .filter(|(m, uses)| !done.contains(*m) && uses.keys().all(|u| done.contains(u)))
            .map(|(m, _)| m.clone())
            .collect();
        if layer.is_empty() {
            break;
        }
        done.extend(layer.iter().cloned());
        out.push(layer);
    }
    out
}

fn check(krate: &str) {
    let g = graph(krate);
    let found = cycles(&g);
    let mut report = String::new();
    for c in &found {
        report.push_str(&format!("\ncycle among {}:\n", c.join(", ")));
        for m in c {
            for (to, at) in &g[m] {
                if c.contains(to) {
                    report.push_str(&format!("  {m} -> {to}  ({at})\n"));
                }
            }
        }
    }
    assert!(found.is_empty(), "{krate} has import cycles:{report}");
    println!("{krate}, bottom layer first:");
    for (i, l) in layers(&g).iter().enumerate() {
        println!("  {i}: {}", l.join(" "));
    }
}

#[test]
fn halo_control_has_no_import_cycles() {
    check("halo-control");
}

#[test]
fn halo_proxy_has_no_import_cycles() {
    check("halo-proxy");
}
