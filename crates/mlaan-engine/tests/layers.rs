//! The engine's layers point one way (docs/design.md, "Layers"): every `crate::…` path in a
//! source file names its own layer or one below. The circle of imports the engine once had
//! (hand-off ↔ module ↔ stage ↔ pipeline) cannot come back without failing this test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The engine's top-level modules by layer, bottom first. Items of the crate root (re-exports
/// of the error type, `bytes_of`) count as the bottom layer.
const LAYERS: &[&[&str]] =
    &[&["error"], &["wire"], &["optim", "init"], &["module"], &["stage"], &["pipeline", "profile"]];

fn layer_of_module(name: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&name))
}

/// The layer of a source file: that of the top-level module it belongs to (`lib.rs` is the
/// crate root, which may name every layer: it declares them).
fn layer_of_file(rel: &Path) -> Option<usize> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    if name == "lib" {
        return None;
    }
    Some(layer_of_module(name).unwrap_or_else(|| panic!("{}: not in any layer", rel.display())))
}

/// The first path segment after every `crate::` in `code` (comments removed), with the
/// grouped form `crate::{a::X, b}` read as `a` and `b`.
fn crate_paths(code: &str) -> Vec<String> {
    let code: String = code
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(group.len(), |(j, _)| j);
            let mut level = 0;
            let mut start = 0;
            for (j, c) in group[..end].char_indices().chain(std::iter::once((end, ','))) {
                match c {
                    '{' => level += 1,
                    '}' => level -= 1,
                    ',' if level == 0 => {
                        out.push(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|s: &String| !s.is_empty());
    out
}

/// Every path in `code` (of the file `rel`) that goes up a layer, with the layers involved.
fn upward(rel: &Path, code: &str) -> Vec<String> {
    let Some(own) = layer_of_file(rel) else { return Vec::new() };
    crate_paths(code)
        .into_iter()
        .filter_map(|first| {
            // A lower-case name of a known module is that module; anything else is a root item.
            let target = layer_of_module(&first).unwrap_or(0);
            (target > own).then(|| {
                format!("{} (layer {own}) uses crate::{first} (layer {target})", rel.display())
            })
        })
        .collect()
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_engine_file_imports_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "{} source files?", files.len());
    let mut by_layer: BTreeMap<usize, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        if let Some(l) = layer_of_file(rel) {
            *by_layer.entry(l).or_default() += 1;
        }
        bad.extend(upward(rel, &std::fs::read_to_string(f).unwrap()));
    }
    assert!(bad.is_empty(), "imports that go up a layer:\n{}", bad.join("\n"));
    assert_eq!(by_layer.len(), LAYERS.len(), "every layer has files: {by_layer:?}");
}

#[test]
fn the_checker_sees_an_upward_import_in_every_form() {
    let stage = Path::new("stage/mod.rs");
    assert_eq!(upward(stage, "use crate::pipeline::port::Port;").len(), 1);
    assert_eq!(upward(stage, "use crate::{wire::Forward, profile::module_costs};").len(), 1);
    assert_eq!(upward(stage, "fn f() { let _ = crate::pipeline::POLL; }").len(), 1);
    assert_eq!(upward(Path::new("wire/handoff.rs"), "use crate::module::LocalModule;").len(), 1);
    // Downward, sideways within a layer, root items and comments are fine.
    let fine = "use crate::module::{LocalModule, Traffic};\nuse crate::{bytes_of, TrainError};\n\
                // crate::pipeline in a comment\nuse crate::wire::{BackMsg, Handed};";
    assert!(upward(stage, fine).is_empty(), "{:?}", upward(stage, fine));
    assert!(upward(Path::new("init.rs"), "use crate::optim::Sgd;").is_empty());
    assert!(upward(Path::new("lib.rs"), "pub use crate::pipeline::Pipeline;").is_empty());
}
