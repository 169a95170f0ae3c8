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

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    #[serde(default)]
    policy: Option<RawPolicy>,
    jobs: BTreeMap<String, RawJob>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    policy: Option<RawPolicy>,
    #[serde(default)]
    inputs: Vec<Input>,
    /// Times a failed job (its workers agree it fails) is run again; disputes are not retried.
    #[serde(default)]
    retries: u32,
    /// An approval gate: the job waits for `quorum approve BUILD JOB` before it is scheduled.
    #[serde(default)]
    manual: bool,
    /// One job per combination of values, named `<job>-<value>...` in key order; `${{ matrix.KEY }}`
    /// in the script, artifacts and label values is replaced by the combination's value.
    #[serde(default)]
    matrix: BTreeMap<String, Vec<String>>,
    /// The job may start on its needs' provisional results (agreeing, but short of their policy);
    /// its own result stays provisional until they verify, and is discarded if they do not.
    #[serde(default)]
    provisional: bool,
}

/// A policy as written: [`Policy`] plus the most assignments a job may use per round and the
/// fraction of verified results a trusted worker rebuilds afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default = "default_quorum")]
    quorum: u32,
    #[serde(default)]
    trusted: u32,
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    spot_check: Option<f64>,
}

impl Default for RawPolicy {
    fn default() -> RawPolicy {
        RawPolicy {
            quorum: default_quorum(),
            trusted: 0,
            attempts: None,
            spot_check: None,
        }
    }
}

impl RawPolicy {
    fn policy(self) -> Policy {
        Policy {
            quorum: self.quorum,
            trusted: self.trusted,
        }
    }
}

/// One in a million: the unit of [`JobSpec::spot_check_ppm`].
pub const PPM: u32 = 1_000_000;

/// Most retries of a failed job, most matrix combinations of one job, most attempts per round.
pub const MAX_RETRIES: u32 = 10;
pub const MAX_MATRIX_JOBS: usize = 64;
pub const MAX_ATTEMPTS: u32 = 100;

/// A file a job declares it needs besides its source: the worker downloads it outside the
/// sandbox, checks it against the pinned digest, and mounts it read-only at `/inputs/<name>`.
/// Checked while parsing, so a bad entry is reported with its line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Input {
    /// The file's name under `/inputs`: 1 to 100 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
    pub name: String,
    /// Where to download it from: an `https://` or `http://` URL.
    pub url: String,
    pub sha256: crate::Digest,
}

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Input, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            name: String,
            url: String,
            sha256: String,
        }
        let raw = Raw::deserialize(d)?;
        let err = |m: String| serde::de::Error::custom(format!("input `{}`: {m}", raw.name));
        let name_ok = (1..=100).contains(&raw.name.len())
            && !raw.name.starts_with('.')
            && raw
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !name_ok {
            return Err(err(
                "the name must be 1 to 100 of A-Z a-z 0-9 . _ - and not start with `.`".into(),
            ));
        }
        if !(raw.url.starts_with("https://") || raw.url.starts_with("http://")) {
            return Err(err(format!(
                "url `{}` must start with https:// or http://",
                raw.url
            )));
        }
        let hex = raw.sha256.strip_prefix("sha256:").unwrap_or(&raw.sha256);
        let sha256 = format!("sha256:{hex}").parse().map_err(|_| {
            err(format!(
                "sha256 `{}` is not 64 lowercase hex digits",
                raw.sha256
            ))
        })?;
        Ok(Input {
            name: raw.name,
            url: raw.url,
            sha256,
        })
    }
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
    #[serde(default)]
    pub inputs: Vec<Input>,
    /// The most assignments one round of the job may use (refusals and lost leases count);
    /// `None`: three per required result, plus three.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub retries: u32,
    #[serde(default)]
    pub manual: bool,
    /// For a job expanded from a `matrix`: its combination of values.
    #[serde(default)]
    pub matrix: BTreeMap<String, String>,
    /// The policy's `spot_check` in parts per million: the chance that a verified result of this
    /// job is rebuilt afterwards by a trusted worker. Integral so specs compare exactly.
    #[serde(default)]
    pub spot_check_ppm: u32,
    /// The job accepts provisional inputs: it may start once each job it needs is verified or
    /// has agreeing results short of its policy; its own result stays provisional until then.
    #[serde(default)]
    pub provisional: bool,
}

