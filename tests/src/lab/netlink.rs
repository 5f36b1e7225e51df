//! Fast link switching for the migration experiment: re-attaching a VM's hypervisor port to
//! another FE's bridge with a netlink socket opened once in the hypervisor namespace (an `ip`
//! process per move would cost milliseconds and blur the link-switch time).

use anyhow::{Context, Result};
use futures::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec};

use super::topology::Topology;

/// An rtnetlink handle inside the hypervisor namespace.
pub struct LinkSwitch {
    handle: Handle,
}

impl LinkSwitch {
    /// Opens a netlink socket inside `topo`'s hypervisor namespace; its connection runs on the
    /// current tokio runtime.
    pub fn open(topo: &Topology) -> Result<LinkSwitch> {
        let runtime = tokio::runtime::Handle::current();
        let rt = runtime.clone();
        let (connection, handle) = topo.hv.run_in(move || -> Result<_> {
            let _entered = rt.enter();
            let (connection, handle, _) = rtnetlink::new_connection().context("netlink socket")?;
            Ok((connection, handle))
        })??;
        runtime.spawn(connection);
        Ok(LinkSwitch { handle })
    }

    async fn index(&self, name: &str) -> Result<u32> {
        let link = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await?
            .with_context(|| format!("no link {name} on the hypervisor"))?;
        Ok(link.header.index)
    }

    /// Resolves hypervisor port `port` and FE `to`'s bridge (done before the timed switch).
    pub async fn prepare(&self, port: &str, to: usize) -> Result<(u32, u32)> {
        Ok((self.index(port).await?, self.index(&format!("br{to}")).await?))
    }

    /// Attaches a prepared port to its new bridge (leaving its current one): one netlink request.
    pub async fn attach(&self, (port, bridge): (u32, u32)) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(port).controller(bridge).build())
            .execute()
            .await
            .context("re-attach port")
    }
}
