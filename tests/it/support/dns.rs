//! `TestDns`: a real DNS server on 127.0.0.1 (UDP and TCP) answering A queries for any name
//! with the addresses set at run time, and a TTL; it counts the queries it answers.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

struct State {
    answers: Mutex<Vec<Ipv4Addr>>,
    ttl: u32,
    queries: AtomicUsize,
}

#[derive(Clone)]
pub struct TestDns {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl TestDns {
    pub async fn start(answers: &[Ipv4Addr], ttl: u32) -> TestDns {
        // UDP and TCP on one port: the ephemeral port the UDP socket got may be taken for TCP
        // (another test's connection), so try again with a new one.
        let mut tries = 0;
        let (udp, tcp, addr) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
            let addr = udp.local_addr().expect("addr");
            match TcpListener::bind(addr).await {
                Ok(tcp) => break (udp, tcp, addr),
                Err(_) if tries < 20 => tries += 1,
                Err(e) => panic!("bind dns tcp: {e}"),
            }
        };
        let state = Arc::new(State {
            answers: Mutex::new(answers.to_vec()),
            ttl,
            queries: AtomicUsize::new(0),
        });
        let st = state.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                if let Some(reply) = answer(&st, &buf[..n]) {
                    let _ = udp.send_to(&reply, from).await;
                }
            }
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let mut len = [0u8; 2];
                    while stream.read_exact(&mut len).await.is_ok() {
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if stream.read_exact(&mut q).await.is_err() {
                            return;
                        }
                        let Some(reply) = answer(&st, &q) else { return };
                        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&reply);
                        if stream.write_all(&framed).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TestDns { addr, state }
    }

    /// Answers from now on.
    pub fn set(&self, answers: &[Ipv4Addr]) {
        *self.state.answers.lock().expect("lock") = answers.to_vec();
    }

    /// A queries answered so far.
    pub fn queries(&self) -> usize {
        self.state.queries.load(Ordering::SeqCst)
    }
}

/// The reply to one query: the question echoed, and A records for an A question (none for
/// any other type, which is a valid empty answer).
fn answer(st: &State, q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    // The question: labels up to a zero byte, then type and class.
    let mut i = 12;
    while *q.get(i)? != 0 {
        i += 1 + usize::from(q[i]);
    }
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    let question = &q[12..i + 5];
    let answers = if qtype == 1 {
        st.queries.fetch_add(1, Ordering::SeqCst);
        st.answers.lock().ok()?.clone()
    } else {
        Vec::new()
    };
    let mut r = Vec::with_capacity(512);
    r.extend_from_slice(&q[0..2]); // id
    r.extend_from_slice(&[0x81, 0x80]); // response, recursion desired and available, no error
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(question);
    for a in answers {
        r.extend_from_slice(&[0xc0, 0x0c]); // the name: a pointer to the question's
        r.extend_from_slice(&1u16.to_be_bytes()); // A
        r.extend_from_slice(&1u16.to_be_bytes()); // IN
        r.extend_from_slice(&st.ttl.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&a.octets());
    }
    Some(r)
}
