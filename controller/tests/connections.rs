//! Connections that hold sockets without being served (a controller process on the embedded
//! store): idle TCP sockets and half HTTP/2 prefaces are closed at the handshake deadline, a full
//! server closes further connections at once instead of leaving them in the backlog, and when one
//! server is full the other still answers.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use victor_testkit::http::{get, metric};

/// Waits until the server closes `socket` (EOF or reset); returns how long that took.
async fn closed_within(socket: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue, // the server's own SETTINGS
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept the connection open for {limit:?}");
    started.elapsed()
}

async fn grpc_answers(addr: SocketAddr) -> bool {
    let endpoint = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    let Ok(Ok(channel)) = tokio::time::timeout(Duration::from_secs(3), endpoint.connect()).await else { return false };
    let mut client = victor_proto::v1::binding_service_client::BindingServiceClient::new(channel);
    let call = client.get_status(victor_proto::v1::GetStatusRequest {});
    matches!(tokio::time::timeout(Duration::from_secs(3), call).await, Ok(Ok(_)))
}

#[tokio::test]
async fn silent_and_half_open_connections_are_closed_and_a_full_server_refuses_at_once() {
    let flags = ["--max-connections", "4", "--max-http-connections", "2", "--handshake-timeout", "2s"];
    let replica = Replica::spawn_embedded("conns", &flags).await;
    let (grpc, http) = (replica.grpc, replica.http);

    // Four sockets take every gRPC place: two silent, one with half a preface, one with half a
    // TLS-less HTTP/2 preface plus garbage.
    let mut held = Vec::new();
    for prefix in [&b""[..], b"", b"PRI * HTTP/2.0\r\n", b"PRI * HTTP/2.0\r\n\r\nSM"] {
        let mut socket = TcpStream::connect(grpc).await.unwrap();
        socket.write_all(prefix).await.unwrap();
        held.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The server is full: a fifth connection is closed at once, not parked in the backlog.
    let mut fifth = TcpStream::connect(grpc).await.unwrap();
    let took = closed_within(&mut fifth, Duration::from_secs(1)).await;
    println!("a connection over the cap was closed after {took:?}");
    // ... while the HTTP admin port still answers.
    assert_eq!(get(http, "/healthz").await.unwrap().0, 200, "the HTTP port stopped answering");

    // Each held socket is closed at the handshake deadline.
    for socket in &mut held {
        let took = closed_within(socket, Duration::from_secs(5)).await;
        assert!(took < Duration::from_secs(4), "closed after {took:?}");
    }
    assert!(grpc_answers(grpc).await, "gRPC did not answer once the silent sockets were gone");

    // The same on the HTTP port: two silent sockets fill it; gRPC still answers; they are closed
    // at the request-head deadline.
    let mut silent = vec![TcpStream::connect(http).await.unwrap(), TcpStream::connect(http).await.unwrap()];
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(get(http, "/healthz").await.is_err(), "the HTTP port served a third connection");
    assert!(grpc_answers(grpc).await, "gRPC stopped answering while the HTTP port was full");
    for socket in &mut silent {
        closed_within(socket, Duration::from_secs(5)).await;
    }
    assert_eq!(get(http, "/healthz").await.unwrap().0, 200);

    let (_, metrics) = get(http, "/metrics").await.unwrap();
    assert!(metric(&metrics, "victor_connections_refused_total", "server=\"grpc\"") >= 1.0);
    assert!(metric(&metrics, "victor_connections_refused_total", "server=\"http\"") >= 1.0);
    let timed_out = metric(&metrics, "victor_connections_timed_out_total", "server=\"grpc\",reason=\"handshake\"");
    assert!(timed_out >= 4.0, "{timed_out} handshake timeouts counted");
}
