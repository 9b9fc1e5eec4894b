//! Hand-written SVG plots (no plotting dependency): the fault-latency distribution, throughput
//! over time, and the bench matrix's bar chart. Plain SVG 1.1 that any browser opens.
#![deny(unsafe_code)]

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::report::fmt_ns;

const W: f64 = 900.0;
const H: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn header(out: &mut String, w: f64, h: f64, title: &str, subtitle: &str) {
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{x}" y="22" font-size="16" font-weight="bold" text-anchor="middle">{t}</text>
<text x="{x}" y="40" fill="#555" text-anchor="middle">{s}</text>
"##,
        x = w / 2.0,
        t = esc(title),
        s = esc(subtitle)
    );
}

/// A "nice" step for about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / n;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn fmt_count(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The distribution of first-touch latencies: a log-x histogram (10 bins per decade) with the
/// percentiles marked.
pub fn latency_svg(h: &Histogram<u64>, title: &str, subtitle: &str) -> String {
    let mut out = String::new();
    header(&mut out, W, H, title, subtitle);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    if h.is_empty() {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">no samples</text></svg>"#,
            W / 2.0,
            H / 2.0
        );
        return out;
    }
    let lo = (h.min().max(1) as f64).log10().floor();
    let hi = ((h.max().max(2) as f64).log10() + 0.05)
        .ceil()
        .max(lo + 1.0);
    let x_of = |ns: f64| LEFT + (ns.max(1.0).log10() - lo) / (hi - lo) * pw;
    // Bins of a tenth of a decade.
    let nbins = ((hi - lo) * 10.0).round() as usize;
    let mut bins = vec![0u64; nbins];
    for v in h.iter_recorded() {
        let x = (v.value_iterated_to().max(1) as f64).log10();
        let b = (((x - lo) * 10.0).floor() as usize).min(nbins - 1);
        bins[b] += v.count_at_value();
    }
    let total = h.len() as f64;
    let ymax = bins.iter().copied().max().unwrap_or(1) as f64 / total;
    let ystep = nice_step(ymax, 5.0);
    let ytop = (ymax / ystep).ceil() * ystep;
    let y_of = |frac: f64| TOP + ph - frac / ytop * ph;
    // Grid and axes.
    let mut t = 0.0;
    while t <= ytop + 1e-12 {
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{:.0}%</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y_of(t) + 4.0,
            t * 100.0,
            y = y_of(t)
        );
        t += ystep;
    }
    for d in lo as i64..=hi as i64 {
        let x = x_of(10f64.powi(d as i32));
        let _ = writeln!(
            out,
            r##"<line x1="{x}" x2="{x}" y1="{TOP}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 16.0,
            fmt_ns(10u64.pow(d as u32))
        );
    }
    for (b, &n) in bins.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let x0 = LEFT + b as f64 / nbins as f64 * pw;
        let x1 = LEFT + (b + 1) as f64 / nbins as f64 * pw;
        let y = y_of(n as f64 / total);
        let _ = writeln!(
            out,
            r##"<rect x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="#4a7bd0"><title>{n} faults</title></rect>"##,
            (x1 - x0 - 1.0).max(0.5),
            TOP + ph - y
        );
    }
    for (i, (name, q)) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0)]
        .iter()
        .enumerate()
    {
        let v = if *q >= 1.0 {
            h.max()
        } else {
            h.value_at_quantile(*q)
        };
        let x = x_of(v as f64);
        // Labels near the right edge go to the left of their line.
        let (lx, anchor) = if x > W - RIGHT - 120.0 {
            (x - 3.0, "end")
        } else {
            (x + 3.0, "start")
        };
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}" stroke="#d04a4a" stroke-dasharray="4 3"/><text x="{lx:.1}" y="{}" fill="#d04a4a" text-anchor="{anchor}">{name} {}</text>"##,
            TOP + ph,
            TOP + 14.0 + 14.0 * i as f64,
            fmt_ns(v)
        );
    }
    let _ = write!(
        out,
        r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{b}" stroke="black"/><line x1="{LEFT}" x2="{r}" y1="{b}" y2="{b}" stroke="black"/>
<text x="{cx}" y="{xl}" text-anchor="middle">first-touch latency (guest rdtsc, log scale)</text>
<text x="18" y="{cy}" text-anchor="middle" transform="rotate(-90 18 {cy})">share of first touches</text>
</svg>
"##,
        b = TOP + ph,
        r = LEFT + pw,
        cx = LEFT + pw / 2.0,
        xl = H - 18.0,
        cy = TOP + ph / 2.0
    );
    out
}

