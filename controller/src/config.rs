//! Controller configuration: command-line flags, `VICTOR_*` environment variables and an optional
//! TOML config file, in that order of precedence (flag > env > file > default).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;
use serde::Serialize;
pub use victor_daemon::{ConfigError, LogFormat};

/// victor-controller: the replicated VICTOR control plane.
///
/// Tracks, for every mobile VM IP, which forwarding element (FE) it sits behind, and streams
/// that state to every fe-agent. Runs on etcd when --etcd-endpoints is given (replicas are
/// active-active), otherwise on an embedded single-file store in --data-dir.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "victor-controller", version, about, long_about = None, args_override_self = true)]
pub struct Config {
    /// TOML file with any of these options (keys are the long flag names, e.g.
    /// `grpc-listen = "0.0.0.0:50051"`, `mobile-prefix = ["10.10.0.0/16"]`).
    /// Flags and environment variables override it.
    #[arg(long, env = "VICTOR_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address of the gRPC server (BindingService, AgentService, health, reflection).
    #[arg(long, env = "VICTOR_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: SocketAddr,

    /// Address of the HTTP admin server (/healthz, /readyz, /metrics, status page).
    #[arg(long, env = "VICTOR_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,

    /// etcd client URLs, comma separated (e.g. http://10.0.0.1:2379,http://10.0.0.2:2379).
    /// Absent: use the embedded store in --data-dir (single replica).
    #[arg(long, env = "VICTOR_ETCD_ENDPOINTS", value_delimiter = ',', value_name = "URL,...")]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix of all VICTOR keys in etcd (lets several clusters share one etcd).
    #[arg(long, env = "VICTOR_ETCD_PREFIX", default_value = "/victor")]
    pub etcd_prefix: String,

    /// CA certificate (PEM) that signs the etcd server certificates; enables TLS to etcd.
    #[arg(long, env = "VICTOR_ETCD_CA_FILE", value_name = "FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for etcd mutual TLS (with --etcd-key-file).
    #[arg(long, env = "VICTOR_ETCD_CERT_FILE", value_name = "FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,

    /// Client key (PEM) for etcd mutual TLS (with --etcd-cert-file).
    #[arg(long, env = "VICTOR_ETCD_KEY_FILE", value_name = "FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,

    /// Deadline of every etcd request; past it the request fails with UNAVAILABLE.
    #[arg(long, env = "VICTOR_ETCD_TIMEOUT", default_value = "3s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub etcd_timeout: Duration,

    /// Directory of the embedded store (used only without --etcd-endpoints).
    #[arg(long, env = "VICTOR_DATA_DIR", default_value = "victor-data")]
    pub data_dir: PathBuf,

