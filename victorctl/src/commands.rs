//! One function per subcommand: build the request, call through [`Controllers`] (fail-over
//! included), print the answer as a table or JSON.

use std::io::Write;
use std::time::Instant;

use ipnet::IpNet;
use serde_json::{Value, json};
use tonic::Code;
use victor_proto::v1::*;

use crate::cli::{
    BindingCommand, Cli, Command, DampingCommand, FeCommand, MigrateCommand, Output, SourceArg, VmCommand,
};
use crate::client::Controllers;
use crate::error::{CtlError, code_name};
use crate::render;

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let mut ctl = Controllers::new(&cli.global)?;
    let out = Printer(cli.global.output);
    match cli.command {
        Command::Status => {
            let s = ctl.call(|mut c| async move { c.get_status(GetStatusRequest {}).await }).await?;
            out.one(render::status(&s), || render::status_lines(&s))
        }
        Command::Fe(cmd) => fe(&mut ctl, out, cmd).await,
        Command::Binding(cmd) => binding(&mut ctl, out, cmd).await,
        Command::Vm(cmd) => vm(&mut ctl, out, cmd).await,
        Command::Migrate(MigrateCommand::Announce { vm_ip, target_fe, commit, ttl }) => {
            let ttl_seconds = match ttl {
                None => 0,
                Some(t) if t.as_secs() == 0 || t.as_secs() > u64::from(u32::MAX) => {
                    return Err(CtlError::Usage(format!(
                        "--ttl {} must be at least 1s",
                        humantime::format_duration(t)
                    )));
                }
                Some(t) => t.as_secs() as u32,
            };
            let req =
                AnnounceMigrationRequest { vm_ip: vm_ip.to_string(), target_fe_id: target_fe, commit, ttl_seconds };
            let b = ctl
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.announce_migration(r).await }
                })
                .await?;
            out.binding(&b.binding.unwrap_or_default())
        }
        Command::Migrate(MigrateCommand::Cancel { vm_ip, target_fe }) => {
            let req = CancelMigrationRequest { vm_ip: vm_ip.to_string(), target_fe_id: target_fe.unwrap_or_default() };
            let r = ctl
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.cancel_migration(r).await }
                })
                .await?;
            out.one(
                json!({
                    "vm_ip": vm_ip.to_string(),
                    "cancelled_fe_id": r.cancelled_fe_id,
                    "revision": r.revision,
                    "binding": render::binding(&r.binding.clone().unwrap_or_default()),
                }),
                || {
                    let at = r.binding.as_ref().map(|b| b.fe_id.as_str()).unwrap_or("");
                    format!(
                        "{vm_ip}: migration to {} cancelled at revision {}; stays at {at}\n",
                        r.cancelled_fe_id, r.revision
                    )
                },
            )
        }
        Command::Damping(DampingCommand::Clear { vm_ip }) => {
            let req = ClearDampingRequest { vm_ip: vm_ip.to_string() };
            let b = ctl
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.clear_damping(r).await }
                })
                .await?;
            out.binding(&b.binding.unwrap_or_default())
        }
    }
}

async fn fe(ctl: &mut Controllers, out: Printer, cmd: FeCommand) -> Result<(), CtlError> {
    match cmd {
        FeCommand::List => {
            let fes = ctl.call(|mut c| async move { c.list_fes(ListFesRequest {}).await }).await?.fes;
            out.many(fes.iter().map(render::fe).collect(), &render::FE_HEADER, fes.iter().map(render::fe_row).collect())
        }
        FeCommand::Remove { fe_id, force } => {
            let req = RemoveFeRequest { fe_id: fe_id.clone(), force };
            let r = ctl
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.remove_fe(r).await }
                })
                .await?;
            out.one(
                json!({
                    "fe_id": fe_id,
                    "revision": r.revision,
                    "removed_bindings": r.removed_bindings,
                    "cancelled_announcements": r.cancelled_announcements,
                }),
                || {
                    format!(
                        "FE {fe_id} removed at revision {} ({} binding(s) removed, {} announcement(s) cancelled)\n",
                        r.revision, r.removed_bindings, r.cancelled_announcements
                    )
                },
            )
        }
    }
}