/// Pages first-touched per second over time: one line per run. `series[i]` holds
/// `(seconds since the command started, pages touched so far in run i)`.
pub fn throughput_svg(series: &[Vec<(f64, u64)>], title: &str, subtitle: &str) -> String {
    let mut out = String::new();
    header(&mut out, W, H, title, subtitle);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    // Rates between samples at least 50 ms apart.
    let lines: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            let mut pts = Vec::new();
            let mut last: Option<(f64, u64)> = None;
            for &(t, p) in s {
                match last {
                    None => last = Some((t, p)),
                    Some((t0, p0)) if t - t0 >= 0.05 => {
                        pts.push(((t + t0) / 2.0, p.saturating_sub(p0) as f64 / (t - t0)));
                        last = Some((t, p));
                    }
                    _ => {}
                }
            }
            pts
        })
        .collect();
    let tmax = series
        .iter()
        .flat_map(|s| s.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(0.1);
    let ymax = lines
        .iter()
        .flat_map(|l| l.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let ystep = nice_step(ymax, 5.0);
    let ytop = (ymax / ystep).ceil() * ystep;
    let xstep = nice_step(tmax, 8.0);
    let x_of = |t: f64| LEFT + t / tmax * pw;
    let y_of = |v: f64| TOP + ph - v / ytop * ph;
    let mut v = 0.0;
    while v <= ytop + 1e-9 {
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y_of(v) + 4.0,
            fmt_count(v),
            y = y_of(v)
        );
        v += ystep;
    }
    let mut t = 0.0;
    while t <= tmax + 1e-9 {
        let _ = writeln!(
            out,
            r##"<line x1="{x}" x2="{x}" y1="{TOP}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{t:.1}</text>"##,
            TOP + ph,
            TOP + ph + 16.0,
            x = x_of(t)
        );
        t += xstep;
    }
    for l in &lines {
        if l.is_empty() {
            continue;
        }
        let pts: Vec<String> = l
            .iter()
            .map(|&(t, v)| format!("{:.1},{:.1}", x_of(t), y_of(v)))
            .collect();
        let _ = writeln!(
            out,
            r##"<polyline fill="none" stroke="#4a7bd0" stroke-width="1.5" points="{}"/>"##,
            pts.join(" ")
        );
    }
    let _ = write!(
        out,
        r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{b}" stroke="black"/><line x1="{LEFT}" x2="{r}" y1="{b}" y2="{b}" stroke="black"/>
<text x="{cx}" y="{xl}" text-anchor="middle">seconds since start (each line is one run: a fresh VM)</text>
<text x="18" y="{cy}" text-anchor="middle" transform="rotate(-90 18 {cy})">pages first-touched per second</text>
</svg>
"##,
        b = TOP + ph,
        r = LEFT + pw,
        cx = LEFT + pw / 2.0,
        xl = H - 18.0,
        cy = TOP + ph / 2.0
    );
    out
}

/// One bar of [`bars_svg`].
#[derive(Clone, Debug)]
pub struct Bar {
    /// Label on the left.
    pub label: String,
    /// Bar length (e.g. the median).
    pub value: f64,
    /// A tick on the bar (e.g. the best), if any.
    pub mark: Option<f64>,
    /// Colour group (index into a small palette).
    pub group: usize,
}

/// Horizontal bars, one per configuration.
pub fn bars_svg(bars: &[Bar], title: &str, subtitle: &str, unit: &str) -> String {
    let left = 300.0;
    let row = 18.0;
    let h = TOP + BOTTOM + row * bars.len().max(1) as f64;
    let mut out = String::new();
    header(&mut out, W, h, title, subtitle);
    let pw = W - left - RIGHT - 40.0;
    let vmax = bars
        .iter()
        .map(|b| b.value.max(b.mark.unwrap_or(0.0)))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let step = nice_step(vmax, 6.0);
    let top = (vmax / step).ceil() * step;
    let x_of = |v: f64| left + v / top * pw;
    let bottom = TOP + row * bars.len() as f64;
    let mut v = 0.0;
    while v <= top + 1e-9 {
        let _ = writeln!(
            out,
            r##"<line x1="{x}" x2="{x}" y1="{TOP}" y2="{bottom}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
            bottom + 16.0,
            fmt_count(v),
            x = x_of(v)
        );
        v += step;
    }
    const PALETTE: [&str; 6] = [
        "#4a7bd0", "#d08a4a", "#5aa05a", "#a05aa0", "#888888", "#c04040",
    ];
    for (i, b) in bars.iter().enumerate() {
        let y = TOP + row * i as f64;
        let colour = PALETTE[b.group % PALETTE.len()];
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{left}" y="{}" width="{:.1}" height="{}" fill="{colour}"><title>{} {unit}</title></rect><text x="{:.1}" y="{}" fill="#333">{}</text>"##,
            left - 6.0,
            y + 13.0,
            esc(&b.label),
            y + 3.0,
            (x_of(b.value) - left).max(0.5),
            row - 5.0,
            b.value.round(),
            x_of(b.value.max(b.mark.unwrap_or(0.0))) + 4.0,
            y + 13.0,
            fmt_count(b.value)
        );
        if let Some(m) = b.mark {
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="black" stroke-width="2"/>"##,
                y + 1.0,
                y + row - 1.0,
                x = x_of(m)
            );
        }
    }
    let _ = write!(
        out,
        r##"<text x="{}" y="{}" text-anchor="middle">{} (bar: median; tick: best)</text>
</svg>
"##,
        left + pw / 2.0,
        h - 18.0,
        esc(unit)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_well_formed() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        h.auto(true);
        for v in [5_000u64, 6_000, 40_000, 3_000_000] {
            h.record_n(v, 10).unwrap();
        }
        let s = latency_svg(&h, "t <1>", "s");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("p99.9") && s.contains("t &lt;1&gt;"));
        let e = latency_svg(&Histogram::new(3).unwrap(), "t", "s");
        assert!(e.contains("no samples") && e.ends_with("</svg>"));
        let t = throughput_svg(&[vec![(0.0, 0), (0.1, 1000), (0.2, 3000)]], "t", "s");
        assert!(t.contains("<polyline") && t.trim_end().ends_with("</svg>"));
        let b = bars_svg(
            &[Bar {
                label: "vcpu bonsai".into(),
                value: 10.0,
                mark: Some(12.0),
                group: 0,
            }],
            "t",
            "s",
            "faults/s",
        );
        assert!(b.contains("vcpu bonsai") && b.trim_end().ends_with("</svg>"));
        assert_eq!(nice_step(100.0, 5.0), 20.0);
    }
}
