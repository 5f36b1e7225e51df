//! Agent memory per binding at 1,000,000 bindings: the desired state (FE ids interned) plus the
//! data plane's forwarding table, measured with a counting allocator — target ≤ 200 B/binding.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use victor_dataplane::fib::{Action, Fib};
use victor_fe_agent::state::desired::DesiredState;
use victor_proto::v1::{BindingEntry, FeEntry, SyncPhase, SyncUpdate};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const BINDINGS: u32 = 1_000_000;
const FES: u32 = 1_000;
const CHUNK: u32 = 20_000;

#[test]
fn agent_bytes_per_binding_at_one_million() {
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    let fe_id = |i: u32| format!("fe-{:04}", i % FES);
    let before = LIVE.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut desired = DesiredState::new("fe-0000");
    let fib = Arc::new(Fib::with_capacity(Ipv4Addr::new(198, 51, 100, 1), BINDINGS as usize));
    let mut start = 0;
    while start < BINDINGS {
        let end = (start + CHUNK).min(BINDINGS);
        let mut msg = SyncUpdate {
            phase: if end == BINDINGS { SyncPhase::SnapshotEnd } else { SyncPhase::Snapshot } as i32,
            revision: 2_000_000,
            reset: start == 0,
            ..Default::default()
        };
        if start == 0 {
            msg.fe_upserts = (0..FES)
                .map(|i| FeEntry {
                    fe_id: fe_id(i),
                    underlay_addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 0, 0)) + i + 1).octets().to_vec(),
                    up: true,
                    revision: 1 + u64::from(i),
                    ..Default::default()
                })
                .collect();
        }
        msg.binding_upserts = (start..end)
            .map(|i| BindingEntry {
                vm_ip: Ipv4Addr::from(base + i).octets().to_vec(),
                fe_id: fe_id(i),
                mac: vec![2, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8, 1],
                move_seq: 0,
                revision: 10_000 + u64::from(i),
                pending_fe_id: String::new(),
            })
            .collect();
        let applied = desired.apply(&msg).unwrap();
        if end == BINDINGS {
            assert!(applied.snapshot_completed);
            assert_eq!(applied.bindings.len(), BINDINGS as usize);
            // What the reconciler does for remote bindings on the userspace data plane.
            let actions = applied.bindings.iter().filter_map(|&(ip, _)| {
                let b = desired.binding(ip)?;
                Some((ip, desired.peer_of(&b).map_or(Action::Local, Action::Remote)))
            });
            fib.extend(actions).unwrap();
        }
        start = end;
    }
    let elapsed = started.elapsed();
    let after = LIVE.load(Ordering::Relaxed);
    let total = (after - before) as f64;
    let per = total / f64::from(BINDINGS);
    let desired_est = desired.heap_bytes() as f64 / f64::from(BINDINGS);
    let fib_est = fib.heap_bytes() as f64 / f64::from(BINDINGS);
    println!(
        "agent memory at {BINDINGS} bindings / {FES} FEs: {per:.1} B/binding measured \
         (desired state ≈ {desired_est:.1}, forwarding table ≈ {fib_est:.1}); full sync of the \
         desired state + forwarding table in {elapsed:?}"
    );
    assert_eq!(desired.len(), BINDINGS as usize);
    assert_eq!(fib.len(), BINDINGS as usize);
    assert!(per <= 200.0, "{per:.1} B/binding exceeds the 200 B target");
}