async fn binding(ctl: &mut Controllers, out: Printer, cmd: BindingCommand) -> Result<(), CtlError> {
    match cmd {
        BindingCommand::Get { vm_ip } => {
            let req = GetBindingRequest { vm_ip: vm_ip.to_string() };
            let b = ctl
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.get_binding(r).await }
                })
                .await?;
            out.binding(&b)
        }
        BindingCommand::List { fe, prefix, frozen, not_frozen, source, limit } => {
            let frozen = match (frozen, not_frozen) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let source = match source {
                None => BindingSource::Unspecified,
                Some(SourceArg::Arp) => BindingSource::Arp,
                Some(SourceArg::Orchestrator) => BindingSource::Orchestrator,
            };
            let mut bindings = Vec::new();
            let mut page_token = String::new();
            loop {
                let req = ListBindingsRequest {
                    page_size: limit.map_or(1000, |l| l.clamp(1, 1000) as u32),
                    page_token: page_token.clone(),
                    fe_id: fe.clone().unwrap_or_default(),
                    prefix: prefix.map(|p| p.to_string()).unwrap_or_default(),
                    frozen,
                    source: source as i32,
                };
                let page = ctl
                    .call(|mut c| {
                        let r = req.clone();
                        async move { c.list_bindings(r).await }
                    })
                    .await?;
                bindings.extend(page.bindings);
                if limit.is_some_and(|l| bindings.len() >= l) {
                    bindings.truncate(limit.unwrap_or(usize::MAX));
                    break;
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            out.many(
                bindings.iter().map(render::binding).collect(),
                &render::BINDING_HEADER,
                bindings.iter().map(render::binding_row).collect(),
            )
        }
        BindingCommand::Watch { prefix, fe, snapshot, from_revision, count, duration } => {
            let deadline = duration.map(|d| Instant::now() + d);
            let filter = WatchBindingsRequest {
                prefix: prefix.map(|p| p.to_string()).unwrap_or_default(),
                fe_id: fe.unwrap_or_default(),
                ..Default::default()
            };
            let watch = watch(ctl, out, filter, snapshot, from_revision, count);
            match deadline {
                None => watch.await,
                Some(at) => match tokio::time::timeout_at(at.into(), watch).await {
                    Ok(result) => result,
                    Err(_) => Ok(()),
                },
            }
        }
    }
}

/// Follows WatchBindings (with the filters of `filter`); when the stream breaks (controller gone or
/// shutting down) it resumes on the next controller from the last revision it printed, so no
/// change is lost or repeated.
async fn watch(
    ctl: &mut Controllers,
    out: Printer,
    filter: WatchBindingsRequest,
    snapshot: bool,
    from_revision: u64,
    count: Option<u64>,
) -> Result<(), CtlError> {
    let mut seen = 0u64;
    let mut cursor = from_revision;
    let mut include_snapshot = snapshot;
    let mut header_printed = false;
    let mut ip_width = IPV4_WIDTH;
    if count == Some(0) {
        return Ok(());
    }
    if cursor == 0 && !snapshot {
        // Pin "from now" to a revision, so a resume on another controller misses nothing even if
        // the stream breaks before its first message.
        cursor = ctl.call(|mut c| async move { c.get_status(GetStatusRequest {}).await }).await?.cache_revision;
    }
    loop {
        let req = WatchBindingsRequest { from_revision: cursor, include_snapshot, ..filter.clone() };
        let mut stream = ctl
            .call(|mut c| {
                let r = req.clone();
                async move { c.watch_bindings(r).await }
            })
            .await?;
        if out.0 == Output::Table && !header_printed {
            header_printed = true;
            if !filter.prefix.parse::<IpNet>().is_ok_and(|p| p.addr().is_ipv4()) {
                let status = ctl.call(|mut c| async move { c.get_status(GetStatusRequest {}).await }).await?;
                ip_width = watch_ip_width(&filter.prefix, &status.mobile_prefixes);
            }
            out.line(&watch_row(&["REVISION", "EVENT", "VM_IP", "FE", "MOVES", "STATE"], ip_width))?;
        }
        let broke = loop {
            match stream.message().await {
                Ok(Some(msg)) => {
                    for e in &msg.events {
                        out.event(msg.revision, e, ip_width)?;
                        seen += 1;
                        if count.is_some_and(|c| seen >= c) {
                            return Ok(());
                        }
                    }
                    if msg.snapshot_done {
                        include_snapshot = false;
                        match out.0 {
                            Output::Json => {
                                out.line(&format!("{}\n", json!({"revision": msg.revision, "snapshot_done": true})))?
                            }
                            Output::Table => {
                                out.line(&format!("# snapshot complete at revision {}\n", msg.revision))?
                            }
                        }
                    }
                    // Only advance once a snapshot is complete: a resume must not skip its rest.
                    if !include_snapshot {
                        cursor = cursor.max(msg.revision);
                    }
                }
                Ok(None) => break "the stream ended".to_owned(),
                Err(status) if matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal) => {
                    break format!("{}: {}", code_name(status.code()), status.message());
                }
                Err(status) => return Err(CtlError::from_status(ctl.current_address(), status)),
            }
        };
        eprintln!(
            "victorctl: watch on {} broke ({broke}); resuming after revision {cursor} on the next controller",
            ctl.current_address()
        );
        ctl.skip_current();
    }
}

