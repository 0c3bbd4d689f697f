//! The module graph has no cycles (docs/architecture.md, "Invariants"): for every module, the
//! `use` edges among its child modules form a DAG, for the relay and for kube-sim. An edge from
//! `a::b::c` to `a::d::e` counts as `b → d` among the children of `a`; a child using its own
//! ancestor's items is not an edge (an ancestor's items are its children's shared interface), so
//! what is checked is what a reader follows: no module depends, through any path, on a module
//! that depends on it. Test-only code (`tests.rs`, `#[cfg(test)] mod tests`) is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type ModPath = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`; `src/lib.rs` the root.
fn module_of(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: ModPath = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
        parts.pop();
    }
    parts
}

/// The code a reader follows: comments and the inline test module cut away.
fn code_of(text: &str) -> String {
    let cut = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..cut]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path starting at `s` (just after `crate::` or `super::`), expanding `{a, b::{c}}`.
fn paths_at(s: &str, prefix: &ModPath, out: &mut Vec<ModPath>) -> usize {
    let mut cur = prefix.clone();
    let mut i = 0;
    let b = s.as_bytes();
    loop {
        let start = i;
        while i < b.len() && is_ident(b[i] as char) {
            i += 1;
        }
        if i > start {
            cur.push(s[start..i].to_owned());
        }
        if s[i..].starts_with("::") {
            i += 2;
            if s[i..].starts_with('{') {
                i += 1;
                loop {
                    while i < b.len() && (b[i] as char).is_whitespace() {
                        i += 1;
                    }
                    if i >= b.len() || b[i] == b'}' {
                        return i + 1;
                    }
                    i += paths_at(&s[i..], &cur, out);
                    while i < b.len() && (b[i] == b',' || (b[i] as char).is_whitespace()) {
                        i += 1;
                    }
                }
            }
            continue;
        }
        out.push(cur);
        return i;
    }
}

/// Module-level `use` edges of one file: (from, to) with `to` the longest known module prefix.
fn edges(
    module: &ModPath,
    code: &str,
    known: &BTreeSet<ModPath>,
    out: &mut Vec<(ModPath, ModPath)>,
) {
    let mut found = Vec::new();
    for (marker, base) in [
        ("crate::", Vec::new()),
        ("super::", module[..module.len().saturating_sub(1)].to_vec()),
    ] {
        let mut at = 0;
        while let Some(off) = code[at..].find(marker) {
            let pos = at + off;
            at = pos + marker.len();
            if pos > 0 && is_ident(code.as_bytes()[pos - 1] as char) {
                continue;
            }
            paths_at(&code[at..], &base, &mut found);
        }
    }
    for p in found {
        let target = (0..=p.len())
            .rev()
            .map(|n| p[..n].to_vec())
            .find(|m| known.contains(m))
            .unwrap_or_default();
        out.push((module.clone(), target));
    }
}

/// The cycles among sibling modules of a crate rooted at `src`, as readable strings.
fn cycles(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.retain(|f| {
        f.file_name()
            .is_some_and(|n| n != "main.rs" && n != "tests.rs")
            && !f.components().any(|c| c.as_os_str() == "bin")
    });
    let known: BTreeSet<ModPath> = files.iter().map(|f| module_of(src, f)).collect();
    let mut all = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        edges(&module_of(src, f), &code_of(&text), &known, &mut all);
    }
    // Sibling graphs: parent → (child → children it uses).
    let mut graphs: BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, to) in all {
        let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
        if common == from.len() || common == to.len() {
            continue;
        }
        graphs
            .entry(from[..common].to_vec())
            .or_default()
            .entry(from[common].clone())
            .or_default()
            .insert(to[common].clone());
    }
    let mut found = Vec::new();
    for (parent, g) in &graphs {
        // Depth-first search with colours; each back edge is one cycle.
        fn visit(
            n: &str,
            g: &BTreeMap<String, BTreeSet<String>>,
            state: &mut BTreeMap<String, u8>,
            stack: &mut Vec<String>,
            out: &mut Vec<Vec<String>>,
        ) {
            state.insert(n.to_owned(), 1);
            stack.push(n.to_owned());
            for m in g.get(n).into_iter().flatten() {
                match state.get(m.as_str()).copied().unwrap_or(0) {
                    0 => visit(m, g, state, stack, out),
                    1 => {
                        let i = stack.iter().position(|s| s == m).unwrap();
                        let mut c = stack[i..].to_vec();
                        c.push(m.clone());
                        out.push(c);
                    }
                    _ => {}
                }
            }
            stack.pop();
            state.insert(n.to_owned(), 2);
        }
        let mut state = BTreeMap::new();
        let mut out = Vec::new();
        for n in g.keys() {
            if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
                visit(n, g, &mut state, &mut Vec::new(), &mut out);
            }
        }
        let scope = if parent.is_empty() {
            "crate".to_owned()
        } else {
            parent.join("::")
        };
        for c in out {
            found.push(format!("in {scope}: {}", c.join(" → ")));
        }
    }
    found
}

