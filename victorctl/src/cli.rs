//! The command line: global connection options (controllers, TLS, token, output format) and the
//! subcommands. Values are parsed here (IPs, MACs, prefixes, durations), so a typo is a usage
//! error (exit 2) before anything is sent.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use victor_proto::Mac;

/// Command-line client of the VICTOR controller cluster.
///
/// Exit status: 0 success, 1 the controller refused the call or could not be reached (the
/// message says which and why), 2 bad usage or unreadable TLS/token files.
#[derive(Debug, Parser)]
#[command(name = "victorctl", version)]
pub struct Cli {
    /// Connection and output options.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Controller gRPC addresses, comma separated (host:port or http(s)://host:port). Calls go to
    /// the first that answers; on a connection failure or UNAVAILABLE the next one is tried.
    #[arg(
        long,
        global = true,
        env = "VICTOR_CONTROLLER",
        value_delimiter = ',',
        default_value = "127.0.0.1:50051",
        value_name = "ADDR,..."
    )]
    pub controller: Vec<String>,

    /// Output format.
    #[arg(short, long, global = true, value_enum, env = "VICTOR_OUTPUT", default_value = "table")]
    pub output: Output,

    /// Bearer token for the BindingService (controllers started with --auth-tokens-file).
    /// Prefer VICTOR_TOKEN or --token-file: a flag is visible in the process list.
    #[arg(long, global = true, env = "VICTOR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// File whose first line is the bearer token (takes precedence over --token/VICTOR_TOKEN).
    #[arg(long, global = true, env = "VICTOR_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// CA certificate (PEM) of the controllers' server certificates; enables TLS.
    #[arg(long, global = true, env = "VICTOR_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS (with --key-file).
    #[arg(long, global = true, env = "VICTOR_CERT_FILE", value_name = "FILE")]
    pub cert_file: Option<PathBuf>,

    /// Private key (PEM) of --cert-file.
    #[arg(long, global = true, env = "VICTOR_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,

    /// Name to verify the controllers' certificates against (default: the host of each address).
    #[arg(long, global = true, env = "VICTOR_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// How long to wait for a connection to one controller before trying the next.
    #[arg(long, global = true, default_value = "3s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// How long to wait for the answer to one call.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts (one object or array; `binding watch` prints one object per line).
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Forwarding elements.
    #[command(subcommand)]
    Fe(FeCommand),
    /// VM bindings (which FE each VM IP sits behind).
    #[command(subcommand)]
    Binding(BindingCommand),
    /// VM declarations (MAC anti-spoofing, site policy).
    #[command(subcommand)]
    Vm(VmCommand),
    /// Live migrations.
    #[command(subcommand)]
    Migrate(MigrateCommand),
    /// Flap damping.
    #[command(subcommand)]
    Damping(DampingCommand),
    /// The answering controller replica and the cluster it belongs to.
    Status,
}

/// `victorctl fe ...`
#[derive(Debug, Subcommand)]
pub enum FeCommand {
    /// Lists the registered FEs with health, site and binding count.
    List,
    /// Removes a decommissioned FE: it is no longer listed and every agent drops it. Refused while
    /// its agent holds a live session (stop the agent and wait until the FE shows down), and while
    /// bindings point at it unless --force.
    Remove {
        /// The FE's id.
        fe_id: String,
        /// Also remove every binding that points at the FE (those VMs' traffic is dropped until an
        /// FE learns them again). Does not override a live session.
        #[arg(long)]
        force: bool,
    },
}

/// Binding sources, for filtering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceArg {
    /// Learned by an FE from ARP.
    Arp,
    /// Placed by an orchestrator (AnnounceMigration with commit).
    Orchestrator,
}

