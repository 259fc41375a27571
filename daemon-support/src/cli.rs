//! Command-line errors as one line: a bad flag is one line naming the problem (exit code 2),
//! not clap's multi-line usage text.

/// clap's message up to its usage hint, on one line, without the "error: " prefix.
pub fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    line.trim_start_matches("error: ").to_string()
}
