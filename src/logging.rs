//! Logging set-up: the `--log` filter and the `--log-format`.
//!
//! Owns: checking a filter written by an operator (a level, or per-module
//! `target=level` directives, comma-separated), and installing the
//! subscriber that writes to stderr as text or as one JSON object a line.
//! Never decides what is logged: the modules do.
#![forbid(unsafe_code)]

use tracing_subscriber::EnvFilter;

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

/// Checks a `--log` filter: `info`, or `warn,holdfast::shard=debug`.
/// Every directive is a level or `module::path=level`; anything else (a
/// misspelt level, an empty part) is refused with what is allowed.
pub fn check_filter(spec: &str) -> Result<String, String> {
    let allowed =
        || format!("use a level ({}) or module=level directives, comma-separated, e.g. \"warn,holdfast::shard=debug\"", LEVELS.join(", "));
    if spec.trim().is_empty() {
        return Err(format!("empty log filter; {}", allowed()));
    }
    for part in spec.split(',') {
        let part = part.trim();
        let (target, level) = match part.split_once('=') {
            Some((t, l)) => (Some(t.trim()), l.trim()),
            None => (None, part),
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!("'{part}': '{level}' is not a log level; {}", allowed()));
        }
        if let Some(t) = target {
            let ok = !t.is_empty()
                && t.split("::").all(|seg| !seg.is_empty() && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
            if !ok {
                return Err(format!("'{part}': '{t}' is not a module path; {}", allowed()));
            }
        }
    }
    Ok(spec.to_string())
}

/// Installs the subscriber (once per process; later calls do nothing).
/// `spec` should have passed [`check_filter`]; a bad one falls back to info.
pub fn init(spec: &str, format: LogFormat) {
    let filter = check_filter(spec).ok().and_then(|s| EnvFilter::try_new(s).ok()).unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_module_directives_pass() {
        for ok in ["info", "WARN", "warn,holdfast::shard=debug", "holdfast::tls=trace", "off"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn unknown_levels_and_bad_parts_are_refused_with_what_is_allowed() {
        for bad in ["verbose", "", "info,", "holdfast=loud", "=debug", "a b=info"] {
            let e = check_filter(bad).unwrap_err();
            assert!(e.contains("error, warn, info"), "{bad}: {e}");
        }
    }
}
