//! Socket settings every server of ours shares.

/// Turns Nagle's algorithm off on an accepted connection. Our servers answer
/// with small frames (a shard's last output, `InvokeComplete`, a Runtime API
/// reply); held back until the peer's delayed ACK, each would wait ~40 ms.
pub fn no_delay(tcp: &mut tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
}