    /// A mobile VM prefix (repeatable; env: comma separated). Only IPs inside these can be bound.
    #[arg(
        long = "mobile-prefix",
        env = "VICTOR_MOBILE_PREFIX",
        value_delimiter = ',',
        required = true,
        value_name = "CIDR"
    )]
    pub mobile_prefixes: Vec<IpNet>,

    /// This replica's identifier (default: hostname and PID).
    #[arg(long, env = "VICTOR_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// FE session time-to-live: an FE without a heartbeat for this long is reported down.
    #[arg(long, env = "VICTOR_SESSION_TTL", default_value = "10s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub session_ttl: Duration,

    /// Remove the bindings of an FE that has been down this long (0s = never; a headless FE
    /// keeps forwarding on its last state, so removal is a policy decision).
    #[arg(long, env = "VICTOR_FE_DEAD_AFTER", default_value = "0s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub fe_dead_after: Duration,

    /// Flap damping: more than this many moves of one VM within --damping-window freeze its binding.
    #[arg(long, env = "VICTOR_DAMPING_MAX_MOVES", default_value_t = 5)]
    pub damping_max_moves: u32,

    /// Flap damping observation window.
    #[arg(long, env = "VICTOR_DAMPING_WINDOW", default_value = "180s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub damping_window: Duration,

    /// How long a frozen binding stays frozen before housekeeping unfreezes it (0s = until an
    /// operator calls ClearDamping).
    #[arg(long, env = "VICTOR_DAMPING_HOLD", default_value = "0s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub damping_hold: Duration,

    /// How long the tombstone of a removed binding is kept (docs/design.md, section 3): a report
    /// made before the removal that arrives within this time is recognised as older. Later,
    /// housekeeping collects the tombstone and raises the tombstone horizon: a report of a VM
    /// without any record made knowing less than the horizon is then answered STALE and the
    /// agent observes the VM again — never wrong, only one more ARP round trip. Keep it above
    /// the longest time a report can wait in an agent's queue or in flight.
    #[arg(long, env = "VICTOR_TOMBSTONE_RETENTION", default_value = "10m", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub tombstone_retention: Duration,

    /// Only VMs declared through BindingService.DeclareVm can be bound.
    #[arg(long, env = "VICTOR_REQUIRE_DECLARED", default_value_t = false)]
    pub require_declared: bool,

    /// Store changes kept in each replica's memory so agent streams can resume without a snapshot.
    #[arg(long, env = "VICTOR_STREAM_HISTORY", default_value_t = 200_000)]
    pub stream_history: usize,

    /// Most bytes (estimated) the history of --stream-history may take, e.g. `16MiB`: the
    /// older changes go first when either bound is reached. A stream resuming from before the
    /// history gets a snapshot.
    #[arg(long, env = "VICTOR_STREAM_HISTORY_BYTES", default_value = "16MiB", value_parser = parse_bytes)]
    pub stream_history_bytes: u64,

    /// Most open gRPC connections; further ones are closed as they arrive. Lowered at start if
    /// needed so that both servers' caps fit the open-file limit (raised to its hard limit) with
    /// descriptors to spare.
    #[arg(long, env = "VICTOR_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Most open connections to the HTTP admin port.
    #[arg(long, env = "VICTOR_MAX_HTTP_CONNECTIONS", default_value_t = 64)]
    pub max_http_connections: usize,

    /// A new connection must complete TLS and the HTTP/2 preface (gRPC), or send a request head
    /// (HTTP admin; also the longest wait for the next request), within this.
    #[arg(long, env = "VICTOR_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub handshake_timeout: Duration,

    /// A connection on which nothing was received or sent for this long is closed. gRPC clients
    /// answer the server's keepalive pings (every 10s), so only dead or silent sockets reach it.
    #[arg(long, env = "VICTOR_IDLE_TIMEOUT", default_value = "60s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub idle_timeout: Duration,

    /// Most streams (Sync and WatchBindings together) one client connection may have open;
    /// more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "VICTOR_MAX_STREAMS_PER_CONNECTION", default_value_t = 32)]
    pub max_streams_per_connection: usize,

    /// Most agent streams (AgentService.Sync) this replica serves; more are refused with
    /// RESOURCE_EXHAUSTED (agents fail over to another replica).
    #[arg(long, env = "VICTOR_MAX_AGENT_STREAMS", default_value_t = 4096)]
    pub max_agent_streams: usize,

    /// Most binding watches (BindingService.WatchBindings) this replica serves; more are refused
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, env = "VICTOR_MAX_WATCH_STREAMS", default_value_t = 256)]
    pub max_watch_streams: usize,

    /// Snapshot bytes per second this replica builds for all its streams together (agents'
    /// full syncs and binding-watch snapshots), e.g. `128MiB`, `512KiB`; 0 = unpaced. Keeps a
    /// flood of snapshots from starving heartbeats and other calls.
    #[arg(long, env = "VICTOR_SNAPSHOT_RATE", default_value = "128MiB", value_parser = parse_bytes)]
    pub snapshot_rate: u64,

    /// Most of a core the agent streams' fan-out may take under churn (0.05–1): the next round of
    /// deltas to every stream starts at least (time of the last round) / share after it. Higher
    /// means lower convergence latency under churn and more CPU (more, smaller messages).
    #[arg(long, env = "VICTOR_FANOUT_SHARE", default_value_t = crate::stream::clock::DEFAULT_SHARE)]
    pub fanout_share: f64,

    /// Most observations accepted in one AgentService.Report call.
    #[arg(long, env = "VICTOR_MAX_REPORT_OBSERVATIONS", default_value_t = 1024)]
    pub max_report_observations: usize,

    /// Server certificate (PEM) for gRPC TLS. Without it gRPC is plaintext (lab/quick start only).
    #[arg(long, env = "VICTOR_TLS_CERT_FILE", value_name = "FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// Server key (PEM) for gRPC TLS.
    #[arg(long, env = "VICTOR_TLS_KEY_FILE", value_name = "FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// CA (PEM) that signs the fe-agents' client certificates (mutual TLS). A client certificate
    /// is optional at the TLS layer (operators may connect with a bearer token only), but every
    /// AgentService call must come with one signed by this CA that names the FE it acts for
    /// (DNS SAN `<fe_id>.fe.victor`); a certificate from another CA fails the handshake.
    #[arg(long, env = "VICTOR_TLS_CLIENT_CA_FILE", value_name = "FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,

    /// File of bearer tokens for BindingService callers, one `<token> <role>` per line
    /// (role: read-only | read-write). Without it, BindingService is open.
    #[arg(long, env = "VICTOR_AUTH_TOKENS_FILE", value_name = "FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "VICTOR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. `info,victor_controller=debug`).
    #[arg(long, env = "VICTOR_LOG", default_value = "info")]
    pub log: String,

    /// Validate the configuration, print it as JSON and exit (0 = valid) without starting.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,
}

