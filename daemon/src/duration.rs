//! Durations on the command line (`500ms`, `10s`, `3m`: humantime syntax) and in `--check-config`.

use std::time::Duration;

/// Parses a duration flag value.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 500ms, 10s, 3m)"))
}

/// Serialises a duration as its humantime text (`serialize_with`).
pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::parse("250ms").unwrap(), std::time::Duration::from_millis(250));
        assert!(super::parse("ten").unwrap_err().contains("examples"));
    }
}
