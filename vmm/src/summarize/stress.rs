//! The table of `vmm stress --json` reports: repeats of a configuration grouped, best and
//! median first touches per second, latency percentiles, exits per page, churn achieved, grace
//! periods, and the target ratios between configurations; and their bar chart.
#![deny(unsafe_code)]

use crate::stress::report::{self, StressReport};
use crate::stress::svg;

/// The Markdown table and the target ratios of `reports`, and with `plot` their bar chart
/// (median first touches per second per configuration, the best marked).
pub fn summarize(
    reports: &[StressReport],
    plot: Option<&std::path::Path>,
) -> Result<String, String> {
    let groups = group(reports);
    let out = markdown(&groups);
    if let Some(p) = plot {
        let bars: Vec<svg::Bar> = groups
            .iter()
            .map(|g| svg::Bar {
                label: g.label(),
                value: g.median(|r| r.faults_per_sec),
                mark: Some(g.best(|r| r.faults_per_sec)),
                group: match g.key.0.as_str() {
                    "vcpu" if g.key.1 != "1" => 3,
                    "vcpu" => 0,
                    "handler" => 1,
                    _ => 2,
                },
            })
            .collect();
        let subtitle = format!(
            "{} configurations, {} runs of vmm stress",
            groups.len(),
            reports.len()
        );
        let s = svg::bars_svg(
            &bars,
            "vmm stress: first touches per second",
            &subtitle,
            "faults/s",
        );
        std::fs::write(p, s)
            .map_err(|e| format!("--plot {}: cannot write it: {e}", p.display()))?;
    }
    Ok(out)
}

/// (fault mode, `+thp` appended with `--thp`; fault-around; address space; vCPUs; churn
/// rate; pattern).
type Key = (String, String, String, u32, u64, String);

/// Repeats of one configuration.
pub struct Group {
    key: Key,
    reports: Vec<StressReport>,
}

impl Group {
    fn label(&self) -> String {
        let (mode, fa, aspace, vcpus, churn, pattern) = &self.key;
        let fa = if fa != "1" && fa != "-" {
            format!(" fa{fa}")
        } else {
            String::new()
        };
        let pattern = if pattern != "sequential" {
            format!(" {pattern}")
        } else {
            String::new()
        };
        format!("{mode}{fa}{pattern} {aspace} {vcpus}v churn {churn}")
    }

    fn values(&self, f: impl Fn(&StressReport) -> f64) -> Vec<f64> {
        let mut v: Vec<f64> = self.reports.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    fn median(&self, f: impl Fn(&StressReport) -> f64) -> f64 {
        let v = self.values(f);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    fn best(&self, f: impl Fn(&StressReport) -> f64) -> f64 {
        self.values(f).last().copied().unwrap_or(0.0)
    }
}

fn group(reports: &[StressReport]) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for r in reports {
        let mut mode = r.fault_mode.clone();
        if r.thp {
            mode.push_str("+thp");
        }
        if r.uffd_always_wake && mode == "handler" {
            mode.push_str("-always-wake");
        }
        if r.floor {
            mode.push_str("-floor");
        }
        // Configurations that change what a run measures, when not the default: each its
        // own row (reports from before these flags have the defaults).
        if !r.ram_backing.is_empty() && r.ram_backing != "anon" {
            mode.push_str(&format!("+{}", r.ram_backing));
        }
        if r.churn_rate > 0 && !r.churn_populate {
            mode.push_str("+unpopulated-churn");
        }
        if r.churn_batch > 1 {
            mode.push_str(&format!("+churn-batch-{}", r.churn_batch));
        }
        if !r.churn_kinds.is_empty() && r.churn_kinds.len() < 4 {
            mode.push_str(&format!("+churn-ops-{}", r.churn_kinds.join("-")));
        }
        let key: Key = (
            mode,
            // The kernel's faults know no fault-around of ours.
            if r.fault_mode == "kernel" {
                "-".to_owned()
            } else {
                r.fault_around.to_string()
            },
            r.address_space.clone(),
            r.vcpus,
            r.churn_rate,
            r.pattern.clone(),
        );
        match out.iter_mut().find(|g| g.key == key) {
            Some(g) => g.reports.push(r.clone()),
            None => out.push(Group {
                key,
                reports: vec![r.clone()],
            }),
        }
    }
    out
}

fn find<'a>(
    groups: &'a [Group],
    mode: &str,
    fa: &str,
    aspace: &str,
    vcpus: u32,
    churn: u64,
) -> Option<&'a Group> {
    find_pattern(groups, mode, fa, aspace, vcpus, churn, "sequential")
}

