//! TUN device persistence: whether a device exists in the calling thread's namespace, setting
//! and clearing `TUNSETPERSIST`, attaching and detaching queues (`TUNSETQUEUE`), which device a
//! queue belongs to (`TUNGETIFF`), and deleting a persistent device left by an earlier process.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// True when an interface named `name` exists in the calling thread's network namespace.
pub(crate) fn exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else { return false };
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Sets or clears the persistence flag of the TUN device `fd` is attached to.
pub(crate) fn set_persist(fd: RawFd, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value; `fd` is a TUN descriptor.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETPERSIST, libc::c_ulong::from(persist)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Attaches (`IFF_ATTACH_QUEUE`) or detaches (`IFF_DETACH_QUEUE`) the queue `fd` of a
/// multi-queue device (`TUNSETQUEUE`). A detached queue stays open but gets no packet.
pub(crate) fn set_queue(fd: RawFd, attach: bool) -> io::Result<()> {
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_ifru.ifru_flags = if attach { libc::IFF_ATTACH_QUEUE } else { libc::IFF_DETACH_QUEUE } as libc::c_short;
    // SAFETY: `req` is a valid ifreq for TUNSETQUEUE, alive for the call; `fd` is a TUN queue.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETQUEUE, &mut req as *mut libc::ifreq) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The name of the TUN device the queue `fd` belongs to (`TUNGETIFF`; fails for a queue whose
/// device was deleted).
pub(crate) fn device_name(fd: RawFd) -> io::Result<String> {
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: `req` is a valid ifreq for TUNGETIFF, alive for the call.
    let rc = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let name: Vec<u8> = req.ifr_name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "device name is not UTF-8"))
}

/// Attaches to the existing TUN device `name` with `flags`.
fn attach(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: plain open(2) of a constant path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "TUN name too long"));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: `req` is a valid ifreq for TUNSETIFF, alive for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(fd) }
}

/// Deletes the persistent TUN device `name` in the calling thread's namespace (left by an
/// earlier forwarder with [`super::ForwarderConfig::persist`]): attaches to it with whichever
/// flags it has and clears its persistence flag, so it disappears when the descriptor closes.
/// Returns false when there is no such device.
pub fn remove_persistent(name: &str) -> io::Result<bool> {
    if !exists(name) {
        return Ok(false);
    }
    let base = libc::IFF_TUN | libc::IFF_NO_PI;
    let mut last = io::Error::other("no flag combination attaches");
    for extra in [0, libc::IFF_VNET_HDR, libc::IFF_MULTI_QUEUE, libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE] {
        match attach(name, base | extra) {
            Ok(fd) => {
                set_persist(fd.as_raw_fd(), false)?;
                return Ok(true);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}
