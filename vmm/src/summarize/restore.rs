//! The table of restore-benchmark rows (`scripts/restore-bench.sh`): each row is a
//! `vmm run --restore --json` summary with the configuration it ran, tagged
//! `"bench":"restore"`. Repeats of a configuration are reduced to medians; the table, the
//! target ratios and one SVG of time-to-resident per guest size come out.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Deserialize;

use crate::stress::svg;

/// One restore run, as the benchmark script writes it.
#[derive(Clone, Debug, Deserialize)]
pub struct Row {
    /// Guest RAM (`--mem` of the snapshotted VM), e.g. `512M`.
    pub size: String,
    /// The restored guest's working set, in % of the pages it wrote.
    pub ws_percent: u64,
    /// `--restore-mode`.
    pub mode: String,
    /// `--fault-around` (`-` where it does not apply).
    pub fault_around: String,
    /// `--prefetch`.
    pub prefetch: String,
    /// `vmm run`'s exit status: 0 only if the guest verified every page.
    pub status: i64,
    /// The `"restore"` object of the summary.
    pub restore: Figures,
}

/// The restore figures of one run.
#[derive(Clone, Debug, Deserialize)]
pub struct Figures {
    /// Process start to the first guest instruction.
    pub resumed_ms: f64,
    /// Process start to the working set resident (every vCPU's first pass done).
    pub ws_resident_ms: Option<f64>,
    /// Pages the VMM populated.
    pub pages_populated: u64,
    /// Pages the guest read per pass.
    pub pages_touched: u64,
    /// First-read latency.
    pub first_touch_ns: Option<Latency>,
    /// RSS at the end.
    pub rss_bytes: u64,
    /// RSS when the vCPUs resumed.
    pub rss_at_resume_bytes: u64,
}

/// First-read latency percentiles (ns).
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
}

/// Whether the JSON object `v` is a restore-benchmark row (`"bench":"restore"`).
pub fn is_row(v: &serde_json::Value) -> bool {
    v.get("bench").and_then(|b| b.as_str()) == Some("restore")
}

/// (size in bytes, size, ws %, mode, fault-around, prefetch).
type Key = (u64, String, u64, String, String, String);

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians of one configuration's repeats.
#[derive(Clone, Debug)]
pub struct Config {
    /// Runs.
    pub runs: usize,
    /// Runs that did not exit 0 (a wrong word, or a failure).
    pub failed: usize,
    resumed_ms: f64,
    resident_ms: f64,
    p50_ns: f64,
    p99_ns: f64,
    overfetch: f64,
    rss_mib: f64,
    /// RSS at the end over (touched + 10 %).
    rss_ratio: f64,
    /// RSS growth after resuming over touched.
    growth_ratio: f64,
}

fn reduce(rows: &[&Row]) -> Config {
    let m = |f: &dyn Fn(&Row) -> Option<f64>| median(rows.iter().filter_map(|r| f(r)).collect());
    let touched = |r: &Row| (r.restore.pages_touched * 4096) as f64;
    Config {
        runs: rows.len(),
        failed: rows.iter().filter(|r| r.status != 0).count(),
        resumed_ms: m(&|r| Some(r.restore.resumed_ms)),
        resident_ms: m(&|r| r.restore.ws_resident_ms),
        p50_ns: m(&|r| r.restore.first_touch_ns.map(|l| l.p50 as f64)),
        p99_ns: m(&|r| r.restore.first_touch_ns.map(|l| l.p99 as f64)),
        overfetch: m(&|r| {
            (r.restore.pages_touched > 0 && r.mode != "kernel")
                .then(|| r.restore.pages_populated as f64 / r.restore.pages_touched as f64)
        }),
        rss_mib: m(&|r| Some(r.restore.rss_bytes as f64 / f64::from(1 << 20))),
        rss_ratio: m(&|r| Some(r.restore.rss_bytes as f64 / (touched(r) * 1.1))),
        growth_ratio: m(&|r| {
            Some(
                r.restore
                    .rss_bytes
                    .saturating_sub(r.restore.rss_at_resume_bytes) as f64
                    / touched(r),
            )
        }),
    }
}

fn fmt(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.digits$}")
    }
}

