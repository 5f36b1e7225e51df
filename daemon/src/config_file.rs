//! `--config FILE`: a TOML file whose keys are the long flag names (`grpc-listen = "0.0.0.0:50051"`,
//! `mobile-prefix = ["10.10.0.0/16"]`, `require-declared = true`). Its settings are turned into
//! arguments placed before the real ones, so the command line overrides the file, and both
//! override the `VICTOR_*` environment (clap only consults the environment for flags that are
//! absent from the arguments).

use std::path::{Path, PathBuf};

/// Why a daemon's configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unusable value.
    #[error("config file {path}: {message}")]
    FileSyntax {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Flags, environment and file combined are invalid.
    #[error("{0}")]
    Invalid(String),
    /// clap rejected the arguments (includes --help/--version output).
    #[error(transparent)]
    Clap(#[from] clap::Error),
}

/// `args` (program name first) with the settings of the config file named by `--config FILE`,
/// `--config=FILE` or `VICTOR_CONFIG` inserted before the real arguments.
pub fn merge(args: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut merged: Vec<String> = args.iter().take(1).cloned().collect();
    if let Some(path) = config_path(&args) {
        merged.extend(file_arguments(&path)?);
    }
    merged.extend(args.into_iter().skip(1));
    Ok(merged)
}

/// The process arguments as strings.
pub fn process_args() -> Vec<String> {
    std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect()
}

/// The config file named by `--config FILE`, `--config=FILE` or `VICTOR_CONFIG`.
fn config_path(args: &[String]) -> Option<PathBuf> {
    let mut path = std::env::var_os("VICTOR_CONFIG").map(PathBuf::from);
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        if arg == "--config" {
            path = iter.next().map(PathBuf::from);
        } else if let Some(p) = arg.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        }
    }
    path
}

/// Turns a TOML config file into `--flag value` arguments.
fn file_arguments(path: &Path) -> Result<Vec<String>, ConfigError> {
    let syntax = |message: String| ConfigError::FileSyntax { path: path.to_path_buf(), message };
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile { path: path.to_path_buf(), source })?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| syntax(e.to_string()))?;
    let mut args = Vec::new();
    for (key, value) in table {
        if key == "config" || key == "check-config" {
            return Err(syntax(format!("key {key:?} is not allowed in a config file")));
        }
        let flag = format!("--{key}");
        let scalar = |v: &toml::Value| -> Result<String, ConfigError> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                other => Err(syntax(format!("key {key:?}: unsupported value {other}"))),
            }
        };
        match &value {
            toml::Value::Array(items) => {
                for item in items {
                    args.push(flag.clone());
                    args.push(scalar(item)?);
                }
            }
            toml::Value::Boolean(true) => args.push(flag),
            toml::Value::Boolean(false) => {}
            v => {
                args.push(flag);
                args.push(scalar(v)?);
            }
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_settings_go_before_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"a\"\nprefix = [\"p1\", \"p2\"]\nstrict = true\nquiet = false\nport = 7\n")
            .unwrap();
        let merged =
            merge(vec!["prog".into(), "--config".into(), path.display().to_string(), "--listen".into(), "b".into()])
                .unwrap();
        assert_eq!(merged[0], "prog");
        // Keys come in file order as TOML tables keep them sorted; what matters: file first, flags last.
        let tail = &merged[merged.len() - 4..];
        assert_eq!(tail, ["--config", &path.display().to_string(), "--listen", "b"]);
        for expected in ["--listen", "--prefix", "p1", "p2", "--strict", "--port", "7"] {
            assert!(merged.contains(&expected.to_string()), "{expected} missing from {merged:?}");
        }
        assert!(!merged.contains(&"--quiet".to_string()));
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "check-config = true\n").unwrap();
        let err = merge(vec!["prog".into(), format!("--config={}", path.display())]).unwrap_err().to_string();
        assert!(err.contains("not allowed"), "{err}");
        std::fs::write(&path, "x = [").unwrap();
        assert!(matches!(
            merge(vec!["prog".into(), "--config".into(), path.display().to_string()]),
            Err(ConfigError::FileSyntax { .. })
        ));
        let missing = merge(vec!["prog".into(), "--config".into(), "/nonexistent/victor.toml".into()]).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
    }
}