/// `victorctl binding ...`
#[derive(Debug, Subcommand)]
pub enum BindingCommand {
    /// Shows one VM's binding (exit 1 with NotFound if it has none).
    Get {
        /// The VM's IP address.
        vm_ip: IpAddr,
    },
    /// Lists bindings in IP order (all pages). Filters combine.
    List {
        /// Only bindings at this FE.
        #[arg(long)]
        fe: Option<String>,
        /// Only bindings inside this prefix, e.g. 10.10.1.0/24.
        #[arg(long, value_parser = parse_prefix)]
        prefix: Option<IpNet>,
        /// Only bindings frozen by flap damping.
        #[arg(long, conflicts_with = "not_frozen")]
        frozen: bool,
        /// Only bindings that are not frozen.
        #[arg(long)]
        not_frozen: bool,
        /// Only bindings from this source.
        #[arg(long, value_enum)]
        source: Option<SourceArg>,
        /// Stop after this many bindings (at least 1; without it every binding is listed).
        #[arg(long, value_parser = parse_limit)]
        limit: Option<usize>,
    },
    /// Follows binding changes as they happen; resumes on another controller if one goes away.
    Watch {
        /// Only bindings inside this prefix.
        #[arg(long, value_parser = parse_prefix)]
        prefix: Option<IpNet>,
        /// Only the bindings at this FE; a binding that leaves it shows once more (its new FE, or
        /// its removal).
        #[arg(long)]
        fe: Option<String>,
        /// Start with every current binding.
        #[arg(long)]
        snapshot: bool,
        /// Deliver changes after this revision (default: from now).
        #[arg(long, default_value_t = 0)]
        from_revision: u64,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Exit after this long (e.g. 30s).
        #[arg(long = "for", value_parser = parse_duration, value_name = "DURATION")]
        duration: Option<Duration>,
    },
}

/// `victorctl vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Declares (or re-declares) a VM: only its MAC may claim its IP.
    Declare {
        /// The VM's IP address.
        vm_ip: IpAddr,
        /// The VM's MAC address (02:00:0a:0a:00:0b).
        #[arg(long)]
        mac: Mac,
        /// A site the VM may run at (repeatable; none = anywhere).
        #[arg(long = "site")]
        sites: Vec<String>,
        /// Free text for operators.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Removes a VM declaration.
    Undeclare {
        /// The VM's IP address.
        vm_ip: IpAddr,
        /// Also remove its binding (every FE drops its traffic afterwards).
        #[arg(long)]
        remove_binding: bool,
    },
    /// Shows one VM's declaration (exit 1 with NOT_FOUND if it is not declared).
    Get {
        /// The VM's IP address.
        vm_ip: IpAddr,
    },
    /// Lists declared VMs in IP order (all pages).
    List {
        /// Only VMs inside this prefix, e.g. 10.10.1.0/24.
        #[arg(long, value_parser = parse_prefix)]
        prefix: Option<IpNet>,
    },
}

/// `victorctl migrate ...`
#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Announces that a VM is about to move to an FE (checked against its site policy now).
    Announce {
        /// The VM's IP address.
        vm_ip: IpAddr,
        /// The target FE.
        #[arg(long = "to", value_name = "FE")]
        target_fe: String,
        /// Move the binding now (for hypervisors that send no gratuitous ARP).
        #[arg(long)]
        commit: bool,
        /// How long the announcement stays valid (default 300s, at most 1h).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Withdraws a pending migration announcement (the binding stays where it is). Exit 1 with
    /// NOT_FOUND when there is none, e.g. when a previous cancel already did it.
    Cancel {
        /// The VM's IP address.
        vm_ip: IpAddr,
        /// Cancel only if the announcement is to this FE.
        #[arg(long = "to", value_name = "FE")]
        target_fe: Option<String>,
    },
}

/// `victorctl damping ...`
#[derive(Debug, Subcommand)]
pub enum DampingCommand {
    /// Unfreezes a binding that flap damping holds in place.
    Clear {
        /// The VM's IP address.
        vm_ip: IpAddr,
    },
}