async fn vm(ctl: &mut Controllers, out: Printer, cmd: VmCommand) -> Result<(), CtlError> {
    match cmd {
        VmCommand::Declare { vm_ip, mac, sites, description } => {
            let req = DeclareVmRequest {
                vm_ip: vm_ip.to_string(),
                mac: mac.to_string(),
                site_policy: (!sites.is_empty()).then(|| SitePolicy { allowed_sites: sites.clone() }),
                description,
            };
            let v = ctl
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.declare_vm(r).await }
                })
                .await?;
            let v = v.vm.unwrap_or_default();
            out.many_or_one(render::vm(&v), &render::VM_HEADER, vec![render::vm_row(&v)])
        }
        VmCommand::Undeclare { vm_ip, remove_binding } => {
            let req = UndeclareVmRequest { vm_ip: vm_ip.to_string(), remove_binding };
            let r = ctl
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.undeclare_vm(r).await }
                })
                .await?;
            let what = if remove_binding { "undeclared, binding removed" } else { "undeclared" };
            out.one(
                json!({"vm_ip": vm_ip.to_string(), "removed_binding": remove_binding, "revision": r.revision}),
                || format!("{vm_ip} {what} at revision {}\n", r.revision),
            )
        }
        VmCommand::Get { vm_ip } => {
            let req = GetVmRequest { vm_ip: vm_ip.to_string() };
            let v = ctl
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.get_vm(r).await }
                })
                .await?;
            out.many_or_one(render::vm(&v), &render::VM_HEADER, vec![render::vm_row(&v)])
        }
        VmCommand::List { prefix } => {
            let mut vms = Vec::new();
            let mut page_token = String::new();
            loop {
                let req = ListVmsRequest {
                    page_size: 1000,
                    page_token: page_token.clone(),
                    prefix: prefix.map(|p| p.to_string()).unwrap_or_default(),
                };
                let page = ctl
                    .call(|mut c| {
                        let r = req.clone();
                        async move { c.list_vms(r).await }
                    })
                    .await?;
                vms.extend(page.vms);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            out.many(vms.iter().map(render::vm).collect(), &render::VM_HEADER, vms.iter().map(render::vm_row).collect())
        }
    }
}

/// Prints in the chosen format.
#[derive(Debug, Clone, Copy)]
struct Printer(Output);

impl Printer {
    fn line(&self, text: &str) -> Result<(), CtlError> {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
        Ok(())
    }

    fn one(&self, json: Value, text: impl FnOnce() -> String) -> Result<(), CtlError> {
        match self.0 {
            Output::Json => self.line(&format!("{json:#}\n")),
            Output::Table => self.line(&text()),
        }
    }

