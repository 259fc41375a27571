//! The one writer of the Prometheus text format (version 0.0.4) in Strata. Counters stay
//! with the code that counts them; each renders its samples into an [`Exposition`], which
//! keeps every family's `# HELP`/`# TYPE` and samples together (the format requires one
//! contiguous group per family, whatever order devices and queues are visited in), escapes
//! label values, and orders families as they were first declared.

use std::fmt::{Display, Write as _};

/// What a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

struct Family {
    /// Without the exposition's prefix.
    name: String,
    kind: Kind,
    help: &'static str,
    samples: String,
}

/// A Prometheus exposition being written: families under one prefix (`strata_blk`).
pub struct Exposition {
    prefix: &'static str,
    families: Vec<Family>,
}

/// Escapes a label value (backslash, double quote, newline), as the format asks.
fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl Exposition {
    pub fn new(prefix: &'static str) -> Exposition {
        Exposition {
            prefix,
            families: Vec::new(),
        }
    }

    /// The family `name` (without the prefix): found without allocating, created once.
    fn family(&mut self, name: &str, kind: Kind, help: &'static str) -> &mut Family {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => {
                debug_assert_eq!(self.families[i].kind, kind, "{name} declared twice");
                i
            }
            None => {
                self.families.push(Family {
                    name: name.to_string(),
                    kind,
                    help,
                    samples: String::new(),
                });
                self.families.len() - 1
            }
        };
        &mut self.families[i]
    }

    /// Adds a sample of family `name` (declared on first use) with `labels`.
    pub fn sample(
        &mut self,
        name: &str,
        kind: Kind,
        help: &'static str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) {
        let prefix = self.prefix;
        let f = self.family(name, kind, help);
        write_sample(&mut f.samples, prefix, name, "", labels, None, value);
    }

    /// Adds one histogram: `buckets` are (upper bound, cumulative count), then `+Inf` is
    /// `count`; `sum` in the histogram's unit.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &'static str,
        labels: &[(&str, &str)],
        buckets: impl IntoIterator<Item = (f64, u64)>,
        sum: f64,
        count: u64,
    ) {
        let prefix = self.prefix;
        let f = self.family(name, Kind::Histogram, help);
        let out = &mut f.samples;
        for (le, n) in buckets {
            let le = le.to_string();
            write_sample(out, prefix, name, "_bucket", labels, Some(&le), n);
        }
        write_sample(out, prefix, name, "_bucket", labels, Some("+Inf"), count);
        write_sample(out, prefix, name, "_sum", labels, None, sum);
        write_sample(out, prefix, name, "_count", labels, None, count);
    }

    /// The text, family by family.
    pub fn finish(self) -> String {
        let mut out = String::new();
        for f in self.families {
            let _ = writeln!(out, "# HELP {}_{} {}", self.prefix, f.name, f.help);
            let _ = writeln!(out, "# TYPE {}_{} {}", self.prefix, f.name, f.kind.name());
            out.push_str(&f.samples);
        }
        out
    }
}

fn write_sample(
    out: &mut String,
    prefix: &str,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    le: Option<&str>,
    value: impl Display,
) {
    out.push_str(prefix);
    out.push('_');
    out.push_str(name);
    out.push_str(suffix);
    let le = le.map(|v| ("le", v));
    let all = labels.iter().copied().chain(le);
    let mut first = true;
    for (k, v) in all {
        out.push(if first { '{' } else { ',' });
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        escape(v, out);
        out.push('"');
    }
    if !first {
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_stay_together_whatever_order_samples_come_in() {
        let mut e = Exposition::new("x");
        for q in ["0", "1"] {
            e.sample("a_total", Kind::Counter, "A.", &[("queue", q)], 1);
            e.sample("b", Kind::Gauge, "B.", &[("queue", q)], 2);
        }
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP x_a_total A.\n# TYPE x_a_total counter\nx_a_total{queue=\"0\"} 1\n\
             x_a_total{queue=\"1\"} 1\n# HELP x_b B.\n# TYPE x_b gauge\nx_b{queue=\"0\"} 2\n\
             x_b{queue=\"1\"} 2\n"
        );
    }

    #[test]
    fn label_values_are_escaped_and_histograms_end_in_inf() {
        let mut e = Exposition::new("x");
        e.histogram("lat", "L.", &[("d", "a\"b\\c\nd")], [(0.5, 1)], 0.25, 3);
        let text = e.finish();
        assert!(
            text.contains("x_lat_bucket{d=\"a\\\"b\\\\c\\nd\",le=\"0.5\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_lat_bucket{d=\"a\\\"b\\\\c\\nd\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("x_lat_count{d=\"a\\\"b\\\\c\\nd\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE x_lat histogram\n"), "{text}");
    }
}
