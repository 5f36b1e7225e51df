//! FIB at agent scale: 1,000,000 bindings — bytes per binding (counted by a global allocator)
//! and bulk-load / lookup time. Targets: ≤ 200 B per binding, bulk load ≤ 1 s (release; a
//! debug build gets 10×). Prints the measurements.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::time::Instant;

use victor_dataplane::fib::{Action, Fib};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const N: u32 = 1_000_000;

fn bindings() -> impl Iterator<Item = (Ipv4Addr, Action)> {
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    (0..N).map(move |i| {
        let action =
            if i % 10 == 0 { Action::Local } else { Action::Remote(Ipv4Addr::new(198, 51, 100, (i % 200 + 2) as u8)) };
        (Ipv4Addr::from(base + i), action)
    })
}

#[test]
fn one_million_bindings_fit_the_memory_and_time_budget() {
    let fib = Fib::new(Ipv4Addr::new(198, 51, 100, 1));
    let before = LIVE.load(Relaxed);
    let start = Instant::now();
    let added = fib.extend(bindings()).unwrap();
    let load = start.elapsed();
    // Bulk-load scratch space is freed by now: this is what the table keeps.
    let kept = LIVE.load(Relaxed) - before;
    assert_eq!(added, N as usize);
    let per_binding = kept as f64 / f64::from(N);

    let start = Instant::now();
    let mut hits = 0usize;
    for (ip, action) in bindings() {
        hits += usize::from(fib.lookup(ip) == Some(action));
    }
    let lookup_ns = start.elapsed().as_nanos() as f64 / f64::from(N);
    assert_eq!(hits, N as usize);

    let start = Instant::now();
    fib.replace_all(bindings()).unwrap();
    let replace = start.elapsed();
    assert_eq!(fib.len(), N as usize);

    println!(
        "fib: {N} bindings, {per_binding:.1} B/binding (estimate {:.1}), bulk load {load:?}, \
         replace_all {replace:?}, lookup {lookup_ns:.0} ns",
        fib.heap_bytes() as f64 / f64::from(N)
    );
    assert!(per_binding <= 200.0, "{per_binding} B per binding");
    let budget = if cfg!(debug_assertions) { 10.0 } else { 1.0 };
    assert!(load.as_secs_f64() <= budget, "bulk load took {load:?}");
}
