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

/// Changes the filter of the installed subscriber (live reload).
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static SET_FILTER: std::sync::OnceLock<SetFilter> = std::sync::OnceLock::new();

/// Installs the subscriber (once per process; later calls do nothing).
/// `spec` should have passed [`check_filter`]; a bad one falls back to info.
pub fn init(spec: &str, format: LogFormat) {
    let filter = check_filter(spec).ok().and_then(|s| EnvFilter::try_new(s).ok()).unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let b = builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_target(false).with_filter_reloading();
            let h = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = SET_FILTER.set(Box::new(move |f| h.reload(f).map_err(|e| e.to_string())));
            }
        }
        LogFormat::Json => {
            let b = builder.json().flatten_event(true).with_current_span(false).with_filter_reloading();
            let h = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = SET_FILTER.set(Box::new(move |f| h.reload(f).map_err(|e| e.to_string())));
            }
        }
    }
}

/// Replaces the log filter from now on (a reload's `log.level`).
pub fn set_filter(spec: &str) -> Result<(), String> {
    let spec = check_filter(spec)?;
    let f = EnvFilter::try_new(&spec).map_err(|e| e.to_string())?;
    match SET_FILTER.get() {
        Some(set) => set(f),
        None => Err("no log subscriber installed".into()),
    }
}
