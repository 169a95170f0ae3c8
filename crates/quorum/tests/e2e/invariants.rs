//! Architecture invariants checked from the manifests: what must never depend on what.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each workspace crate's dependencies (normal ones, not dev-dependencies).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut g = BTreeMap::new();
    for entry in std::fs::read_dir(&crates).unwrap().flatten() {
        let manifest = entry.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let doc: toml::Table = text.parse().unwrap();
        let name = doc["package"]["name"].as_str().unwrap().to_string();
        let deps = doc
            .get("dependencies")
            .and_then(|d| d.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        g.insert(name, deps);
    }
    g
}

fn closure(g: &BTreeMap<String, BTreeSet<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_string()];
    while let Some(c) = stack.pop() {
        for d in g.get(&c).into_iter().flatten() {
            if seen.insert(d.clone()) {
                stack.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn no_worker_side_crate_reaches_the_signing_code() {
    let g = graph();
    assert!(
        g.contains_key("quorum-worker") && g.contains_key("quorum-signer"),
        "crates found: {:?}",
        g.keys()
    );
    for worker_side in [
        "quorum-worker",
        "quorum-store",
        "quorum-client",
        "quorum-git",
    ] {
        let deps = closure(&g, worker_side);
        assert!(
            !deps.contains("quorum-signer"),
            "{worker_side} depends on quorum-signer through {deps:?}"
        );
        assert!(
            !deps.contains("quorum-controller"),
            "{worker_side} depends on the controller"
        );
    }
}

#[test]
fn the_domain_core_and_tokens_do_no_io() {
    let g = graph();
    for pure in ["quorum-core", "quorum-token", "quorum-api"] {
        let deps = closure(&g, pure);
        for io in [
            "tokio",
            "reqwest",
            "sqlx",
            "axum",
            "quorum-service",
            "quorum-client",
        ] {
            assert!(!deps.contains(io), "{pure} must not depend on {io}");
        }
    }
}

#[test]
fn the_readme_worker_config_parses() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let start = readme
        .find("# worker.toml")
        .expect("README has a worker.toml example");
    let end = start + readme[start..].find("```").unwrap();
    let config: quorum_worker::Config = toml::from_str(&readme[start..end]).unwrap();
    assert_eq!(config.name, "alice-arm-1");
    assert!(!config.allow_weaker_sandbox && !config.allow_local_repositories);
    assert_eq!(
        config.trusted_issuers[0].tenants.as_deref(),
        Some(&["dinah".to_string()][..])
    );
}
