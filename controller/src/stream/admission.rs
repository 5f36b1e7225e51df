//! Stream admission: how many long-lived streams (`Sync`, `WatchBindings`) this replica serves,
//! in all and per client connection. A stream over a limit is refused with `RESOURCE_EXHAUSTED`
//! and a message naming the limit (its flag and value), before anything is read from the cache.
//! An admitted stream holds a [`StreamTicket`] for its whole life; dropping it frees the place.
//!
//! Connections are told apart by the client's address and port (unique while the connection is
//! open); a request without one (not over TCP) is only subject to the replica-wide limits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;

/// The limits (flags `--max-streams-per-connection`, `--max-agent-streams`, `--max-watch-streams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Streams of either kind open on one client connection.
    pub per_connection: usize,
    /// `Sync` streams on this replica.
    pub agent: usize,
    /// `WatchBindings` streams on this replica.
    pub watch: usize,
}

/// The kind of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// `AgentService.Sync`.
    Agent,
    /// `BindingService.WatchBindings`.
    Watch,
}

/// Why a stream was refused; the message says which limit and how to get under it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The client connection already has its share of streams.
    #[error(
        "this connection already has {0} open streams (Sync and WatchBindings together), the limit set by \
         --max-streams-per-connection={0}; close a stream or open another connection"
    )]
    Connection(usize),
    /// The replica serves as many agent streams as it may.
    #[error(
        "this controller replica already serves {0} agent streams (Sync), the limit set by --max-agent-streams={0}; \
         connect to another replica or retry later"
    )]
    Agent(usize),
    /// The replica serves as many binding watches as it may.
    #[error(
        "this controller replica already serves {0} binding watches (WatchBindings), the limit set by \
         --max-watch-streams={0}; close a watch, use another replica or retry later"
    )]
    Watch(usize),
}

impl Refused {
    /// The metric label of the limit.
    pub fn label(&self) -> &'static str {
        match self {
            Refused::Connection(_) => "connection",
            Refused::Agent(_) => "agent",
            Refused::Watch(_) => "watch",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    agent: usize,
    watch: usize,
    per_connection: HashMap<SocketAddr, usize>,
}

/// The replica's stream admission.
#[derive(Debug)]
pub struct Admission {
    limits: StreamLimits,
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
}

/// An admitted stream's place; dropping it frees the place.
#[derive(Debug)]
pub struct StreamTicket {
    admission: Arc<Admission>,
    kind: StreamKind,
    peer: Option<SocketAddr>,
}

impl Admission {
    /// Admission under `limits`, counting refusals in `metrics`.
    pub fn new(limits: StreamLimits, metrics: Arc<Metrics>) -> Arc<Admission> {
        Arc::new(Admission { limits, counts: Mutex::default(), metrics })
    }

    /// The limits.
    pub fn limits(&self) -> StreamLimits {
        self.limits
    }

    /// Admits a stream of `kind` from the connection of `peer`, or says which limit it is over.
    pub fn admit(self: &Arc<Self>, kind: StreamKind, peer: Option<SocketAddr>) -> Result<StreamTicket, Refused> {
        let result = self.try_admit(kind, peer);
        if let Err(refused) = &result {
            self.metrics.stream_refused(refused.label());
            tracing::debug!(?peer, %refused, "stream refused");
        }
        result
    }

    fn try_admit(self: &Arc<Self>, kind: StreamKind, peer: Option<SocketAddr>) -> Result<StreamTicket, Refused> {
        let mut counts = self.counts.lock().expect("admission lock");
        let on_connection = peer.map_or(0, |p| counts.per_connection.get(&p).copied().unwrap_or(0));
        if peer.is_some() && on_connection >= self.limits.per_connection {
            return Err(Refused::Connection(self.limits.per_connection));
        }
        match kind {
            StreamKind::Agent if counts.agent >= self.limits.agent => return Err(Refused::Agent(self.limits.agent)),
            StreamKind::Watch if counts.watch >= self.limits.watch => return Err(Refused::Watch(self.limits.watch)),
            StreamKind::Agent => counts.agent += 1,
            StreamKind::Watch => counts.watch += 1,
        }
        if let Some(p) = peer {
            *counts.per_connection.entry(p).or_default() += 1;
        }
        Ok(StreamTicket { admission: self.clone(), kind, peer })
    }

    /// Streams of `kind` admitted now.
    pub fn open(&self, kind: StreamKind) -> usize {
        let counts = self.counts.lock().expect("admission lock");
        match kind {
            StreamKind::Agent => counts.agent,
            StreamKind::Watch => counts.watch,
        }
    }
}

impl Drop for StreamTicket {
    fn drop(&mut self) {
        let mut counts = self.admission.counts.lock().expect("admission lock");
        match self.kind {
            StreamKind::Agent => counts.agent -= 1,
            StreamKind::Watch => counts.watch -= 1,
        }
        if let Some(p) = self.peer
            && let Some(n) = counts.per_connection.get_mut(&p)
        {
            *n -= 1;
            if *n == 0 {
                counts.per_connection.remove(&p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(per_connection: usize, agent: usize, watch: usize) -> Arc<Admission> {
        Admission::new(StreamLimits { per_connection, agent, watch }, Arc::new(Metrics::new()))
    }

    #[test]
    fn limits_per_connection_and_per_kind_and_tickets_free_their_place() {
        let a = admission(2, 3, 1);
        let c1: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let c2: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let t1 = a.admit(StreamKind::Agent, Some(c1)).unwrap();
        let t2 = a.admit(StreamKind::Watch, Some(c1)).unwrap();
        assert_eq!(a.admit(StreamKind::Agent, Some(c1)).unwrap_err(), Refused::Connection(2));
        assert_eq!(a.admit(StreamKind::Watch, Some(c2)).unwrap_err(), Refused::Watch(1));
        let t3 = a.admit(StreamKind::Agent, Some(c2)).unwrap();
        let t4 = a.admit(StreamKind::Agent, None).unwrap();
        assert_eq!(a.admit(StreamKind::Agent, None).unwrap_err(), Refused::Agent(3));
        assert_eq!((a.open(StreamKind::Agent), a.open(StreamKind::Watch)), (3, 1));
        drop(t2);
        let t5 = a.admit(StreamKind::Watch, Some(c1)).unwrap();
        drop((t1, t3, t4, t5));
        assert_eq!((a.open(StreamKind::Agent), a.open(StreamKind::Watch)), (0, 0));
        assert!(a.counts.lock().unwrap().per_connection.is_empty(), "no connection entry left behind");
    }

    #[test]
    fn refusals_name_the_flag_and_its_value() {
        let text = Refused::Connection(16).to_string();
        assert!(text.contains("--max-streams-per-connection=16"), "{text}");
        assert!(Refused::Agent(4096).to_string().contains("--max-agent-streams=4096"));
        assert!(Refused::Watch(256).to_string().contains("--max-watch-streams=256"));
    }
}
