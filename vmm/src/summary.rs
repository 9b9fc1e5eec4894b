//! Human summaries of a run's figures.
#![deny(unsafe_code)]

use std::fmt;

use crate::vm::RunReport;

/// What the `touch` workload found, across vCPUs.
#[derive(Debug, Clone)]
pub struct TouchSummary {
    /// vCPUs that finished the workload.
    pub vcpus_done: usize,
    /// Pages touched.
    pub pages: u64,
    /// Pages with wrong contents on verification.
    pub verify_errors: u64,
    /// Faults the VMM serviced.
    pub faults: u64,
    /// Pages the VMM populated.
    pub pages_populated: u64,
    /// Touch latency percentiles in ns (p50, p99, p99.9, max), if the TSC rate is known.
    pub latency_ns: Option<[u64; 4]>,
    /// The fault mode.
    pub fault_mode: &'static str,
    /// The workload (`touch`, `race`, `xadd`).
    pub label: &'static str,
    /// Populates that found the page already present (another vCPU won the race).
    pub populate_races: u64,
}

/// The `q`-quantile of a bucketed histogram, as the bucket's lower bound (in cycles).
pub fn hist_quantile(hist: &[u64], q: f64) -> u64 {
    let n: u64 = hist.iter().sum();
    if n == 0 {
        return 0;
    }
    let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
    let mut seen = 0;
    for (b, &c) in hist.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return abi::hist_bucket_low(b);
        }
    }
    0
}

/// The run's touch latencies in ns (p50, p99, p99.9, max; bucket lower bounds), if the guest
/// timed any and the TSC rate is known.
fn touch_latency_ns(r: &RunReport) -> Option<[u64; 4]> {
    let h = &r.touch_histogram;
    (r.tsc_khz > 0 && h.iter().any(|&c| c > 0)).then(|| {
        let to_ns = |cycles: u64| cycles.saturating_mul(1_000_000) / u64::from(r.tsc_khz);
        let max_b = h.iter().rposition(|&c| c > 0).unwrap_or(0);
        [
            to_ns(hist_quantile(h, 0.5)),
            to_ns(hist_quantile(h, 0.99)),
            to_ns(hist_quantile(h, 0.999)),
            to_ns(abi::hist_bucket_low(max_b)),
        ]
    })
}

impl TouchSummary {
    /// Summarises a finished run.
    pub fn new(r: &RunReport, label: &'static str) -> Self {
        let done: Vec<_> = r.results.iter().filter(|x| x.done != 0).collect();
        let latency_ns = touch_latency_ns(r);
        Self {
            vcpus_done: done.len(),
            // `touch` slices are disjoint; `race` and `xadd` share the same pages.
            pages: if label == "touch" {
                done.iter().map(|x| x.pages).sum()
            } else {
                done.iter().map(|x| x.pages).max().unwrap_or(0)
            },
            verify_errors: done.iter().map(|x| x.verify_errors).sum(),
            faults: r.counters.faults,
            pages_populated: r.counters.pages_populated,
            latency_ns,
            fault_mode: r.fault_mode.name(),
            label,
            populate_races: r.counters.populate_races,
        }
    }
}

impl fmt::Display for TouchSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.label == "xadd" {
            "lost updates"
        } else {
            "pages wrong"
        };
        write!(
            f,
            "{}: {} vCPUs touched {} pages ({} mode): {} faults serviced, {} pages populated by the VMM, {} populate races, verify {}",
            self.label,
            self.vcpus_done,
            self.pages,
            self.fault_mode,
            self.faults,
            self.pages_populated,
            self.populate_races,
            if self.verify_errors == 0 {
                "ok (0 errors)".to_string()
            } else {
                format!("FAILED ({} {what})", self.verify_errors)
            }
        )?;
        if let Some([p50, p99, p999, max]) = self.latency_ns {
            write!(
                f,
                "; first-touch latency p50 {p50} ns, p99 {p99} ns, p99.9 {p999} ns, max {max} ns (guest rdtsc, bucket lower bounds)"
            )?;
        }
        Ok(())
    }
}

/// What a restore did: when the guest resumed and had its working set, what it cost.
#[derive(Debug, Clone)]
pub struct RestoreSummary {
    /// Process start to the first guest instruction.
    pub resumed_ms: f64,
    /// Process start to every vCPU's first pass after the restore being done (the `pattern`
    /// guest's mark), if all got there.
    pub ws_resident_ms: Option<f64>,
    /// Pages served from the snapshot, and pages it still held at the end (lazy modes).
    pub served: Option<(u64, u64)>,
    /// Pages the VMM populated (from the snapshot, zero-filled or prefetched).
    pub pages_populated: u64,
    /// Pages the restored `pattern` guest reads per pass, all vCPUs.
    pub pages_touched: u64,
    /// First-read latency of each page in the first pass after the restore (guest rdtsc):
    /// p50, p99, max in ns.
    pub latency_ns: Option<[u64; 3]>,
    /// `--prefetch ws`: pages the prefetcher populated, and process start to its end.
    pub prefetched: Option<(u64, f64)>,
    /// The working set recorded for the next restore (runs, pages), or why it was not.
    pub ws_recorded: Option<Result<(u64, u64), String>>,
    /// The process's RSS at the end of the run.
    pub rss_bytes: u64,
    /// The process's RSS when the vCPUs resumed.
    pub rss_at_resume_bytes: u64,
}

