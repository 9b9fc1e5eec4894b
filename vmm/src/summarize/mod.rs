//! `vmm summarize FILE.jsonl [--plot FILE.svg]`: Markdown tables from saved benchmark rows.
//!
//! The file holds one JSON object per line, of two kinds, in any mix:
//! - a `vmm stress --json` report ([`stress`]): repeats of a configuration are grouped, and the
//!   table gives each configuration's best and median first touches per second, latency
//!   percentiles and churn, then the target ratios between configurations;
//! - a restore-benchmark row, tagged `"bench":"restore"` ([`restore`], written by
//!   `scripts/restore-bench.sh`): medians per configuration and the restore targets.
//!
//! The stress table comes first, then the restore table. With `--plot FILE.svg` the stress
//! reports are drawn as bars into FILE.svg and the restore rows into one `FILE-SIZE.svg` per
//! guest size. Blank lines are skipped; any other line that is neither kind is an error that
//! names the file and the line, and nothing is printed. `vmm stress --summarize FILE` is an
//! alias.
#![deny(unsafe_code)]

pub mod restore;
pub mod stress;

use std::path::{Path, PathBuf};

use clap::Args;

use crate::stress::report::StressReport;

/// `vmm summarize` flags.
#[derive(Args, Debug)]
pub struct SummarizeArgs {
    /// JSON lines: `vmm stress --json` reports and restore-benchmark rows
    /// (`"bench":"restore"`), one object per line.
    #[arg(value_name = "FILE.jsonl")]
    pub file: PathBuf,

    /// Also draw bar charts: the stress reports into this file, the restore rows into one
    /// FILE-SIZE.svg per guest size.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// The rows of a file, by kind, in file order.
#[derive(Debug, Default)]
pub struct Rows {
    /// `vmm stress --json` reports.
    pub stress: Vec<StressReport>,
    /// Restore-benchmark rows.
    pub restore: Vec<restore::Row>,
}

/// Parses JSON lines; an error names the (1-based) line and what is wrong with it.
pub fn parse(text: &str) -> Result<Rows, String> {
    let mut rows = Rows::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("line {n}: not JSON: {e}"))?;
        if restore::is_row(&v) {
            rows.restore.push(
                serde_json::from_value(v)
                    .map_err(|e| format!("line {n}: not a restore-benchmark row: {e}"))?,
            );
        } else {
            rows.stress.push(serde_json::from_value(v).map_err(|e| {
                format!(
                    "line {n}: neither a `vmm stress --json` report nor a restore-benchmark row \
                     (\"bench\":\"restore\"): {e}"
                )
            })?);
        }
    }
    Ok(rows)
}

/// The tables of `rows` (the stress table, also when there is no row at all; then the restore
/// table), drawing the plots at `plot`.
pub fn summarize(rows: &Rows, plot: Option<&Path>) -> Result<String, String> {
    let mut out = String::new();
    if !rows.stress.is_empty() || rows.restore.is_empty() {
        out.push_str(&stress::summarize(&rows.stress, plot)?);
    }
    if !rows.restore.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&restore::summarize(&rows.restore, plot)?);
    }
    Ok(out)
}

/// Reads `path` and returns its tables; errors name the file.
pub fn summarize_file(path: &Path, plot: Option<&Path>) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
    let rows = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    summarize(&rows, plot)
}

/// Prints the tables of `path` on stdout; returns the exit status (1 with one line on stderr,
/// after `prefix`, when the file cannot be read or a line is malformed).
pub fn run(path: &Path, plot: Option<&Path>, prefix: &str) -> u8 {
    match summarize_file(path, plot) {
        Ok(s) => {
            print!("{s}");
            0
        }
        Err(e) => {
            eprintln!("{prefix}: {e}");
            1
        }
    }
}

/// Runs `vmm summarize`; returns the exit status.
pub fn cmd_summarize(args: &SummarizeArgs) -> u8 {
    run(&args.file, args.plot.as_deref(), "vmm summarize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_sorted_by_kind_and_errors_name_the_line() {
        let stress = serde_json::to_string(&StressReport {
            vcpus: 2,
            fault_mode: "vcpu".into(),
            ..Default::default()
        })
        .unwrap();
        let restore = r#"{"bench":"restore","size":"64M","ws_percent":10,"mode":"vcpu","fault_around":"adaptive","prefetch":"none","status":0,"restore":{"resumed_ms":5.0,"ws_resident_ms":9.0,"pages_populated":10,"pages_touched":10,"first_touch_ns":null,"rss_bytes":0,"rss_at_resume_bytes":0}}"#;
        let rows = parse(&format!("{stress}\n\n{restore}\n{stress}\n")).unwrap();
        assert_eq!((rows.stress.len(), rows.restore.len()), (2, 1));
        let out = summarize(&rows, None).unwrap();
        let s = out.find("| fault mode |").unwrap();
        let r = out.find("| RAM |").unwrap();
        assert!(s < r, "{out}");
        assert!(
            out.contains("\n\n| RAM |"),
            "a blank line between the tables: {out}"
        );
        let e = parse(&format!("{stress}\n{{\"vcpus\":\n")).unwrap_err();
        assert!(e.starts_with("line 2: not JSON"), "{e}");
        let e = parse("{\"vcpus\":\"two\"}").unwrap_err();
        assert!(e.starts_with("line 1: neither"), "{e}");
        let e = parse("{\"bench\":\"restore\",\"size\":\"64M\"}").unwrap_err();
        assert!(e.starts_with("line 1: not a restore-benchmark row"), "{e}");
        // Only restore rows: no empty stress table before theirs.
        let out = summarize(&parse(restore).unwrap(), None).unwrap();
        assert!(out.starts_with("| RAM |"), "{out}");
    }
}
