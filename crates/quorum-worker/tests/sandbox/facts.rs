//! The environment facts each result carries, gathered from a real sandbox on this host.

use quorum_worker::executor::{LandlockTier, Limits, ProcessExecutor};

use super::sandbox;

#[test]
fn facts_name_the_kernel_cpu_tier_bubblewrap_and_root_fs() {
    let state = tempfile::tempdir().unwrap();
    let Some(sb) = sandbox(state.path(), Limits::default()) else {
        return;
    };
    let facts = quorum_worker::facts::collect(&sb);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(facts.kernel, release.trim());
    assert_eq!(facts.executor, "namespaces");
    assert!(facts.cpus >= 1);
    assert!(!facts.cpu_model.is_empty(), "{facts:?}");
    assert!(facts.bubblewrap.starts_with("bubblewrap "), "{facts:?}");
    assert!(
        facts.sandbox.starts_with("namespaces, seccomp, "),
        "{facts:?}"
    );
    if let LandlockTier::Full { abi } = sb.landlock() {
        assert!(
            facts.sandbox.contains(&format!("landlock ABI {abi}")),
            "{facts:?}"
        );
    }
    assert!(facts.root_fs.starts_with("sha256:"), "{facts:?}");
    // Gathered twice on one host, the facts agree: a difference between results means a
    // difference between environments.
    assert_eq!(facts, quorum_worker::facts::collect(&sb));

    let plain = quorum_worker::facts::collect(&ProcessExecutor);
    assert_eq!(plain.sandbox, "process");
    assert_eq!(plain.bubblewrap, "");
    assert_eq!(plain.root_fs, facts.root_fs);
}