impl Config {
    /// Parses the process arguments, merging the config file named by `--config`/`VICTOR_CONFIG`.
    pub fn load() -> Result<Config, ConfigError> {
        Self::load_from(victor_daemon::config_file::process_args())
    }

    /// Parses `args` (including the program name), merging the config file if any. The file's
    /// settings are inserted before the real arguments, so flags override the file, and both
    /// override `VICTOR_*` environment variables.
    pub fn load_from(args: Vec<String>) -> Result<Config, ConfigError> {
        let config = Config::try_parse_from(victor_daemon::config_file::merge(args)?)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what clap cannot: overlapping prefixes, sane durations, readable files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for (i, a) in self.mobile_prefixes.iter().enumerate() {
            if a.trunc() != *a {
                return bad(format!("--mobile-prefix {a} has host bits set; did you mean {}?", a.trunc()));
            }
            for b in &self.mobile_prefixes[i + 1..] {
                if a.contains(b) || b.contains(a) {
                    return bad(format!("--mobile-prefix {a} and {b} overlap; give each range once"));
                }
            }
        }
        if self.session_ttl < Duration::from_secs(2) {
            return bad(format!("--session-ttl {:?} is too short; use at least 2s", self.session_ttl));
        }
        if self.damping_max_moves == 0 {
            return bad("--damping-max-moves must be at least 1".into());
        }
        if self.stream_history < 1000 {
            return bad("--stream-history must be at least 1000".into());
        }
        if self.stream_history_bytes < 1 << 20 {
            return bad(format!(
                "--stream-history-bytes {} is too small; use at least 1MiB",
                self.stream_history_bytes
            ));
        }
        if !(0.05..=1.0).contains(&self.fanout_share) {
            return bad(format!(
                "--fanout-share {} is out of range; give a fraction of a core from 0.05 to 1",
                self.fanout_share
            ));
        }
        if self.max_report_observations == 0 || self.max_report_observations > 65_536 {
            return bad("--max-report-observations must be between 1 and 65536".into());
        }
        for (flag, value) in [
            ("--max-connections", self.max_connections),
            ("--max-http-connections", self.max_http_connections),
            ("--max-streams-per-connection", self.max_streams_per_connection),
            ("--max-agent-streams", self.max_agent_streams),
            ("--max-watch-streams", self.max_watch_streams),
        ] {
            if value == 0 {
                return bad(format!("{flag} must be at least 1"));
            }
        }
        if self.handshake_timeout < Duration::from_secs(1) {
            return bad(format!("--handshake-timeout {:?} is too short; use at least 1s", self.handshake_timeout));
        }
        if self.idle_timeout < MIN_IDLE_TIMEOUT {
            return bad(format!(
                "--idle-timeout {:?} is too short: live clients only answer keepalive pings every 10s; use at \
                 least {MIN_IDLE_TIMEOUT:?}",
                self.idle_timeout
            ));
        }
        for url in &self.etcd_endpoints {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad(format!("--etcd-endpoints entry {url:?} must be a URL like http://127.0.0.1:2379"));
            }
        }
        if !self.etcd_prefix.starts_with('/') || self.etcd_prefix.ends_with('/') {
            return bad(format!("--etcd-prefix {:?} must start with '/' and not end with '/'", self.etcd_prefix));
        }
        for file in [
            &self.etcd_ca_file,
            &self.etcd_cert_file,
            &self.etcd_key_file,
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.tls_client_ca_file,
            &self.auth_tokens_file,
        ]
        .into_iter()
        .flatten()
        {
            if !file.is_file() {
                return bad(format!("file {} does not exist or is not a regular file", file.display()));
            }
        }
        Ok(())
    }

    /// The replica id: configured, or `<hostname>-<pid>`.
    pub fn replica_id(&self) -> String {
        self.replica_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "controller".into());
            format!("{}-{}", host.trim(), std::process::id())
        })
    }

    /// Whether the embedded store is used.
    pub fn uses_embedded_store(&self) -> bool {
        self.etcd_endpoints.is_empty()
    }
}