#[test]
fn no_import_cycles_among_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for src in [root.join("src"), root.join("kube-sim/src")] {
        let c = cycles(&src);
        assert!(
            c.is_empty(),
            "import cycles in {}:\n{}",
            src.display(),
            c.join("\n")
        );
    }
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path();
    std::fs::create_dir_all(s.join("b")).unwrap();
    std::fs::write(s.join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(s.join("a.rs"), "use crate::b::{c::C, D};\n").unwrap();
    std::fs::write(s.join("b/mod.rs"), "pub mod c;\npub struct D;\n").unwrap();
    std::fs::write(
        s.join("b/c.rs"),
        "use super::D;\npub fn f() { crate::a::g() }\n",
    )
    .unwrap();
    assert_eq!(cycles(s), vec!["in crate: a → b → a".to_owned()]);
    std::fs::write(s.join("b/c.rs"), "use super::D;\n").unwrap();
    assert!(cycles(s).is_empty());
}

/// The shipped relay (container image, release artefact: `--no-default-features`) links no
/// simulator: `kube-relay dev` and kube-sim come only with the default `dev` feature.
#[test]
fn the_shipped_relay_does_not_link_the_simulator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tree = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO"))
            .args(["tree", "--offline", "-e", "normal", "-p", "kube-relay"])
            .args(extra)
            .current_dir(root)
            .output()
            .expect("cargo tree runs");
        assert!(
            out.status.success(),
            "cargo tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(
        !tree(&["--no-default-features"]).contains("kube-sim"),
        "kube-sim is linked without the dev feature"
    );
    assert!(
        tree(&[]).contains("kube-sim"),
        "the default build has `kube-relay dev`, so it links kube-sim"
    );
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("cargo build --release --locked --no-default-features"),
        "the container image is built without the dev feature"
    );
}

/// Layers (docs/architecture.md, "Module map"): the relay's server side never imports the
/// user-side CLI (what both need is in `wire`), the CLI imports no part of the request path,
/// and `wire` and `net` import nothing that serves requests.
#[test]
fn the_server_side_never_imports_the_cli() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for f in &files {
        let module = module_of(&src, f);
        let first = module.first().map(String::as_str).unwrap_or("");
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        let banned: &[&str] = match first {
            // The user side reaches the relay's code only for what it shares: the outbound
            // stack, the wire documents, configuration (doctor) and the upstream pool (doctor
            // checks what the relay would dial).
            "cli" => &[
                "crate::server",
                "crate::proxy",
                "crate::portal",
                "crate::state",
                "crate::credentials",
                "crate::auth",
                "crate::authz",
                "crate::audit",
                "crate::streams",
            ],
            // The embedded default and the binary's entry point may use it all.
            "dev" | "main" => &[],
            "wire" | "net" => &[
                "crate::cli",
                "crate::server",
                "crate::proxy",
                "crate::portal",
                "crate::state",
            ],
            _ => &["crate::cli"],
        };
        for b in banned {
            if code.contains(b) {
                found.push(format!("{} uses {b}", f.display()));
            }
        }
    }
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

/// Comments send a reader only to documents in the repository (docs/architecture.md,
/// docs/security.md, docs/protocols.md), never to product documents kept elsewhere.
#[test]
fn comments_cite_only_documents_in_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in [
        "src",
        "tests",
        "benches",
        "kube-sim/src",
        "kube-sim/tests",
        "fuzz",
    ] {
        if root.join(dir).is_dir() {
            rust_files(&root.join(dir), &mut files);
        }
    }
    let mut found = Vec::new();
    for f in &files {
        if f.components().any(|c| c.as_os_str() == "target") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            // The product documents kept outside the repository, by stem.
            for stem in ["design", "style", "security", "protocols"] {
                let doc = format!("{stem}.md");
                let doc = doc.as_str();
                let mut at = 0;
                while let Some(i) = line[at..].find(doc) {
                    let start = at + i;
                    if !line[..start].ends_with("docs/") {
                        found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                    }
                    at = start + doc.len();
                }
            }
        }
    }
    // This test names the files it looks for.
    found.retain(|l| !l.contains("architecture.rs"));
    assert!(found.is_empty(), "outside citations:\n{}", found.join("\n"));
}
