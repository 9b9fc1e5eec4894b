//! Statistics a domain keeps about itself, readable at any time without stopping anything.
#![deny(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Number of power-of-two latency buckets: bucket `i` holds durations in `[2^i, 2^(i+1))` ns.
const BUCKETS: usize = 64;

/// A lock-free log2 histogram of durations in nanoseconds.
///
/// Recording is one relaxed `fetch_add` per sample; it is only used on writer paths (grace
/// periods), never on the read side.
pub(crate) struct AtomicHistogram {
    buckets: [AtomicU64; BUCKETS],
    max_ns: AtomicU64,
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    pub(crate) fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            max_ns: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub(crate) fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        let bucket = (63 - ns.leading_zeros()) as usize;
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> LatencyHistogram {
        LatencyHistogram {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            max_ns: self.max_ns.load(Relaxed),
            sum_ns: self.sum_ns.load(Relaxed),
        }
    }
}

/// A snapshot of a latency distribution, in power-of-two nanosecond buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    buckets: [u64; BUCKETS],
    max_ns: u64,
    sum_ns: u64,
}

impl LatencyHistogram {
    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The largest sample, in nanoseconds (0 when empty).
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The mean sample, in nanoseconds (0 when empty).
    pub fn mean_ns(&self) -> u64 {
        self.sum_ns.checked_div(self.count()).unwrap_or(0)
    }

    /// An upper bound of the `q`-quantile (`q` in `0.0..=1.0`), in nanoseconds: the top of the
    /// power-of-two bucket the quantile falls in, capped at the maximum. 0 when empty.
    ///
    /// ```
    /// let d = rcu::Domain::new();
    /// d.synchronize();
    /// let h = d.stats().grace_period_latency;
    /// assert!(h.quantile_ns(0.5) <= h.max_ns());
    /// ```
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let n = self.count();
        if n == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let top = if i >= 63 { u64::MAX } else { (2u64 << i) - 1 };
                return top.min(self.max_ns);
            }
        }
        self.max_ns
    }
}

/// What a domain has done so far. Every field is read with relaxed loads, so a snapshot taken
/// while writers run is approximate but each counter is monotonic.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Grace periods completed (each `synchronize()` that had to wait for readers runs one;
    /// concurrent callers share them).
    pub grace_periods: u64,
    /// How long grace periods took, from the counter flip to the last reader seen quiescent.
    pub grace_period_latency: LatencyHistogram,
    /// `synchronize()` calls served, including those that shared another caller's grace period.
    pub synchronize_calls: u64,
    /// Objects and callbacks retired (`defer`, `defer_drop`, replaced cell values).
    pub retired: u64,
    /// Of those, how many have been freed (or run).
    pub freed: u64,
    /// Retired but not yet freed: the reclamation backlog.
    pub backlog: u64,
    /// Times a retiring thread hit the backlog bound and reclaimed itself (back-pressure).
    pub backpressure_stalls: u64,
    /// Reader handles currently registered.
    pub readers: u64,
    /// Deferred callbacks that panicked. The panic is contained where the callback ran (the
    /// rest of its batch still runs, and the thread that was draining carries on), reported
    /// by the panic hook as usual, and counted here.
    pub callback_panics: u64,
    /// Grace periods that waited longer than
    /// [`Config::stall_timeout`](crate::Config::stall_timeout) and issued a stall warning
    /// (once each).
    pub stalls: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_ordered_and_bounded() {
        let h = AtomicHistogram::new();
        for ns in [100u64, 200, 400, 800, 1_000_000] {
            h.record(Duration::from_nanos(ns));
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 5);
        assert_eq!(s.max_ns(), 1_000_000);
        let (p50, p99) = (s.quantile_ns(0.5), s.quantile_ns(0.99));
        assert!((400..800).contains(&p50), "p50 {p50}");
        assert!(p50 <= p99 && p99 <= s.max_ns());
        assert_eq!(s.mean_ns(), (100 + 200 + 400 + 800 + 1_000_000) / 5);
    }

    #[test]
    fn empty_histogram_is_zero() {
        let s = AtomicHistogram::new().snapshot();
        assert_eq!(
            (s.count(), s.quantile_ns(0.99), s.max_ns(), s.mean_ns()),
            (0, 0, 0, 0)
        );
    }
}
