//! Failpoints for the fault tests: a named point where a debug build of the controller stops
//! dead when the test has armed it, so a test can SIGKILL the controller at that exact moment
//! (issue 6: "kill -9 while verdicts are being signed"). Armed by creating the file
//! `failpoints/<name>` in the controller's data directory; on reaching the point the controller
//! writes `failpoints/<name>.reached` and waits forever. Release builds compile the points to
//! nothing, so the production path does not change.

use crate::State;

/// After the signer signed a build, with the statement and the verified state written inside
/// the transaction but not committed.
pub const AFTER_SIGNING: &str = "after-signing";

/// Stops here for good if the failpoint `name` is armed (debug builds only).
#[cfg(debug_assertions)]
pub async fn pause_if_armed(state: &State, name: &str) {
    let armed = state.failpoints.join(name);
    if !armed.exists() {
        return;
    }
    tracing::warn!(failpoint = name, "failpoint reached; waiting to be killed");
    if let Err(e) = std::fs::write(armed.with_extension("reached"), name) {
        tracing::error!(failpoint = name, error = %e, "cannot record the failpoint as reached");
    }
    std::future::pending::<()>().await;
}

#[cfg(not(debug_assertions))]
pub async fn pause_if_armed(_state: &State, _name: &str) {}
