//! Learning at once that a process died, before the kernel has released its descriptors: a
//! robust, process-shared mutex in shared memory ([`Held`]) that one parked thread of the
//! process holds for the process's life. The kernel releases a thread's robust locks first thing
//! when it exits (it marks them owner-dead and wakes their waiters) — for a `kill -9`, long
//! before the last thread has torn the address space down and closed the files (2–40 ms on a busy
//! two-core host). The process that waits ([`Watch`]) gets the lock back with `EOWNERDEAD`.
//!
//! The agent holds one for its standby forwarder ([`super::standby`]): the standby starts
//! taking over while the dying agent is still being torn down.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The shared memory: one mutex.
struct Shared {
    fd: OwnedFd,
    mutex: *mut libc::pthread_mutex_t,
}

// SAFETY: the mapping is valid for the life of `Shared` and only used through the pthread
// functions, which are thread-safe.
unsafe impl Send for Shared {}

impl Shared {
    /// Maps the mutex in the memory file `fd`.
    fn map(fd: OwnedFd) -> io::Result<Shared> {
        let len = std::mem::size_of::<libc::pthread_mutex_t>();
        // SAFETY: a fresh shared mapping of `len` bytes of `fd`; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Shared { fd, mutex: ptr.cast() })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, no longer used.
        unsafe { libc::munmap(self.mutex.cast(), std::mem::size_of::<libc::pthread_mutex_t>()) };
    }
}

/// Fails with the pthread error `rc` unless it is 0.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(rc)) }
}

/// The lock this process holds until it dies (a parked thread holds it; the memory stays
/// mapped for the life of the process).
#[derive(Debug)]
pub struct Held {
    fd: OwnedFd,
}

impl Held {
    /// Creates the mutex and has a new thread of this process lock it for good.
    pub fn new() -> io::Result<Held> {
        // SAFETY: memfd_create with a constant name.
        let raw = unsafe { libc::memfd_create(c"victor-fe-agent-death".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = std::mem::size_of::<libc::pthread_mutex_t>() as libc::off_t;
        // SAFETY: ftruncate of our memory file.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let shared = Shared::map(fd.try_clone()?)?;
        // SAFETY: the attribute is initialised before use and destroyed after; the mutex lives in
        // the shared mapping, initialised once, before anyone else maps it.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            check(libc::pthread_mutexattr_init(&mut attr))?;
            let init = check(libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED))
                .and_then(|()| check(libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST)))
                .and_then(|()| check(libc::pthread_mutex_init(shared.mutex, &attr)));
            libc::pthread_mutexattr_destroy(&mut attr);
            init?;
        }
        let (locked_tx, locked) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new().name("death-lock".into()).spawn(move || {
            let shared = shared;
            // SAFETY: the mutex initialised above, in memory that stays mapped (`shared` lives
            // in this thread, which never ends).
            let rc = unsafe { libc::pthread_mutex_lock(shared.mutex) };
            let _ = locked_tx.send(check(rc));
            if rc == 0 {
                loop {
                    std::thread::park();
                }
            }
        })?;
        locked.recv().map_err(|_| io::Error::other("the death-lock thread ended"))??;
        Ok(Held { fd })
    }

    /// The memory file, to pass to the process that watches (see [`Watch::new`]).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

/// Waits for the death of the process holding the mutex in a memory file ([`Held`]).
pub struct Watch {
    shared: Shared,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("fd", &self.shared.fd).finish_non_exhaustive()
    }
}

impl Watch {
    /// Watches the mutex in memory file `fd` (passed by the process that holds it).
    pub fn new(fd: OwnedFd) -> io::Result<Watch> {
        Ok(Watch { shared: Shared::map(fd)? })
    }

    /// Blocks until the holder is gone (its thread died holding the lock): true. False if the
    /// watch failed (the lock could not be taken, or was given back): the holder may live.
    pub fn wait(self) -> bool {
        // SAFETY: the mutex its holder initialised, mapped for the life of `self`.
        let rc = unsafe { libc::pthread_mutex_lock(self.shared.mutex) };
        if rc == libc::EOWNERDEAD {
            // SAFETY: we own the lock now; marking it consistent lets it be unlocked.
            unsafe { libc::pthread_mutex_consistent(self.shared.mutex) };
        }
        if rc == 0 || rc == libc::EOWNERDEAD {
            // SAFETY: we own the lock.
            unsafe { libc::pthread_mutex_unlock(self.shared.mutex) };
        }
        rc == libc::EOWNERDEAD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watch does not end while the holder lives (its thread holds the lock for good).
    #[test]
    fn a_living_holder_keeps_the_watch_waiting() {
        let held = Held::new().unwrap();
        let watch = Watch::new(held.fd().try_clone().unwrap()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(watch.wait()));
        assert!(rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(), "the watch ended while we live");
    }
}