victor_daemon::impl_daemon_config!(Config);

/// Shortest `--idle-timeout`: longer than the server's keepalive interval and timeout together.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Parses a byte count: a number with an optional unit, binary (`KiB`, `MiB`, `GiB`) or decimal
/// (`KB`, `MB`, `GB`), e.g. `128MiB`, `500KB`, `1048576`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a byte count like 128MiB"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("unknown unit {other:?} in {text:?}; use B, KiB, MiB, GiB, KB, MB or GB")),
    };
    number.checked_mul(factor).ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        Config::load_from(std::iter::once("victor-controller").chain(args.iter().copied()).map(String::from).collect())
    }

    #[test]
    fn defaults_with_one_prefix() {
        let c = load(&["--mobile-prefix", "10.10.0.0/16"]).unwrap();
        assert!(c.uses_embedded_store());
        assert_eq!(c.mobile_prefixes, vec!["10.10.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(c.damping_max_moves, 5);
        assert_eq!(c.damping_window, Duration::from_secs(180));
    }

    #[test]
    fn rejects_bad_values_with_a_hint() {
        let err = load(&["--mobile-prefix", "10.10.0.1/16"]).unwrap_err().to_string();
        assert!(err.contains("did you mean 10.10.0.0/16"), "{err}");
        let err =
            load(&["--mobile-prefix", "10.10.0.0/16", "--mobile-prefix", "10.10.1.0/24"]).unwrap_err().to_string();
        assert!(err.contains("overlap"), "{err}");
        let err =
            load(&["--mobile-prefix", "10.10.0.0/16", "--etcd-endpoints", "127.0.0.1:2379"]).unwrap_err().to_string();
        assert!(err.contains("must be a URL"), "{err}");
        assert!(load(&[]).is_err(), "a mobile prefix is required");
    }

    #[test]
    fn byte_counts_and_connection_limits() {
        assert_eq!(parse_bytes("128MiB"), Ok(128 << 20));
        assert_eq!(parse_bytes("500KB"), Ok(500_000));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert!(parse_bytes("12 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("MiB").is_err());
        let c = load(&["--mobile-prefix", "10.10.0.0/16"]).unwrap();
        assert_eq!((c.max_connections, c.max_streams_per_connection, c.snapshot_rate), (4096, 32, 128 << 20));
        let c = load(&["--mobile-prefix", "10.10.0.0/16", "--snapshot-rate", "1GiB"]).unwrap();
        assert_eq!(c.snapshot_rate, 1 << 30);
        assert_eq!(c.fanout_share, 0.5);
        let err = load(&["--mobile-prefix", "10.10.0.0/16", "--fanout-share", "1.5"]).unwrap_err();
        assert!(format!("{err:#}").contains("--fanout-share 1.5 is out of range"), "{err:#}");
        assert_eq!(c.stream_history_bytes, 16 << 20);
        let c = load(&["--mobile-prefix", "10.10.0.0/16", "--stream-history-bytes", "64MiB"]).unwrap();
        assert_eq!(c.stream_history_bytes, 64 << 20);
        let err = load(&["--mobile-prefix", "10.10.0.0/16", "--stream-history-bytes", "1KiB"]).unwrap_err();
        assert!(format!("{err:#}").contains("--stream-history-bytes"), "{err:#}");
        let err = load(&["--mobile-prefix", "10.10.0.0/16", "--idle-timeout", "5s"]).unwrap_err().to_string();
        assert!(err.contains("--idle-timeout"), "{err}");
        let err = load(&["--mobile-prefix", "10.10.0.0/16", "--max-agent-streams", "0"]).unwrap_err().to_string();
        assert!(err.contains("--max-agent-streams must be at least 1"), "{err}");
    }

    #[test]
    fn config_file_is_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "grpc-listen = \"127.0.0.1:6000\"\nmobile-prefix = [\"10.10.0.0/16\", \"10.20.0.0/16\"]\nrequire-declared = true\n",
        )
        .unwrap();
        let c = load(&["--config", path.to_str().unwrap(), "--grpc-listen", "127.0.0.1:7000"]).unwrap();
        assert_eq!(c.grpc_listen.port(), 7000);
        assert_eq!(c.mobile_prefixes.len(), 2);
        assert!(c.require_declared);
        std::fs::write(&path, "no-such-flag = 1\n").unwrap();
        let err = load(&["--config", path.to_str().unwrap()]).unwrap_err().to_string();
        assert!(err.contains("no-such-flag"), "{err}");
    }
}