impl JobSpec {
    /// The most assignments one round of this job may use.
    pub fn attempt_limit(&self) -> u32 {
        self.max_attempts.unwrap_or(self.policy.quorum * 3 + 3)
    }
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
        check_policy("policy", default_policy.policy())?;
        check_attempts(text, None, default_policy)?;
        spot_check_ppm(text, None, default_policy)?;
        if raw.jobs.is_empty() {
            return Err(PipelineError(
                "`jobs` is empty; define at least one job".into(),
            ));
        }
        let (raw_jobs, instances) = expand_matrices(text, raw.jobs)?;
        let mut jobs = BTreeMap::new();
        for ((name, matrix), job) in raw_jobs {
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
            let raw_policy = job.policy.unwrap_or(default_policy);
            let policy = raw_policy.policy();
            check_policy(&format!("job `{name}`: policy"), policy)?;
            check_attempts(text, Some(&name), raw_policy)?;
            let spot_check_ppm = spot_check_ppm(text, Some(&name), raw_policy)?;
            if job.provisional && job.needs.is_empty() {
                return Err(job_error(
                    text,
                    &name,
                    "`provisional: true` lets a job start on the unverified results of the jobs \
                     it `needs`, but it needs none"
                        .into(),
                ));
            }
            if job.retries > MAX_RETRIES {
                return Err(job_error(
                    text,
                    &name,
                    format!("`retries` is {}; at most {MAX_RETRIES}", job.retries),
                ));
            }
            let mut names: Vec<&str> = job.inputs.iter().map(|i| i.name.as_str()).collect();
            names.sort();
            if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                return Err(PipelineError(format!(
                    "job `{name}` declares the input `{}` twice",
                    w[0]
                )));
            }
            // A need naming a matrix job means every job expanded from it.
            let mut needs: Vec<String> = job
                .needs
                .iter()
                .flat_map(|n| instances.get(n).cloned().unwrap_or_else(|| vec![n.clone()]))
                .collect();
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
                    inputs: job.inputs,
                    max_attempts: raw_policy.attempts,
                    retries: job.retries,
                    manual: job.manual,
                    matrix,
                    spot_check_ppm,
                    provisional: job.provisional,
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

/// An error about job `name`, with the line its key is on when it can be found (for a job
/// expanded from a matrix, the line of the matrix job).
fn job_error(text: &str, name: &str, message: String) -> PipelineError {
    let line = std::iter::successors(Some(name), |n| n.rsplit_once('-').map(|(base, _)| base))
        .find_map(|n| job_line(text, n));
    match line {
        Some(line) => PipelineError(format!("line {line}: job `{name}`: {message}")),
        None => PipelineError(format!("job `{name}`: {message}")),
    }
}

/// The 1-based line of job `name`'s key under the top-level `jobs:` key.
fn job_line(text: &str, name: &str) -> Option<usize> {
    let mut in_jobs = false;
    for (i, line) in text.lines().enumerate() {
        let indented = line.starts_with([' ', '\t']);
        if !indented && !line.trim().is_empty() {
            in_jobs = line.trim_end() == "jobs:";
            continue;
        }
        let key = line.trim_start();
        let key = key
            .strip_prefix(name)
            .or_else(|| key.strip_prefix(&format!("\"{name}\"")))
            .or_else(|| key.strip_prefix(&format!("'{name}'")));
        if in_jobs && indented && key.is_some_and(|rest| rest.trim_start().starts_with(':')) {
            return Some(i + 1);
        }
    }
    None
}

fn check_attempts(text: &str, job: Option<&str>, p: RawPolicy) -> Result<(), PipelineError> {
    let Some(attempts) = p.attempts else {
        return Ok(());
    };
    if attempts >= p.quorum && attempts <= MAX_ATTEMPTS {
        return Ok(());
    }
    let message = format!(
        "policy `attempts` is {attempts}; it must be at least `quorum` ({}) and at most {MAX_ATTEMPTS}",
        p.quorum
    );
    Err(match job {
        Some(name) => job_error(text, name, message),
        None => PipelineError(message),
    })
}

/// The policy's `spot_check` fraction in parts per million; refused unless within 0 and 1.
fn spot_check_ppm(text: &str, job: Option<&str>, p: RawPolicy) -> Result<u32, PipelineError> {
    let Some(rate) = p.spot_check else {
        return Ok(0);
    };
    if (0.0..=1.0).contains(&rate) {
        return Ok((rate * f64::from(PPM)).round() as u32);
    }
    let message = format!(
        "policy `spot_check` is {rate}; it must be a fraction between 0 and 1 (0.1 has a trusted \
         worker rebuild one verified result in ten)"
    );
    Err(match job {
        Some(name) => job_error(text, name, message),
        None => PipelineError(message),
    })
}

/// The jobs keyed by (name, matrix values), each matrix job replaced by one job per
/// combination; and, for each matrix job, the names of the jobs it became.
#[allow(clippy::type_complexity)]
fn expand_matrices(
    text: &str,
    raw: BTreeMap<String, RawJob>,
) -> Result<
    (
        BTreeMap<(String, BTreeMap<String, String>), RawJob>,
        BTreeMap<String, Vec<String>>,
    ),
    PipelineError,
> {
    let mut out = BTreeMap::new();
    let mut instances = BTreeMap::new();
    for (name, job) in raw {
        if job.matrix.is_empty() {
            out.insert((name, BTreeMap::new()), job);
            continue;
        }
        let mut combos: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
        for (key, values) in &job.matrix {
            if values.is_empty() {
                return Err(job_error(
                    text,
                    &name,
                    format!("matrix `{key}` has no values"),
                ));
            }
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.insert(key.clone(), v.clone());
                        c
                    })
                })
                .collect();
            if combos.len() > MAX_MATRIX_JOBS {
                return Err(job_error(
                    text,
                    &name,
                    format!("the matrix makes more than {MAX_MATRIX_JOBS} jobs"),
                ));
            }
        }
        let mut names = Vec::new();
        for combo in combos {
            let instance = std::iter::once(name.as_str())
                .chain(combo.values().map(String::as_str))
                .collect::<Vec<_>>()
                .join("-");
            check_job_name(&instance)
                .map_err(|e| job_error(text, &name, format!("matrix job `{instance}`: {e}")))?;
            let sub = |s: &String| substitute(s, &combo).map_err(|e| job_error(text, &name, e));
            let mut expanded = job.clone();
            expanded.matrix = BTreeMap::new();
            expanded.script = job
                .script
                .as_ref()
                .map(|steps| steps.iter().map(sub).collect())
                .transpose()?;
            expanded.artifacts = job.artifacts.iter().map(sub).collect::<Result<_, _>>()?;
            expanded.labels = job
                .labels
                .iter()
                .map(|(k, v)| Ok((k.clone(), sub(v)?)))
                .collect::<Result<_, PipelineError>>()?;
            names.push(instance.clone());
            out.insert((instance, combo), expanded);
        }
        instances.insert(name, names);
    }
    // A plain job may carry the name of a matrix expansion made before or after it.
    let mut seen = BTreeSet::new();
    for (name, _) in out.keys() {
        if !seen.insert(name) {
            return Err(job_error(
                text,
                name,
                format!("matrix job `{name}` has the name of another job"),
            ));
        }
    }
    Ok((out, instances))
}