fn find_pattern<'a>(
    groups: &'a [Group],
    mode: &str,
    fa: &str,
    aspace: &str,
    vcpus: u32,
    churn: u64,
    pattern: &str,
) -> Option<&'a Group> {
    groups.iter().find(|g| {
        g.key.0 == mode
            && g.key.1 == fa
            && g.key.2 == aspace
            && g.key.3 == vcpus
            && g.key.4 == churn
            && g.key.5 == pattern
    })
}

/// The Markdown table and the target ratios.
pub fn markdown(groups: &[Group]) -> String {
    let mut s = String::new();
    s.push_str("| fault mode | pattern | address space | vCPUs | churn ops/s | runs | faults/s best | faults/s median | p50 | p99 | p99.9 | exits/page | overfetch | churn ops/s done | grace periods | GP p99 | verify errors |\n");
    s.push_str(
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for g in groups {
        let (mode, fa, aspace, vcpus, churn, pattern) = &g.key;
        let mode = if fa != "1" && fa != "-" {
            format!("{mode} (fault-around {fa})")
        } else {
            mode.clone()
        };
        let overfetch = if g.reports.iter().all(|r| r.overfetch.is_some()) {
            format!("{:.3}", g.median(|r| r.overfetch.unwrap_or(0.0)))
        } else {
            "n/a".to_owned()
        };
        let _ = std::fmt::Write::write_fmt(
            &mut s,
            format_args!(
                "| {mode} | {pattern} | {aspace} | {vcpus} | {churn} | {} | {:.0} | {:.0} | {} | {} | {} | {:.2} | {overfetch} | {:.0} | {:.0} | {} | {} |\n",
                g.reports.len(),
                g.best(|r| r.faults_per_sec),
                g.median(|r| r.faults_per_sec),
                report::fmt_ns(g.median(|r| r.fault_latency_ns.p50 as f64) as u64),
                report::fmt_ns(g.median(|r| r.fault_latency_ns.p99 as f64) as u64),
                report::fmt_ns(g.median(|r| r.fault_latency_ns.p999 as f64) as u64),
                g.median(|r| if r.pages > 0 { r.exits as f64 / r.pages as f64 } else { 0.0 }),
                g.median(|r| r.churn.ops_per_sec),
                g.median(|r| r.grace_periods as f64),
                report::fmt_ns(g.median(|r| r.grace_period_ns.p99 as f64) as u64),
                g.reports.iter().map(|r| r.verify_errors).sum::<u64>(),
            ),
        );
    }
    s.push('\n');
    // Targets (2 vCPUs, medians).
    let fps = |g: Option<&Group>| g.map(|g| g.median(|r| r.faults_per_sec));
    // (what, numerator, denominator, goal, strictly greater)
    type Target<'a> = (&'a str, Option<f64>, Option<f64>, f64, bool);
    let best_fixed = |pattern: &str| {
        ["16", "64", "512"]
            .iter()
            .filter_map(|fa| fps(find_pattern(groups, "vcpu", fa, "bonsai", 2, 0, pattern)))
            .reduce(f64::max)
    };
    let adaptive = |pattern: &str| {
        fps(find_pattern(
            groups, "vcpu", "adaptive", "bonsai", 2, 0, pattern,
        ))
    };
    let fa1 = |pattern: &str| fps(find_pattern(groups, "vcpu", "1", "bonsai", 2, 0, pattern));
    let handler = |fa: &str| fps(find(groups, "handler", fa, "bonsai", 2, 0));
    let handler_old = |fa: &str| fps(find(groups, "handler-always-wake", fa, "bonsai", 2, 0));
    let thp_adaptive = |pattern: &str| {
        fps(find_pattern(
            groups, "vcpu+thp", "adaptive", "bonsai", 2, 0, pattern,
        ))
    };
    let targets: [Target; 21] = [
        (
            "sequential, fault-around 1: `vcpu` / the floor (`--floor`, report)",
            fa1("sequential"),
            fps(find_pattern(
                groups,
                "vcpu-floor",
                "1",
                "bonsai",
                2,
                0,
                "sequential",
            )),
            0.0,
            false,
        ),
        (
            "sequential: adaptive / best fixed of 16, 64, 512 (vcpu)",
            adaptive("sequential"),
            best_fixed("sequential"),
            1.0,
            false,
        ),
        (
            "sequential: adaptive (vcpu) / `kernel` (4 KiB pages)",
            adaptive("sequential"),
            fps(find(groups, "kernel", "-", "bonsai", 2, 0)),
            3.0,
            false,
        ),
        (
            "sequential: adaptive (vcpu) / `kernel` + THP (report)",
            adaptive("sequential"),
            fps(find(groups, "kernel+thp", "-", "bonsai", 2, 0)),
            0.0,
            false,
        ),
        (
            "sequential: adaptive with `--thp` (huge-page fills) / `kernel` (4 KiB pages, report)",
            thp_adaptive("sequential"),
            fps(find(groups, "kernel", "-", "bonsai", 2, 0)),
            0.0,
            false,
        ),
        (
            "sequential: adaptive with `--thp` / `kernel` + THP (report)",
            thp_adaptive("sequential"),
            fps(find(groups, "kernel+thp", "-", "bonsai", 2, 0)),
            0.0,
            false,
        ),
        (
            "sequential: adaptive with `--thp` / without (vcpu, report)",
            thp_adaptive("sequential"),
            adaptive("sequential"),
            0.0,
            false,
        ),
        (
            "random: adaptive with `--thp` / without (vcpu, report)",
            thp_adaptive("random"),
            adaptive("random"),
            0.0,
            false,
        ),
        (
            "stride:2: adaptive with `--thp` / without (vcpu, report)",
            thp_adaptive("stride:2"),
            adaptive("stride:2"),
            0.0,
            false,
        ),
        (
            "handler, adaptive: with `--thp` / without (report)",
            fps(find(groups, "handler+thp", "adaptive", "bonsai", 2, 0)),
            handler("adaptive"),
            0.0,
            false,
        ),
        (
            "hotcold: adaptive / fault-around 1 (vcpu, report)",
            adaptive("hotcold"),
            fa1("hotcold"),
            0.0,
            false,
        ),
        (
            "random: adaptive / fault-around 1 (vcpu)",
            adaptive("random"),
            fa1("random"),
            0.95,
            false,
        ),
        (
            "stride:2: adaptive / fault-around 1 (vcpu)",
            adaptive("stride:2"),
            fa1("stride:2"),
            1.5,
            false,
        ),
        (
            "stride:16: adaptive / fault-around 1 (vcpu)",
            adaptive("stride:16"),
            fa1("stride:16"),
            1.5,
            false,
        ),
        (
            "handler, fault-around 1: no redundant wake / always wake",
            handler("1"),
            handler_old("1"),
            1.0,
            false,
        ),
        (
            "handler, adaptive: no redundant wake / always wake",
            handler("adaptive"),
            handler_old("adaptive"),
            1.0,
            false,
        ),
        (
            "`vcpu` / `kernel` (bonsai, no churn)",
            fps(find(groups, "vcpu", "1", "bonsai", 2, 0)),
            fps(find(groups, "kernel", "-", "bonsai", 2, 0)),
            0.8,
            false,
        ),
        (
            "`vcpu` / `handler` (bonsai, no churn)",
            fps(find(groups, "vcpu", "1", "bonsai", 2, 0)),
            fps(find(groups, "handler", "1", "bonsai", 2, 0)),
            2.5,
            false,
        ),
        (
            "`vcpu --fault-around 16` / `kernel` (bonsai, no churn)",
            fps(find(groups, "vcpu", "16", "bonsai", 2, 0)),
            fps(find(groups, "kernel", "-", "bonsai", 2, 0)),
            1.2,
            false,
        ),
        (
            "`bonsai` churn 1000 / `bonsai` no churn (vcpu)",
            fps(find(groups, "vcpu", "1", "bonsai", 2, 1000)),
            fps(find(groups, "vcpu", "1", "bonsai", 2, 0)),
            0.95,
            false,
        ),
        (
            "`bonsai` churn 10000 / `rwlock` churn 10000 (vcpu)",
            fps(find(groups, "vcpu", "1", "bonsai", 2, 10000)),
            fps(find(groups, "vcpu", "1", "rwlock", 2, 10000)),
            1.0,
            true,
        ),
    ];
    s.push_str("| target (2 vCPUs, medians) | measured | goal | met |\n|---|---:|---:|---|\n");
    for (name, a, b, goal, strict) in targets {
        match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => {
                let r = a / b;
                if goal == 0.0 {
                    // Reported, no goal.
                    let _ = std::fmt::Write::write_fmt(
                        &mut s,
                        format_args!("| {name} | {r:.2} | (report) | |\n"),
                    );
                    continue;
                }
                let met = if strict { r > goal } else { r >= goal };
                let _ = std::fmt::Write::write_fmt(
                    &mut s,
                    format_args!(
                        "| {name} | {r:.2} | {}{goal} | {} |\n",
                        if strict { "> " } else { ">= " },
                        if met { "yes" } else { "**no**" }
                    ),
                );
            }
            _ => {
                let _ = std::fmt::Write::write_fmt(
                    &mut s,
                    format_args!("| {name} | not measured | {goal} | |\n"),
                );
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_groups_and_computes_ratios() {
        let mk = |mode: &str, fa: u64, aspace: &str, churn: u64, fps: f64| StressReport {
            vcpus: 2,
            fault_mode: mode.into(),
            fault_around: report::FaultAroundField::Pages(fa),
            pattern: "sequential".into(),
            address_space: aspace.into(),
            churn_rate: churn,
            faults_per_sec: fps,
            pages: 10,
            exits: 10,
            ..Default::default()
        };
        let rs = vec![
            mk("vcpu", 1, "bonsai", 0, 100.0),
            mk("vcpu", 1, "bonsai", 0, 300.0),
            mk("vcpu", 1, "bonsai", 0, 200.0),
            mk("kernel", 1, "bonsai", 0, 100.0),
        ];
        let g = group(&rs);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].median(|r| r.faults_per_sec), 200.0);
        assert_eq!(g[0].best(|r| r.faults_per_sec), 300.0);
        let md = markdown(&g);
        assert!(
            md.contains("| vcpu | sequential | bonsai | 2 | 0 | 3 | 300 | 200 |"),
            "{md}"
        );
        assert!(
            md.contains("| `vcpu` / `kernel` (bonsai, no churn) | 2.00 | >= 0.8 | yes |"),
            "{md}"
        );
        assert!(md.contains("not measured"), "{md}");
    }

    /// Runs that batch their churn, leave out kinds of operation or do not populate are
    /// rows of their own, not repeats of the plain configuration.
    #[test]
    fn churn_variants_are_rows_of_their_own() {
        let mk = |batch: u64, kinds: &[&str], populate: bool| StressReport {
            vcpus: 2,
            fault_mode: "vcpu".into(),
            fault_around: report::FaultAroundField::Pages(1),
            pattern: "sequential".into(),
            address_space: "bonsai".into(),
            churn_rate: 10000,
            churn_batch: batch,
            churn_kinds: kinds.iter().map(|k| k.to_string()).collect(),
            churn_populate: populate,
            ram_backing: "anon".into(),
            faults_per_sec: 100.0,
            pages: 10,
            exits: 10,
            ..Default::default()
        };
        let all = ["map", "unmap", "split", "protect"];
        let rs = vec![
            mk(1, &all, true),
            mk(1, &all, true),
            mk(16, &all, true),
            mk(16, &["map", "unmap", "split"], true),
            mk(1, &all, false),
        ];
        let labels: Vec<String> = group(&rs).iter().map(|g| g.key.0.clone()).collect();
        assert_eq!(
            labels,
            [
                "vcpu",
                "vcpu+churn-batch-16",
                "vcpu+churn-batch-16+churn-ops-map-unmap-split",
                "vcpu+unpopulated-churn"
            ]
        );
    }
}
