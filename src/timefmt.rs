//! Times as operators read them: RFC 3339 in UTC (`2026-12-02T01:02:03Z`).
//!
//! Owns: formatting Unix seconds for logs, `check-config` and `whoami`.
//! Never reads the clock.
#![forbid(unsafe_code)]

/// `secs` since the Unix epoch as RFC 3339 UTC; out-of-range values are
/// shown as the plain number.
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{secs} (Unix seconds)"))
}

/// Seconds since the Unix epoch now (for callers in the shell; the sans-io
/// core is given its time).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_173_323), "2026-12-02T01:02:03Z");
    }
}