/// Prints the table and the targets, and writes one SVG per size at `plot` (its stem, then
/// `-SIZE.svg`).
pub fn summarize(rows: &[Row], plot: Option<&std::path::Path>) -> Result<String, String> {
    let mut groups: BTreeMap<Key, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        let bytes =
            crate::size::parse_size(&r.size).map_err(|e| format!("size {}: {e}", r.size))?;
        let mode_rank = ["vcpu", "handler", "kernel", "eager"]
            .iter()
            .position(|m| *m == r.mode)
            .unwrap_or(9);
        groups
            .entry((
                bytes,
                r.size.clone(),
                r.ws_percent,
                format!("{mode_rank}{}", r.mode),
                r.fault_around.clone(),
                r.prefetch.clone(),
            ))
            .or_default()
            .push(r);
    }
    let configs: Vec<(Key, Config)> = groups.iter().map(|(k, v)| (k.clone(), reduce(v))).collect();
    let mut out = String::new();
    out.push_str("| RAM | working set | mode | fault-around | prefetch | resumed (ms) | working set resident (ms) | first read p50 (ns) | p99 (ns) | fetched / touched | RSS (MiB) | RSS / (touched + 10 %) | RSS growth / touched | runs (failed) |\n");
    out.push_str("|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for ((_, size, ws, mode, fa, pf), c) in &configs {
        let _ = writeln!(
            out,
            "| {size} | {ws} % | {} | {fa} | {pf} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) |",
            &mode[1..],
            fmt(c.resumed_ms, 1),
            fmt(c.resident_ms, 1),
            fmt(c.p50_ns, 0),
            fmt(c.p99_ns, 0),
            fmt(c.overfetch, 2),
            fmt(c.rss_mib, 1),
            fmt(c.rss_ratio, 2),
            fmt(c.growth_ratio, 2),
            c.runs,
            c.failed
        );
    }
    let find = |bytes: u64, ws: u64, mode: &str, fa: &str, pf: &str| {
        configs
            .iter()
            .find(|(k, _)| k.0 == bytes && k.2 == ws && &k.3[1..] == mode && k.4 == fa && k.5 == pf)
            .map(|(_, c)| c)
    };
    let mut sizes: Vec<(u64, String)> = configs.iter().map(|(k, _)| (k.0, k.1.clone())).collect();
    sizes.dedup();
    out.push_str("\n| target | goal | measured |\n|---|---|---|\n");
    // A target row: `a`'s time to resident over `b`'s, where both were measured.
    let ratio_row =
        |out: &mut String, what: String, goal: &str, a: Option<&Config>, b: Option<&Config>| {
            if let (Some(a), Some(b)) = (a, b) {
                let _ = writeln!(
                    out,
                    "| {what} | {goal} | {:.2} ({} / {} ms) |",
                    a.resident_ms / b.resident_ms,
                    fmt(a.resident_ms, 1),
                    fmt(b.resident_ms, 1)
                );
            }
        };
    for (bytes, size) in &sizes {
        for ws in [10, 100] {
            let v = find(*bytes, ws, "vcpu", "adaptive", "none");
            let what = format!("{size}, {ws} % working set: time to resident");
            ratio_row(
                &mut out,
                format!("{what}, `vcpu` / `handler` (adaptive, no prefetch)"),
                "≤ 0.5",
                v,
                find(*bytes, ws, "handler", "adaptive", "none"),
            );
            // Against the handler as Firecracker's and Cloud Hypervisor's serve restores: a
            // page per fault, no fault-around. For comparison; the target is the row above.
            ratio_row(
                &mut out,
                format!("{what}, `vcpu` (adaptive) / `handler` a page per fault, as other VMMs' handlers serve"),
                "report",
                v,
                find(*bytes, ws, "handler", "1", "none"),
            );
        }
        ratio_row(
            &mut out,
            format!(
                "{size}, 10 % working set: time to resident, `vcpu` + `--prefetch ws` / `eager`"
            ),
            "≤ 0.5",
            find(*bytes, 10, "vcpu", "adaptive", "ws"),
            find(*bytes, 10, "eager", "-", "none"),
        );
    }
    if let Some((bytes, size)) = sizes.last() {
        let worst = configs
            .iter()
            .filter(|(k, _)| k.0 == *bytes && &k.3[1..] != "eager")
            .map(|(k, c)| (c.resumed_ms, format!("{} {} {}", &k.3[1..], k.4, k.5)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((ms, which)) = worst {
            let _ = writeln!(
                out,
                "| time to first guest instruction at {size}, any lazy mode (the slowest median) | ≤ 20 ms | {ms:.1} ms ({which}) |"
            );
        }
    }
    let failed: usize = configs.iter().map(|(_, c)| c.failed).sum();
    let runs: usize = configs.iter().map(|(_, c)| c.runs).sum();
    let _ = writeln!(
        out,
        "| runs with a wrong word or a failure | 0 | {failed} of {runs} |"
    );
    let over = configs.iter().filter(|(_, c)| c.rss_ratio > 1.0).count();
    let worst = configs
        .iter()
        .map(|(k, c)| {
            (
                c.rss_ratio,
                format!("{} {} % {} {} {}", k.1, k.2, &k.3[1..], k.4, k.5),
            )
        })
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let lazy_over = configs
        .iter()
        .filter(|(k, c)| &k.3[1..] != "eager" && c.growth_ratio > 1.1)
        .count();
    let _ = writeln!(
        out,
        "| RSS after restore ≤ touched + 10 % | every run | {over} of {} configurations over (worst {}); RSS growth after resuming over 1.1 × touched in {lazy_over} lazy configurations |",
        configs.len(),
        worst.map_or("-".into(), |(r, w)| format!("{r:.2}, {w}")),
    );
    if let Some(p) = plot {
        for (bytes, size) in &sizes {
            let bars: Vec<svg::Bar> = configs
                .iter()
                .filter(|(k, _)| k.0 == *bytes)
                .map(|(k, c)| svg::Bar {
                    label: format!("{} % {} fa {} prefetch {}", k.2, &k.3[1..], k.4, k.5),
                    value: c.resident_ms,
                    mark: Some(c.resumed_ms),
                    group: k.3.as_bytes()[0].saturating_sub(b'0') as usize,
                })
                .collect();
            let s = svg::bars_svg(
                &bars,
                &format!("restore of a {size} guest: time to resident working set"),
                "median ms from process start; tick: first guest instruction",
                "ms",
            );
            let stem = p.with_extension("");
            let path = std::path::PathBuf::from(format!("{}-{size}.svg", stem.display()));
            std::fs::write(&path, s)
                .map_err(|e| format!("--plot {}: cannot write it: {e}", path.display()))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mode: &str, fa: &str, pf: &str, resident: f64, status: i64) -> Row {
        serde_json::from_value(serde_json::json!({
            "bench": "restore", "size": "64M", "ws_percent": 10, "mode": mode,
            "fault_around": fa, "prefetch": pf, "status": status,
            "restore": {"resumed_ms": 5.0, "ws_resident_ms": resident, "pages_populated": 1100,
                        "pages_touched": 1000, "first_touch_ns": {"p50": 100, "p99": 9000},
                        "prefetched_pages": null, "rss_bytes": 8 << 20,
                        "rss_at_resume_bytes": 4 << 20}
        }))
        .unwrap()
    }

    #[test]
    fn medians_targets_and_failures() {
        let rows = vec![
            row("vcpu", "adaptive", "none", 10.0, 0),
            row("vcpu", "adaptive", "none", 30.0, 0),
            row("vcpu", "adaptive", "none", 20.0, 0),
            row("handler", "adaptive", "none", 50.0, 0),
            row("handler", "1", "none", 400.0, 0),
            row("vcpu", "adaptive", "ws", 8.0, 1),
            row("eager", "-", "none", 40.0, 0),
        ];
        assert!(is_row(&serde_json::json!({"bench": "restore"})));
        assert!(!is_row(&serde_json::json!({"vcpus": 2})));
        let out = summarize(&rows, None).unwrap();
        assert!(out.contains("| ≤ 0.5 | 0.40 (20.0 / 50.0 ms) |"), "{out}");
        assert!(
            out.contains("a page per fault, as other VMMs' handlers serve | report | 0.05 (20.0 / 400.0 ms) |"),
            "{out}"
        );
        assert!(out.contains("| ≤ 0.5 | 0.20 (8.0 / 40.0 ms) |"), "{out}");
        assert!(out.contains("| 0 | 1 of 7 |"), "{out}");
        // 8 MiB of RSS against 1000 touched pages (3.9 MiB) + 10 %: over in every row.
        assert!(
            out.contains("5 of 5 configurations over (worst 1.86, 64M 10 % eager - none)"),
            "{out}"
        );
        assert!(
            out.contains(
                "| 64M | 10 % | vcpu | adaptive | none | 5.0 | 20.0 | 100 | 9000 | 1.10 |"
            ),
            "{out}"
        );
    }
}
