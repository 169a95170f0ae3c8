//! The pipeline file, `.quorum.yml`: jobs with shell steps, artifact globs, `needs` between jobs,
//! a timeout, labels, and the quorum policy. Parsing refuses unknown keys (naming the key and its
//! line), and validation refuses what could not run (no script, unknown or cyclic `needs`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::names::check_job_name;

pub const PIPELINE_FILE: &str = ".quorum.yml";
pub const DEFAULT_TIMEOUT_SECS: u64 = 3600;
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;

/// How many identical results a job needs, and how many of them from trusted workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default = "default_quorum")]
    pub quorum: u32,
    #[serde(default)]
    pub trusted: u32,
}

fn default_quorum() -> u32 {
    2
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            quorum: default_quorum(),
            trusted: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    #[serde(default)]
    policy: Option<Policy>,
    jobs: BTreeMap<String, RawJob>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    #[serde(default)]
    script: Option<Vec<String>>,
    #[serde(default)]
    artifacts: Vec<String>,
    #[serde(default)]
    needs: Vec<String>,
    #[serde(default)]
    timeout: Option<Timeout>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    policy: Option<Policy>,
}

/// Seconds, given in the file as an integer or as `90s`, `10m`, `2h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timeout(u64);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Timeout, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        let secs = match Raw::deserialize(d)? {
            Raw::Secs(s) => s,
            Raw::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom)?,
        };
        Ok(Timeout(secs))
    }
}

fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("timeout `{text}` is not like `90`, `90s`, `10m` or `2h`"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => {
            return Err(format!(
                "timeout `{text}` has unknown unit `{unit}`; use s, m or h"
            ));
        }
    };
    Ok(n.saturating_mul(mult))
}

/// A validated pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    /// Jobs in a topological order: every job comes after all the jobs it needs.
    pub jobs: Vec<JobSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub script: Vec<String>,
    pub artifacts: Vec<String>,
    pub needs: Vec<String>,
    pub timeout_secs: u64,
    pub labels: BTreeMap<String, String>,
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineError(pub String);

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", PIPELINE_FILE, self.0)
    }
}

impl std::error::Error for PipelineError {}

impl Pipeline {
    pub fn parse(text: &str) -> Result<Pipeline, PipelineError> {
        let raw: RawPipeline =
            serde_yaml_ng::from_str(text).map_err(|e| PipelineError(e.to_string()))?;
        let default_policy = raw.policy.unwrap_or_default();
        check_policy("policy", default_policy)?;
        if raw.jobs.is_empty() {
            return Err(PipelineError(
                "`jobs` is empty; define at least one job".into(),
            ));
        }
        let mut jobs = BTreeMap::new();
        for (name, job) in raw.jobs {
            check_job_name(&name).map_err(PipelineError)?;
            let script = job.script.unwrap_or_default();
            if script.is_empty() {
                return Err(PipelineError(format!(
                    "job `{name}` has no `script`; give it at least one step"
                )));
            }
            if let Some(i) = script.iter().position(|s| s.trim().is_empty()) {
                return Err(PipelineError(format!(
                    "job `{name}`: script step {} is empty",
                    i + 1
                )));
            }
            for glob in &job.artifacts {
                if glob.starts_with('/') || glob.split('/').any(|s| s == "..") || glob.is_empty() {
                    return Err(PipelineError(format!(
                        "job `{name}`: artifact pattern `{glob}` must be relative to the build directory, without `..`"
                    )));
                }
            }
            let timeout_secs = job.timeout.map(|t| t.0).unwrap_or(DEFAULT_TIMEOUT_SECS);
            if timeout_secs == 0 || timeout_secs > MAX_TIMEOUT_SECS {
                return Err(PipelineError(format!(
                    "job `{name}`: timeout must be between 1 second and {MAX_TIMEOUT_SECS} seconds"
                )));
            }
            let policy = job.policy.unwrap_or(default_policy);
            check_policy(&format!("job `{name}`: policy"), policy)?;
            let mut needs = job.needs.clone();
            needs.sort();
            if needs.windows(2).any(|w| w[0] == w[1]) {
                return Err(PipelineError(format!(
                    "job `{name}` lists the same job twice in `needs`"
                )));
            }
            jobs.insert(
                name.clone(),
                JobSpec {
                    name,
                    script,
                    artifacts: job.artifacts,
                    needs,
                    timeout_secs,
                    labels: job.labels,
                    policy,
                },
            );
        }
        for job in jobs.values() {
            for need in &job.needs {
                if !jobs.contains_key(need) {
                    return Err(PipelineError(format!(
                        "job `{}` needs `{need}`, which is not defined",
                        job.name
                    )));
                }
            }
        }
        let order = topological_order(&jobs)?;
        Ok(Pipeline {
            jobs: order.into_iter().map(|n| jobs[&n].clone()).collect(),
        })
    }

