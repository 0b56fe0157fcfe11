//! Percentiles and the markdown tables the bench targets print.

use std::fmt::Write as _;
use std::time::Duration;

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// One latency row: count and percentiles of a scenario's samples.
pub struct Row {
    /// State-directory variant (first column), empty when not applicable.
    pub storage: &'static str,
    /// The scenario.
    pub what: String,
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl Row {
    /// The row of `samples` (any order).
    pub fn latency(storage: &'static str, what: &str, samples: &[Duration]) -> Self {
        let mut s = samples.to_vec();
        s.sort();
        Self {
            storage,
            what: what.to_owned(),
            n: s.len(),
            p50: percentile(&s, 50.0),
            p90: percentile(&s, 90.0),
            p99: percentile(&s, 99.0),
            max: s.last().copied().unwrap_or_default(),
        }
    }
}

/// A markdown table of `rows`: `| <first> | scenario | n | p50 | p90 | p99 | max |`, the
/// first column being the rows' storage (left out when `first` is empty).
pub fn latency_table(first: &str, rows: &[Row]) -> String {
    let mut o = String::new();
    let lead = |o: &mut String, cell: &str| {
        if !first.is_empty() {
            let _ = write!(o, "| {cell} ");
        }
    };
    lead(&mut o, first);
    let _ = writeln!(o, "| scenario | n | p50 | p90 | p99 | max |");
    if !first.is_empty() {
        o.push_str("|---");
    }
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|");
    for r in rows {
        lead(&mut o, r.storage);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            r.what,
            r.n,
            ms(r.p50),
            ms(r.p90),
            ms(r.p99),
            ms(r.max)
        );
    }
    o
}