impl Command {
    /// What the command does, for error messages: `binding get 10.10.0.11`.
    pub fn describe(&self) -> String {
        match self {
            Command::Fe(FeCommand::List) => "fe list".into(),
            Command::Fe(FeCommand::Remove { fe_id, .. }) => format!("fe remove {fe_id}"),
            Command::Binding(BindingCommand::Get { vm_ip }) => format!("binding get {vm_ip}"),
            Command::Binding(BindingCommand::List { .. }) => "binding list".into(),
            Command::Binding(BindingCommand::Watch { .. }) => "binding watch".into(),
            Command::Vm(VmCommand::Declare { vm_ip, .. }) => format!("vm declare {vm_ip}"),
            Command::Vm(VmCommand::Undeclare { vm_ip, .. }) => format!("vm undeclare {vm_ip}"),
            Command::Vm(VmCommand::Get { vm_ip }) => format!("vm get {vm_ip}"),
            Command::Vm(VmCommand::List { .. }) => "vm list".into(),
            Command::Migrate(MigrateCommand::Announce { vm_ip, target_fe, .. }) => {
                format!("migrate announce {vm_ip} --to {target_fe}")
            }
            Command::Migrate(MigrateCommand::Cancel { vm_ip, .. }) => format!("migrate cancel {vm_ip}"),
            Command::Damping(DampingCommand::Clear { vm_ip }) => format!("damping clear {vm_ip}"),
            Command::Status => "status".into(),
        }
    }
}

/// A CIDR prefix, with a message that says what to write when it is not one.
fn parse_prefix(text: &str) -> Result<IpNet, String> {
    match victor_proto::types::prefix_problem(text) {
        Some(problem) => Err(problem),
        None => {
            text.parse::<IpNet>().map(|net| net.trunc()).map_err(|_| "is not a CIDR prefix like 10.10.1.0/24".into())
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 500ms, 10s, 5m)"))
}

/// A `--limit`: 0 would list nothing, which is never what was meant.
fn parse_limit(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (omit --limit to list every binding)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e} (a count of bindings, at least 1)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_global_options_anywhere_and_rejects_typos() {
        let cli =
            Cli::try_parse_from(["victorctl", "binding", "get", "10.10.0.11", "-o", "json", "--controller", "a:1,b:2"])
                .unwrap();
        assert_eq!(cli.global.controller, vec!["a:1", "b:2"]);
        assert_eq!(cli.global.output, Output::Json);
        assert!(matches!(cli.command, Command::Binding(BindingCommand::Get { .. })));
        let err = Cli::try_parse_from(["victorctl", "binding", "get", "10.10.0.300"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["victorctl", "vm", "declare", "10.10.0.1", "--mac", "zz"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let cli = Cli::try_parse_from(["victorctl", "migrate", "announce", "10.10.0.1", "--to", "fe2", "--ttl", "2m"])
            .unwrap();
        assert!(
            matches!(cli.command, Command::Migrate(MigrateCommand::Announce { ttl: Some(t), .. }) if t.as_secs() == 120)
        );
    }

    #[test]
    fn limits_are_at_least_one() {
        assert!(parse_limit("0").unwrap_err().contains("at least 1"));
        assert_eq!(parse_limit("7"), Ok(7));
    }

    #[test]
    fn prefixes_and_filters_parse_with_messages_that_say_what_to_fix() {
        let cli =
            Cli::try_parse_from(["victorctl", "binding", "list", "--prefix", "10.10.1.7/24", "--frozen"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Binding(BindingCommand::List { prefix: Some(p), frozen: true, not_frozen: false, .. })
                if p.to_string() == "10.10.1.0/24"
        ));
        let err = Cli::try_parse_from(["victorctl", "vm", "list", "--prefix", "10.10.230.0/33"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("has prefix length 33, longer than 32"), "{err}");
        let err = Cli::try_parse_from(["victorctl", "binding", "list", "--frozen", "--not-frozen"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let cli = Cli::try_parse_from(["victorctl", "fe", "remove", "fe3", "--force"]).unwrap();
        assert!(matches!(cli.command, Command::Fe(FeCommand::Remove { ref fe_id, force: true }) if fe_id == "fe3"));
    }
}
