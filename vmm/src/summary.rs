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

impl TouchSummary {
    /// Summarises a finished run.
    pub fn new(r: &RunReport, label: &'static str) -> Self {
        let done: Vec<_> = r.results.iter().filter(|x| x.done != 0).collect();
        let timed = r.touch_histogram.iter().any(|&c| c > 0);
        let latency_ns = (r.tsc_khz > 0 && timed).then(|| {
            let to_ns = |cycles: u64| cycles.saturating_mul(1_000_000) / u64::from(r.tsc_khz);
            let max_b = r.touch_histogram.iter().rposition(|&c| c > 0).unwrap_or(0);
            [
                to_ns(hist_quantile(&r.touch_histogram, 0.5)),
                to_ns(hist_quantile(&r.touch_histogram, 0.99)),
                to_ns(hist_quantile(&r.touch_histogram, 0.999)),
                to_ns(abi::hist_bucket_low(max_b)),
            ]
        });
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
