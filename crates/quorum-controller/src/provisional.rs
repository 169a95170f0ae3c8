//! Provisional inputs: a job with `provisional: true` may start once each job it needs is
//! verified or provisional (agreeing results short of their policy). Its own verdict is then held
//! as provisional, promoted on the pass that finds its inputs verified (the verdict is
//! recomputed from the stored results every pass), and discarded, the job failing with the
//! reason, when an input ends any other way. The build is final, and so signed, only once no
//! job in it is provisional.

use std::collections::BTreeMap;

use quorum_core::pipeline::JobSpec;
use quorum_core::verdict::{JobVerdict, Outcome};

use crate::db::AssignmentRow;

/// What the jobs a job needs allow it to do on this pass.
pub enum Needs<'a> {
    /// Go on; the needs named are provisional, so the job's result will be too.
    Ready(Vec<&'a str>),
    /// Wait (detail says for what).
    Waiting(String),
    /// A need ended without verifying before this job started: it never runs.
    Skipped(String),
    /// A need this job started on provisionally ended without verifying: its result is thrown
    /// away and the job fails with this reason.
    Discarded(String),
}

/// How the detail of a job discarded for having run on `need`'s provisional results begins:
/// what finds it again when a trusted rebuild settles `need` after all (`rebuild.rs`).
pub fn discarded_on(need: &str) -> String {
    format!("discarded: it ran on provisional results of `{need}`")
}

/// Checks `spec`'s needs against the states of this pass. `mine` are the job's assignments of
/// its current round; `is_final` is the scheduler's notion of a final job state.
pub fn check_needs<'a>(
    spec: &'a JobSpec,
    mine: &[&AssignmentRow],
    states: &BTreeMap<String, String>,
    is_final: fn(&str) -> bool,
) -> Needs<'a> {
    // Once started on provisional inputs the job runs on until they are final, even while an
    // input has no agreeing results for a moment (a new result differs, more are outstanding).
    let started = spec.provisional && mine.iter().any(|a| a.state != "declined");
    let mut provisional = Vec::new();
    for need in &spec.needs {
        match states.get(need).map(String::as_str) {
            Some("verified") => {}
            Some(s) if is_final(s) && started => {
                return Needs::Discarded(format!("{}, which ended {s}", discarded_on(need)));
            }
            Some(s) if is_final(s) => {
                return Needs::Skipped(format!("needs `{need}`, which is {s}"));
            }
            Some("provisional") if spec.provisional => provisional.push(need.as_str()),
            Some(_) if started => provisional.push(need.as_str()),
            _ => return Needs::Waiting(format!("waiting for `{need}`")),
        }
    }
    Needs::Ready(provisional)
}

/// A final verdict reached on provisional inputs, held until they are final: the state, the
/// detail and the manifest to record. Only agreeing successes are `provisional` (what a job
/// downstream may start on); a failure or a disagreement waits as `running`.
pub fn held(verdict: &JobVerdict, inputs: &[&str]) -> (&'static str, String, Option<String>) {
    let until = format!(
        "provisional until {} verif{}",
        inputs
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", "),
        if inputs.len() == 1 { "ies" } else { "y" }
    );
    match verdict {
        JobVerdict::Verified { manifest, workers } => (
            "provisional",
            format!(
                "{} identical results from {} on provisional inputs; {until}",
                workers.len(),
                workers.join(", ")
            ),
            Some(manifest.to_string()),
        ),
        JobVerdict::Failed { workers } => (
            "running",
            format!(
                "{} workers agree the job fails on provisional inputs; {until}",
                workers.len()
            ),
            None,
        ),
        JobVerdict::Disputed { groups } => (
            "running",
            format!(
                "results on provisional inputs differ ({}); {until}",
                groups
                    .iter()
                    .map(|(o, ws)| match o {
                        Outcome::Success { manifest } =>
                            format!("{manifest} from {}", ws.join(", ")),
                        Outcome::Failed => format!("failure from {}", ws.join(", ")),
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            None,
        ),
        JobVerdict::Pending { .. } => ("running", until, None),
    }
}