    fn many(&self, json: Vec<Value>, header: &[&str], rows: Vec<Vec<String>>) -> Result<(), CtlError> {
        self.one(Value::Array(json), || render::table(header, &rows))
    }

    fn many_or_one(&self, json: Value, header: &[&str], rows: Vec<Vec<String>>) -> Result<(), CtlError> {
        self.one(json, || render::table(header, &rows))
    }

    fn binding(&self, b: &Binding) -> Result<(), CtlError> {
        self.many_or_one(render::binding(b), &render::BINDING_HEADER, vec![render::binding_row(b)])
    }

    /// One watch event; in table mode with a VM_IP column `ip_width` wide.
    fn event(&self, revision: u64, e: &BindingEvent, ip_width: usize) -> Result<(), CtlError> {
        match self.0 {
            Output::Json => self.line(&format!("{}\n", render::event(revision, e))),
            Output::Table => {
                let j = render::event(revision, e);
                let b = &j["binding"];
                let state = if b["frozen"].as_bool() == Some(true) { "frozen" } else { "" };
                let moves = b["move_seq"].as_u64().map(|m| m.to_string()).unwrap_or_else(|| "-".into());
                let revision = revision.to_string();
                self.line(&watch_row(
                    &[
                        &revision,
                        j["kind"].as_str().unwrap_or(""),
                        b["vm_ip"].as_str().unwrap_or(""),
                        b["fe_id"].as_str().unwrap_or("-"),
                        &moves,
                        state,
                    ],
                    ip_width,
                ))
            }
        }
    }
}

/// Width of the longest IPv4 address text (255.255.255.255).
const IPV4_WIDTH: usize = 15;
/// Width of the longest IPv6 address text (eight groups of four hex digits).
const IPV6_WIDTH: usize = 39;

/// The VM_IP column width of a watch of `prefix` (empty: every binding) on a controller serving
/// `mobile_prefixes`: an IPv6 address fits unless only IPv4 VMs can show up.
fn watch_ip_width(prefix: &str, mobile_prefixes: &[String]) -> usize {
    let ipv6 = |p: &str| p.parse::<IpNet>().is_ok_and(|p| p.addr().is_ipv6());
    let only_ipv4 = if prefix.is_empty() { !mobile_prefixes.iter().any(|p| ipv6(p)) } else { !ipv6(prefix) };
    if only_ipv4 { IPV4_WIDTH } else { IPV6_WIDTH }
}

/// One line of `binding watch` in table mode (fixed widths: rows stream, so no global alignment;
/// the VM_IP column is `ip_width` wide).
fn watch_row(cells: &[&str; 6], ip_width: usize) -> String {
    let [revision, kind, ip, fe, moves, state] = cells;
    format!("{revision:<10}  {kind:<6}  {ip:<ip_width$}  {fe:<12}  {moves:<5}  {state}").trim_end().to_owned() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_rows_fit_ipv6_addresses_when_ipv6_vms_can_show_up() {
        let v4 = ["10.10.0.0/16".to_owned()];
        let dual = ["10.10.0.0/16".to_owned(), "fd00:10::/64".to_owned()];
        assert_eq!(watch_ip_width("", &v4), IPV4_WIDTH);
        assert_eq!(watch_ip_width("", &dual), IPV6_WIDTH);
        assert_eq!(watch_ip_width("10.10.1.0/24", &dual), IPV4_WIDTH);
        assert_eq!(watch_ip_width("fd00:10::/64", &dual), IPV6_WIDTH);
        let ip = "fd00:10:ffff:ffff:ffff:ffff:ffff:ffff";
        let header = watch_row(&["REVISION", "EVENT", "VM_IP", "FE", "MOVES", "STATE"], IPV6_WIDTH);
        let row = watch_row(&["7", "upsert", ip, "fe2", "0", ""], IPV6_WIDTH);
        assert_eq!(header.find("FE"), row.find("fe2"), "{header}{row}");
    }
}