    pub fn job(&self, name: &str) -> Option<&JobSpec> {
        self.jobs.iter().find(|j| j.name == name)
    }
}

fn check_policy(context: &str, p: Policy) -> Result<(), PipelineError> {
    if p.quorum == 0 || p.quorum > 16 {
        return Err(PipelineError(format!(
            "{context}: `quorum` must be between 1 and 16, not {}",
            p.quorum
        )));
    }
    if p.trusted > p.quorum {
        return Err(PipelineError(format!(
            "{context}: `trusted` ({}) cannot exceed `quorum` ({})",
            p.trusted, p.quorum
        )));
    }
    Ok(())
}

/// Kahn's algorithm, alphabetical among ready jobs so the order is stable; a leftover job means
/// a cycle, reported as the path around it.
fn topological_order(jobs: &BTreeMap<String, JobSpec>) -> Result<Vec<String>, PipelineError> {
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut order = Vec::new();
    loop {
        let ready: Vec<String> = jobs
            .values()
            .filter(|j| !done.contains(&j.name) && j.needs.iter().all(|n| done.contains(n)))
            .map(|j| j.name.clone())
            .collect();
        if ready.is_empty() {
            break;
        }
        for n in ready {
            done.insert(n.clone());
            order.push(n);
        }
    }
    if order.len() == jobs.len() {
        return Ok(order);
    }
    // Walk `needs` among the remaining jobs until a job repeats: that is the cycle.
    let start = jobs
        .keys()
        .find(|n| !done.contains(*n))
        .expect("some job is left");
    let mut path = vec![start.clone()];
    let mut current = start.clone();
    loop {
        let next = jobs[&current]
            .needs
            .iter()
            .find(|n| !done.contains(*n))
            .expect("a left job needs a left job")
            .clone();
        if let Some(pos) = path.iter().position(|p| *p == next) {
            let mut cycle: Vec<String> = path[pos..].to_vec();
            cycle.push(next);
            return Err(PipelineError(format!(
                "`needs` form a cycle: {}",
                cycle.join(" -> ")
            )));
        }
        path.push(next.clone());
        current = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
policy:
  quorum: 3
jobs:
  test:
    needs: [build]
    script: ["make check"]
  build:
    script:
      - make
      - tar cf out.tar out
    artifacts: ["out.tar", "out/*"]
    timeout: 10m
    labels: {arch: x86_64}
"#;

    #[test]
    fn parses_and_orders_jobs() {
        let p = Pipeline::parse(GOOD).unwrap();
        let names: Vec<_> = p.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["build", "test"]);
        let build = p.job("build").unwrap();
        assert_eq!(build.timeout_secs, 600);
        assert_eq!(
            build.policy,
            Policy {
                quorum: 3,
                trusted: 0
            }
        );
        assert_eq!(build.labels["arch"], "x86_64");
        assert_eq!(p.job("test").unwrap().timeout_secs, DEFAULT_TIMEOUT_SECS);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = Pipeline::parse("jobs:\n  build:\n    scripts: [make]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("scripts"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn syntax_error_is_reported() {
        let err = Pipeline::parse("jobs:\n  build: [unclosed\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(".quorum.yml"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn missing_script_is_refused() {
        let err = Pipeline::parse("jobs:\n  build:\n    artifacts: [a]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("job `build` has no `script`"), "{err}");
    }

    #[test]
    fn cycles_are_named() {
        let text = "jobs:\n  a: {script: [x], needs: [b]}\n  b: {script: [x], needs: [c]}\n  c: {script: [x], needs: [a]}\n  d: {script: [x]}\n";
        let err = Pipeline::parse(text).unwrap_err().to_string();
        assert!(err.contains("cycle: a -> b -> c -> a"), "{err}");
    }

    #[test]
    fn unknown_need_and_bad_policy() {
        let err = Pipeline::parse("jobs:\n  a: {script: [x], needs: [nope]}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs `nope`"), "{err}");
        let err = Pipeline::parse("policy: {quorum: 1, trusted: 2}\njobs:\n  a: {script: [x]}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot exceed"), "{err}");
        let err = Pipeline::parse("jobs:\n  a: {script: [x], timeout: 5d}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown unit"), "{err}");
        let err = Pipeline::parse("jobs:\n  a: {script: [x], artifacts: [../etc]}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be relative"), "{err}");
    }
}
