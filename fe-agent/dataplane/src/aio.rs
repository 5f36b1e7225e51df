//! Registering owned file descriptors with tokio's reactor.

use std::io;
use std::os::fd::AsFd;

use tokio::io::unix::AsyncFd;

/// Registers an owned descriptor (a `socket2::Socket`, an `OwnedFd`) with the current tokio
/// reactor. Must run inside a runtime.
pub(crate) fn register<T: AsFd + std::os::fd::AsRawFd>(owned: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` owns its descriptor (AsFd), so it stays open and the same for as long as the
    // AsyncFd holds `T`, which is what `register` requires.
    Ok(unsafe { AsyncFd::register(owned) }?)
}