impl RestoreSummary {
    /// Summarises a restored run that resumed `resumed` after process start; `ws_pages`: the
    /// `--pages` the restored guest verified per vCPU (0: all).
    pub fn new(r: &RunReport, resumed: std::time::Duration, ws_pages: u64) -> Self {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let marks: Option<Vec<_>> = r.marks.iter().copied().collect();
        let latency_ns = touch_latency_ns(r).map(|[p50, p99, _, max]| [p50, p99, max]);
        RestoreSummary {
            resumed_ms: ms(resumed),
            ws_resident_ms: marks
                .filter(|m| !m.is_empty())
                .and_then(|m| m.into_iter().max())
                .map(ms),
            served: r.restore_pages,
            pages_populated: r.counters.pages_populated,
            pages_touched: r
                .results
                .iter()
                .map(|x| match ws_pages {
                    0 => x.pages,
                    n => n.min(x.pages),
                })
                .sum(),
            latency_ns,
            prefetched: r.prefetched.map(|(p, at)| (p, ms(at))),
            ws_recorded: r.ws_recorded.clone(),
            rss_bytes: r.rss_bytes,
            rss_at_resume_bytes: r.rss_at_start_bytes,
        }
    }

    /// The figures as JSON (`vmm run --json`, `"restore"`).
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "resumed_ms": self.resumed_ms,
            "ws_resident_ms": self.ws_resident_ms,
            "pages_served": self.served.map(|s| s.0),
            "pages_never_touched": self.served.map(|s| s.1),
            "pages_populated": self.pages_populated,
            "pages_touched": self.pages_touched,
            "first_touch_ns": self.latency_ns.map(|[p50, p99, max]| serde_json::json!(
                {"p50": p50, "p99": p99, "max": max})),
            "prefetched_pages": self.prefetched.map(|p| p.0),
            "prefetch_done_ms": self.prefetched.map(|p| p.1),
            "ws_recorded_runs": self.ws_recorded.as_ref().and_then(|w| w.as_ref().ok()).map(|w| w.0),
            "ws_recorded_pages": self.ws_recorded.as_ref().and_then(|w| w.as_ref().ok()).map(|w| w.1),
            "rss_bytes": self.rss_bytes,
            "rss_at_resume_bytes": self.rss_at_resume_bytes,
        })
    }
}

impl fmt::Display for RestoreSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restore: vCPUs resumed {:.2} ms after process start",
            self.resumed_ms
        )?;
        if let Some((served, left)) = self.served {
            write!(
                f,
                "; {served} pages served from the snapshot, {left} never touched"
            )?;
        }
        if let Some(t) = self.ws_resident_ms {
            write!(
                f,
                "; working set ({} pages) resident {t:.2} ms after process start",
                self.pages_touched
            )?;
        }
        if let Some((p, t)) = self.prefetched {
            write!(f, "; prefetched {p} pages, done after {t:.2} ms")?;
        }
        if let Some([p50, p99, _]) = self.latency_ns {
            write!(f, "; first-touch p50 {p50} ns, p99 {p99} ns")?;
        }
        write!(
            f,
            "; {} pages populated; RSS {:.1} MiB ({:.1} MiB when the vCPUs resumed)",
            self.pages_populated,
            self.rss_bytes as f64 / (1u64 << 20) as f64,
            self.rss_at_resume_bytes as f64 / (1u64 << 20) as f64
        )?;
        match &self.ws_recorded {
            Some(Ok((runs, pages))) => {
                let s = if *runs == 1 { "" } else { "s" };
                write!(f, "; working set recorded: {pages} pages in {runs} run{s}")?
            }
            Some(Err(e)) => write!(f, "; working set not recorded: {e}")?,
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_buckets() {
        let mut h = vec![0u64; abi::HIST_BUCKETS];
        h[abi::hist_bucket(100)] = 90;
        h[abi::hist_bucket(10_000)] = 10;
        assert_eq!(
            hist_quantile(&h, 0.5),
            abi::hist_bucket_low(abi::hist_bucket(100))
        );
        assert_eq!(
            hist_quantile(&h, 0.99),
            abi::hist_bucket_low(abi::hist_bucket(10_000))
        );
        assert_eq!(hist_quantile(&[0; 4], 0.5), 0);
    }
}
