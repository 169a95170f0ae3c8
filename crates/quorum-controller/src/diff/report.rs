//! Renders an explained dispute as the text and HTML reports users read (`quorum diff`): who
//! produced what, then per differing path each group's entry and how the versions differ.

use quorum_api::v1::controller::{DIFF_TOOL_BUILTIN, DIFF_TOOL_DIFFOSCOPE};
use quorum_core::{Digest, ManifestEntry};

/// Workers that produced the same result.
#[derive(Debug)]
pub struct Group {
    /// `A`, `B`, ... for successful results (most workers first); `failed` for failures.
    pub label: String,
    pub manifest: Option<Digest>,
    pub workers: Vec<String>,
}

/// One differing path: each successful group's entry (`None`: the path is not in its result)
/// and each comparison with the first group.
#[derive(Debug)]
pub struct PathReport {
    pub path: String,
    pub entries: Vec<(String, Option<ManifestEntry>)>,
    pub pairs: Vec<Pair>,
}

#[derive(Debug)]
pub struct Pair {
    pub left: String,
    pub right: String,
    pub by: Explained,
}

#[derive(Debug)]
pub enum Explained {
    Diffoscope {
        text: String,
        html: String,
    },
    /// The built-in diff, and why diffoscope did not explain this pair.
    Builtin {
        text: String,
        why: String,
    },
    /// Nothing to compare, and why (missing on one side, too large, not fetched).
    Nothing(String),
}

#[derive(Debug)]
pub struct Dispute {
    pub build: String,
    pub job: String,
    pub round: i64,
    pub groups: Vec<Group>,
    /// Failed results: worker and reason.
    pub failures: Vec<(String, String)>,
    pub paths: Vec<PathReport>,
    /// Differing paths beyond the ones reported.
    pub omitted: usize,
}

impl Dispute {
    /// Diffoscope when it explained every pair of files present on both sides (and there was
    /// at least one), else the built-in diff.
    pub fn tool(&self) -> &'static str {
        let pairs: Vec<&Pair> = self
            .paths
            .iter()
            .flat_map(|p| &p.pairs)
            .filter(|p| !matches!(p.by, Explained::Nothing(_)))
            .collect();
        if !pairs.is_empty()
            && pairs
                .iter()
                .all(|p| matches!(p.by, Explained::Diffoscope { .. }))
        {
            DIFF_TOOL_DIFFOSCOPE
        } else {
            DIFF_TOOL_BUILTIN
        }
    }

    pub fn text(&self) -> String {
        let mut out = format!(
            "Dispute: job `{}` of build {} (round {}), explained by {}\n\nResults\n",
            self.job,
            self.build,
            self.round,
            self.tool()
        );
        for g in &self.groups {
            let digest = g.manifest.map(|d| d.to_string()).unwrap_or_default();
            out.push_str(&format!(
                "  {}  {digest}  from {}\n",
                g.label,
                g.workers.join(", ")
            ));
        }
        for (worker, reason) in &self.failures {
            out.push_str(&format!("  failed  from {worker}: {reason}\n"));
        }
        out.push_str(&format!(
            "\nDiffering paths: {}",
            self.paths.len() + self.omitted
        ));
        if self.omitted > 0 {
            out.push_str(&format!(" ({} not shown)", self.omitted));
        }
        out.push('\n');
        for p in &self.paths {
            out.push_str(&format!("\n== {}\n", p.path));
            for (label, entry) in &p.entries {
                out.push_str(&format!("  {label}  {}\n", describe(entry.as_ref())));
            }
            for pair in &p.pairs {
                let head = format!("-- {} vs {}", pair.left, pair.right);
                match &pair.by {
                    Explained::Diffoscope { text, .. } => {
                        out.push_str(&format!("{head}: diffoscope\n{text}"));
                    }
                    Explained::Builtin { text, why } => {
                        out.push_str(&format!("{head}: built-in diff ({why})\n{text}"));
                    }
                    Explained::Nothing(why) => out.push_str(&format!("{head}: {why}\n")),
                }
                if !out.ends_with('\n') {
                    out.push('\n');
                }
            }
        }
        out
    }

    pub fn html(&self) -> String {
        let mut out = format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">\
             <title>Dispute: {job} of build {build}</title>\
             <style>body{{font-family:sans-serif;margin:1em 2em}}\
             td,th{{padding:.1em .8em;text-align:left}}pre{{background:#f6f6f6;padding:.5em;overflow:auto}}\
             iframe{{width:100%;height:32em;border:1px solid #ccc}}</style></head><body>\n\
             <h1>Dispute: job <code>{job}</code> of build <code>{build}</code> (round {round})</h1>\n\
             <p>Explained by {tool}.</p>\n<h2>Results</h2>\n<table>\n",
            job = esc(&self.job),
            build = esc(&self.build),
            round = self.round,
            tool = self.tool(),
        );
        for g in &self.groups {
            let digest = g.manifest.map(|d| d.to_string()).unwrap_or_default();
            out.push_str(&format!(
                "<tr><th>{}</th><td><code>{}</code></td><td>{}</td></tr>\n",
                esc(&g.label),
                esc(&digest),
                esc(&g.workers.join(", "))
            ));
        }
        for (worker, reason) in &self.failures {
            out.push_str(&format!(
                "<tr><th>failed</th><td>{}</td><td>{}</td></tr>\n",
                esc(reason),
                esc(worker)
            ));
        }
        out.push_str(&format!(
            "</table>\n<h2>Differing paths: {}{}</h2>\n",
            self.paths.len() + self.omitted,
            if self.omitted > 0 {
                format!(" ({} not shown)", self.omitted)
            } else {
                String::new()
            }
        ));
        for p in &self.paths {
            out.push_str(&format!(
                "<h3><code>{}</code></h3>\n<table>\n",
                esc(&p.path)
            ));
            for (label, entry) in &p.entries {
                out.push_str(&format!(
                    "<tr><th>{}</th><td>{}</td></tr>\n",
                    esc(label),
                    esc(&describe(entry.as_ref()))
                ));
            }
            out.push_str("</table>\n");
            for pair in &p.pairs {
                let head = format!("{} vs {}", esc(&pair.left), esc(&pair.right));
                match &pair.by {
                    // diffoscope's page is a document of its own: shown in a frame that may
                    // not run scripts (it renders content taken from the workers' files).
                    Explained::Diffoscope { html, .. } => out.push_str(&format!(
                        "<h4>{head}: diffoscope</h4>\n<iframe sandbox srcdoc=\"{}\"></iframe>\n",
                        esc(html)
                    )),
                    Explained::Builtin { text, why } => out.push_str(&format!(
                        "<h4>{head}: built-in diff ({})</h4>\n<pre>{}</pre>\n",
                        esc(why),
                        esc(text)
                    )),
                    Explained::Nothing(why) => {
                        out.push_str(&format!("<h4>{head}: {}</h4>\n", esc(why)))
                    }
                }
            }
        }
        out.push_str("</body></html>\n");
        out
    }
}

fn describe(entry: Option<&ManifestEntry>) -> String {
    match entry {
        Some(e) => format!("{} bytes  mode {:o}  {}", e.size, e.mode, e.digest),
        None => "missing (not in this result)".into(),
    }
}

/// Escapes text for HTML content and double-quoted attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