/// Replaces each `${{ matrix.KEY }}` in `s` by the combination's value for KEY.
fn substitute(s: &str, combo: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("`${{{{` without a closing `}}}}` in `{s}`"))?;
        let expr = after[..end].trim();
        let value = expr
            .strip_prefix("matrix.")
            .and_then(|k| combo.get(k))
            .ok_or_else(|| {
                format!(
                    "`${{{{ {expr} }}}}` names no matrix key; this job's keys are {}",
                    combo.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
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
    fn inputs_are_parsed_and_bad_ones_named_with_their_line() {
        let digest = "a".repeat(64);
        let text = format!(
            "jobs:\n  build:\n    script: [make]\n    inputs:\n      - name: zlib.tar.gz\n        \
             url: https://example.org/zlib.tar.gz\n        sha256: {digest}\n"
        );
        let p = Pipeline::parse(&text).unwrap();
        let input = &p.job("build").unwrap().inputs[0];
        assert_eq!(input.name, "zlib.tar.gz");
        assert_eq!(input.sha256.to_string(), format!("sha256:{digest}"));

        for (bad, says) in [
            (
                text.replace("zlib.tar.gz\n", "../x\n"),
                "input `../x`: the name",
            ),
            (
                text.replace("https://", "file://"),
                "must start with https://",
            ),
            (text.replace(&digest, "abc"), "sha256 `abc` is not 64"),
        ] {
            let err = Pipeline::parse(&bad).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
            assert!(err.contains("line 5"), "{err}");
        }
        let twice = text.clone() + &text[text.find("      - name").unwrap()..];
        let err = Pipeline::parse(&twice).unwrap_err().to_string();
        assert!(
            err.contains("declares the input `zlib.tar.gz` twice"),
            "{err}"
        );
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

    const MATRIX: &str = r#"
jobs:
  build:
    matrix:
      arch: [x86_64, aarch64]
      opt: ["0", "2"]
    script: ["make ARCH=${{ matrix.arch }} O=${{matrix.opt}}"]
    artifacts: ["out-${{ matrix.arch }}/*"]
    labels: {arch: "${{ matrix.arch }}"}
    retries: 2
    policy: {quorum: 2, attempts: 4}
  release:
    needs: [build]
    manual: true
    script: [publish]
"#;

    #[test]
    fn a_matrix_expands_into_one_job_per_combination_and_needs_follow() {
        let p = Pipeline::parse(MATRIX).unwrap();
        let names: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "build-aarch64-0",
                "build-aarch64-2",
                "build-x86_64-0",
                "build-x86_64-2",
                "release"
            ]
        );
        let b = p.job("build-x86_64-2").unwrap();
        assert_eq!(b.script, ["make ARCH=x86_64 O=2"]);
        assert_eq!(b.artifacts, ["out-x86_64/*"]);
        assert_eq!(b.labels["arch"], "x86_64");
        assert_eq!(b.matrix["opt"], "2");
        assert_eq!((b.retries, b.attempt_limit(), b.manual), (2, 4, false));
        let r = p.job("release").unwrap();
        assert_eq!(r.needs.len(), 4, "{:?}", r.needs);
        assert!(r.manual);
        assert_eq!(
            r.attempt_limit(),
            9,
            "three per required result, plus three"
        );
    }

    #[test]
    fn bad_new_fields_are_refused_with_their_line() {
        let unknown_key = MATRIX.replace("${{matrix.opt}}", "${{ matrix.cpu }}");
        let err = Pipeline::parse(&unknown_key).unwrap_err().to_string();
        assert!(err.contains("line 3: job `build`"), "{err}");
        assert!(err.contains("matrix.cpu"), "{err}");
        let err = Pipeline::parse(&MATRIX.replace("attempts: 4", "attempts: 1"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3: job `build-aarch64-0`: policy `attempts` is 1"),
            "{err}"
        );
        let err = Pipeline::parse(&MATRIX.replace("retries: 2", "retries: 11"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`retries` is 11; at most 10"), "{err}");
        let err = Pipeline::parse(&MATRIX.replace("[x86_64, aarch64]", "[]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("matrix `arch` has no values"), "{err}");
        let err = Pipeline::parse(&MATRIX.replace("[x86_64, aarch64]", "[\"a b\"]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("matrix job `build-a b-0`"), "{err}");
        let clash = format!("{MATRIX}  build-x86_64-0:\n    script: [x]\n");
        let err = Pipeline::parse(&clash).unwrap_err().to_string();
        assert!(err.contains("has the name of another job"), "{err}");
        let err = Pipeline::parse("jobs:\n  a: {script: [x], manual: yes-please}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2"),
            "serde's errors carry the line too: {err}"
        );
    }

    #[test]
    fn spot_checks_and_provisional_inputs_are_parsed_and_checked() {
        let text = "policy: {quorum: 2, spot_check: 0.1}\njobs:\n  build:\n    script: [make]\n  \
                    test:\n    needs: [build]\n    provisional: true\n    policy: {quorum: 1, spot_check: 1}\n    \
                    script: [check]\n";
        let p = Pipeline::parse(text).unwrap();
        let (build, test) = (p.job("build").unwrap(), p.job("test").unwrap());
        assert_eq!((build.spot_check_ppm, build.provisional), (100_000, false));
        assert_eq!((test.spot_check_ppm, test.provisional), (PPM, true));

        let err = Pipeline::parse(&text.replace("spot_check: 0.1", "spot_check: 1.5"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("policy `spot_check` is 1.5; it must be a fraction between 0 and 1"),
            "{err}"
        );
        let err = Pipeline::parse(&text.replace("spot_check: 1}", "spot_check: -0.5}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 5: job `test`: policy `spot_check` is -0.5"),
            "{err}"
        );
        let err = Pipeline::parse(&text.replace("    needs: [build]\n", ""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 5: job `test`: `provisional: true`") && err.contains("needs none"),
            "{err}"
        );
        let err = Pipeline::parse(&text.replace("provisional: true", "provisional: maybe"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 7"), "{err}");
    }

    #[test]
    fn specs_stored_before_these_fields_still_load() {
        let old = r#"{"name":"a","script":["x"],"artifacts":[],"needs":[],"timeout_secs":60,"labels":{},"policy":{"quorum":2,"trusted":0}}"#;
        let spec: JobSpec = serde_json::from_str(old).unwrap();
        assert_eq!(
            (spec.retries, spec.manual, spec.attempt_limit()),
            (0, false, 9)
        );
        assert_eq!((spec.spot_check_ppm, spec.provisional), (0, false));
    }
}
