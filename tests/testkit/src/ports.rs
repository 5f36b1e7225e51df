//! Free TCP ports on loopback for daemons started by tests.

use std::net::{SocketAddr, TcpListener};

/// A currently free loopback port. The OS picks it (bind to port 0), so concurrent tests and
/// concurrent runs do not collide; the tiny race between release and reuse is accepted.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local_addr").port()
}

/// A free `127.0.0.1:<port>` address.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}
