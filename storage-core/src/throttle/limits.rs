//! The limits a throttle group enforces, with QEMU's names: `iops-total`, `iops-read`,
//! `iops-write`, `bps-total`, `bps-read`, `bps-write`, each with `-max` (burst rate) and
//! `-max-length` (seconds the burst may last), and `iops-size` (a larger request counts as
//! several operations). qemu-storage-daemon's `throttle-group` object spells them with an
//! `x-` prefix; both spellings are accepted.

use super::bucket::Limit;

/// Which bucket a limit fills, in QEMU's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
    BpsTotal = 0,
    BpsRead = 1,
    BpsWrite = 2,
    IopsTotal = 3,
    IopsRead = 4,
    IopsWrite = 5,
}

const NAMES: [&str; 6] = [
    "bps-total",
    "bps-read",
    "bps-write",
    "iops-total",
    "iops-read",
    "iops-write",
];

/// Largest value QEMU accepts for a limit.
const VALUE_MAX: f64 = 1e15;

/// The limits of one throttle group. All zero: nothing is limited.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ThrottleLimits {
    pub(super) limits: [Limit; 6],
    /// Bytes one operation may move before it counts as more than one; 0: any size is one.
    pub iops_size: u64,
}

/// What is wrong with a throttle limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{key}={value:?}: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: &'static str,
    },
    #[error("{0}")]
    Conflict(String),
}

impl ThrottleLimits {
    /// Whether `key` names a throttle limit (with or without the `x-` prefix).
    pub fn is_key(key: &str) -> bool {
        Self::slot(key).is_some() || matches!(key, "iops-size" | "x-iops-size")
    }

    fn slot(key: &str) -> Option<(usize, &'static str)> {
        let key = key.strip_prefix("x-").unwrap_or(key);
        for (i, name) in NAMES.iter().enumerate() {
            if let Some(rest) = key.strip_prefix(name) {
                let field = match rest {
                    "" => "avg",
                    "-max" => "max",
                    "-max-length" => "length",
                    _ => continue,
                };
                return Some((i, field));
            }
        }
        None
    }

    /// Sets one limit from its key and value. Call [`check`](Self::check) when all are set.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), LimitError> {
        let bad = |reason| LimitError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            reason,
        };
        let n: u64 = value.parse().map_err(|_| bad("expected a whole number"))?;
        if n as f64 > VALUE_MAX {
            return Err(bad("larger than 1e15"));
        }
        if matches!(key, "iops-size" | "x-iops-size") {
            self.iops_size = n;
            return Ok(());
        }
        let (i, field) = Self::slot(key).ok_or(bad("not a throttle limit"))?;
        let l = &mut self.limits[i];
        match field {
            "avg" => l.avg = n as f64,
            "max" => l.max = n as f64,
            _ => {
                if n == 0 {
                    return Err(bad("a burst lasts at least 1 second"));
                }
                l.burst_length = n as f64;
            }
        }
        Ok(())
    }

    /// Checks the limits together, as QEMU does, and fills in defaults.
    pub fn check(mut self) -> Result<ThrottleLimits, LimitError> {
        for (i, l) in self.limits.iter_mut().enumerate() {
            let name = NAMES[i];
            if l.burst_length == 0.0 {
                l.burst_length = 1.0;
            } else if l.max == 0.0 {
                return Err(LimitError::Conflict(format!(
                    "{name}-max-length needs {name}-max"
                )));
            }
            if l.max > 0.0 && l.avg == 0.0 {
                return Err(LimitError::Conflict(format!("{name}-max needs {name}")));
            }
            if l.max > 0.0 && l.max < l.avg {
                return Err(LimitError::Conflict(format!(
                    "{name}-max cannot be lower than {name}"
                )));
            }
        }
        for total in [Which::BpsTotal, Which::IopsTotal] {
            let t = total as usize;
            let set = |i: usize| self.limits[i].avg > 0.0;
            if set(t) && (set(t + 1) || set(t + 2)) {
                return Err(LimitError::Conflict(format!(
                    "{0} and {1} or {2} cannot be used together",
                    NAMES[t],
                    NAMES[t + 1],
                    NAMES[t + 2]
                )));
            }
        }
        Ok(self)
    }

    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.limits.iter().any(|l| l.avg > 0.0)
    }

    /// The limits as `(key, value)` pairs, only those set (for reports and the API).
    pub fn entries(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (i, l) in self.limits.iter().enumerate() {
            if l.avg > 0.0 {
                out.push((NAMES[i].to_string(), l.avg as u64));
            }
            if l.max > 0.0 {
                out.push((format!("{}-max", NAMES[i]), l.max as u64));
                out.push((format!("{}-max-length", NAMES[i]), l.burst_length as u64));
            }
        }
        if self.iops_size > 0 {
            out.push(("iops-size".to_string(), self.iops_size));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<ThrottleLimits, LimitError> {
        let mut l = ThrottleLimits::default();
        for (k, v) in pairs {
            l.set(k, v)?;
        }
        l.check()
    }

    #[test]
    fn qemu_names_with_and_without_the_x_prefix() {
        let l = parse(&[
            ("iops-total", "1000"),
            ("x-iops-total-max", "2000"),
            ("iops-total-max-length", "5"),
            ("x-bps-read", "1048576"),
            ("iops-size", "4096"),
        ])
        .unwrap();
        let t = l.limits[Which::IopsTotal as usize];
        assert_eq!((t.avg, t.max, t.burst_length), (1000.0, 2000.0, 5.0));
        assert_eq!(l.limits[Which::BpsRead as usize].avg, 1_048_576.0);
        assert_eq!(l.iops_size, 4096);
        assert!(l.any());
        assert_eq!(l.entries().len(), 5);
    }

    #[test]
    fn contradictions_are_refused_with_the_names_involved() {
        let e = parse(&[("iops-total", "10"), ("iops-read", "5")]).unwrap_err();
        assert!(e.to_string().contains("iops-total and iops-read"), "{e}");
        let e = parse(&[("bps-write-max", "10")]).unwrap_err();
        assert!(
            e.to_string().contains("bps-write-max needs bps-write"),
            "{e}"
        );
        let e = parse(&[("iops-read", "10"), ("iops-read-max", "5")]).unwrap_err();
        assert!(e.to_string().contains("cannot be lower"), "{e}");
        let e = parse(&[("iops-read", "10"), ("iops-read-max-length", "5")]).unwrap_err();
        assert!(e.to_string().contains("needs iops-read-max"), "{e}");
        assert!(parse(&[("iops-read", "ten")]).is_err());
        assert!(parse(&[("iops-read", "-1")]).is_err());
        assert!(parse(&[("iops-read", "2000000000000000")]).is_err());
    }
}
