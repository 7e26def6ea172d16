//! Which protocol a plain connection speaks: HTTP/1.1, or HTTP/2 with prior knowledge (h2c),
//! learned by peeking at its first bytes for the HTTP/2 preface without consuming them, so
//! that hyper's own HTTP/1 or HTTP/2 server then reads them. TLS connections are not sniffed:
//! ALPN chooses (`conn::serve`).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::conn::Builders;

/// What an HTTP/2 client sends first (RFC 9113 §3.4); on a plain port it asks for h2c.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// True when a plain connection opens with the HTTP/2 preface. Looks without consuming:
/// hyper then reads the bytes itself. A client that sends part of the preface and stops is
/// waited for with a growing pause (the caller bounds the whole wait).
async fn opens_with_h2_preface(stream: &TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Whether a plain connection asks for h2c, learned within `header_read_timeout`; `None`
/// (logged) when the client failed or sent nothing usable in that time.
pub(super) async fn plain_protocol(
    stream: &TcpStream,
    builders: &Builders,
    peer: SocketAddr,
) -> Option<bool> {
    match tokio::time::timeout(builders.header_read, opens_with_h2_preface(stream)).await {
        Ok(Ok(h2)) => Some(h2),
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "connection failed before a request");
            None
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "no request before header_read_timeout");
            None
        }
    }
}
