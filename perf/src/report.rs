//! Latency outputs beside the table and the JSON line: the HDR percentile distribution as
//! `.hgrm` text (the format HdrHistogram's plotters read) and an SVG plot of one or more
//! distributions (latency against percentile, log scale of 1/(1-p), as HdrHistogram plots them).

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;

/// The `.hgrm` percentile distribution of a histogram of nanoseconds, in microseconds.
pub(crate) fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let inverse = if q < 1.0 {
            format!("{:>14.2}", 1.0 / (1.0 - q))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:>12.3} {:>14.12} {:>10} {inverse}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            v.count_since_last_iteration()
        );
    }
    let _ = write!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]\n",
        h.mean() / 1000.0,
        h.stdev() / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    );
    out
}

/// An SVG plot of percentile distributions (latency in µs against percentile).
pub(crate) fn svg(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 420.0;
    const LEFT: f64 = 70.0;
    const BOTTOM: f64 = 50.0;
    const TOP: f64 = 40.0;
    const RIGHT: f64 = 20.0;
    const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    // x: log10(1/(1-p)) from 0 (p50 is 0.3) to 5 (p99.999).
    let x_max = 5.0;
    let y_max = series
        .iter()
        .map(|(_, h)| h.value_at_quantile(0.99999) as f64 / 1000.0)
        .fold(1.0, f64::max)
        * 1.1;
    let px = |x: f64| LEFT + x / x_max * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - y / y_max * (H - BOTTOM - TOP);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>
"#,
        W / 2.0
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let x = px(i as f64);
        let _ = writeln!(
            out,
            r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            py(0.0),
            py(y_max),
            H - BOTTOM + 18.0
        );
    }
    for i in 0..=5 {
        let v = y_max / 5.0 * f64::from(i);
        let y = py(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text><text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">round-trip time (µs)</text>"#,
        px(x_max / 2.0),
        H - 10.0,
        H / 2.0,
        H / 2.0
    );
    for (i, (label, h)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = (0..=250)
            .map(|step| {
                let x = f64::from(step) / 50.0;
                let q = 1.0 - 10f64.powf(-x);
                let v = h.value_at_quantile(q) as f64 / 1000.0;
                format!("{:.1},{:.1}", px(x), py(v.min(y_max)))
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/><text x="{}" y="{}" fill="{color}">{label}</text>"#,
            points.join(" "),
            LEFT + 12.0,
            TOP + 16.0 + 16.0 * i as f64
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Writes a file, saying where.
pub(crate) fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
