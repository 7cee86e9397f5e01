//! A stub DNS server on loopback UDP whose answers tests script per name
//! (including answers that change from one query to the next, as in DNS
//! rebinding), and a "secret" listener on another 127/8 address that counts
//! the connections it accepts, so a test can prove a refused address saw none.
//!
//! Owns its sockets and tasks, aborted on drop. Hand-rolled wire format (RFC
//! 1035): it must not share code with the resolver under test.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// Answers A and AAAA queries from a script; unknown names get NXDOMAIN.
pub struct StubDns {
    addr: SocketAddr,
    /// Per lower-case name: the answers still to give, in order; the last one
    /// repeats. Each answer is one address (A or AAAA by its family).
    script: Arc<Mutex<HashMap<String, Vec<IpAddr>>>>,
    queries: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl StubDns {
    pub async fn start() -> StubDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind stub dns");
        let addr = socket.local_addr().unwrap();
        let script: Arc<Mutex<HashMap<String, Vec<IpAddr>>>> = Arc::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let task = {
            let script = script.clone();
            let queries = queries.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                loop {
                    let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                        return;
                    };
                    queries.fetch_add(1, Ordering::SeqCst);
                    if let Some(reply) = answer(&buf[..len], &script) {
                        let _ = socket.send_to(&reply, peer).await;
                    }
                }
            })
        };
        StubDns {
            addr,
            script,
            queries,
            task,
        }
    }

    /// `ip:port` to put in `network.nameservers`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `name` resolves to each of `answers` in turn, then to the last forever.
    pub fn resolve(&self, name: &str, answers: &[&str]) {
        let ips = answers.iter().map(|a| a.parse().expect("ip")).collect();
        self.script
            .lock()
            .unwrap()
            .insert(name.to_ascii_lowercase(), ips);
    }

    /// Queries received so far (A and AAAA both count).
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for StubDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply to one query, or None for a packet that is not one.
fn answer(query: &[u8], script: &Mutex<HashMap<String, Vec<IpAddr>>>) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let (name, question_end) = read_name(query, 12)?;
    let qtype = u16::from_be_bytes([*query.get(question_end)?, *query.get(question_end + 1)?]);
    let question = query.get(12..question_end + 4)?;

    // The address for this query: A queries consume the script; AAAA
    // queries see the same current answer without consuming it.
    let mut script = script.lock().unwrap();
    let found = script.get_mut(&name).map(|answers| {
        let current = answers[0];
        if qtype == TYPE_A && answers.len() > 1 {
            answers.remove(0);
        }
        current
    });
    drop(script);

    let records: Vec<IpAddr> = match found {
        Some(ip @ IpAddr::V4(_)) if qtype == TYPE_A => vec![ip],
        Some(ip @ IpAddr::V6(_)) if qtype == TYPE_AAAA => vec![ip],
        _ => vec![],
    };
    let rcode = if found.is_none() { 3 } else { 0 };
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(&query[0..2]); // id
    reply.extend_from_slice(&[0x81, 0x80 | rcode]); // response, RD, RA, rcode
    reply.extend_from_slice(&1u16.to_be_bytes()); // questions
    reply.extend_from_slice(&(records.len() as u16).to_be_bytes()); // answers
    reply.extend_from_slice(&[0, 0, 0, 0]); // authority, additional
    reply.extend_from_slice(question);
    for ip in records {
        reply.extend_from_slice(&[0xc0, 0x0c]); // name: pointer to the question
        let (rtype, rdata) = match ip {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        reply.extend_from_slice(&rtype.to_be_bytes());
        reply.extend_from_slice(&1u16.to_be_bytes()); // class IN
        reply.extend_from_slice(&0u32.to_be_bytes()); // TTL 0: never cached
        reply.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        reply.extend_from_slice(&rdata);
    }
    Some(reply)
}

/// A dotted lower-case name from uncompressed labels at `at`, and the offset after it.
fn read_name(packet: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    loop {
        let len = *packet.get(at)? as usize;
        at += 1;
        if len == 0 {
            return Some((labels.join(".").to_ascii_lowercase(), at));
        }
        labels.push(String::from_utf8_lossy(packet.get(at..at + len)?).into_owned());
        at += len;
    }
}

/// A TCP listener on a given loopback address that counts accepted
/// connections and answers each with a fixed HTTP 200 body.
pub struct CountingListener {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl CountingListener {
    /// Binds `ip:port` (e.g. 127.0.0.2 on the port another origin uses).
    pub async fn start(ip: &str, port: u16, content_type: &str, body: Vec<u8>) -> CountingListener {
        let listener = TcpListener::bind((ip, port))
            .await
            .unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"));
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let response = [head.into_bytes(), body].concat();
        let task = {
            let connections = connections.clone();
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let response = response.clone();
                    tokio::spawn(async move {
                        let mut request = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => request.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = stream.write_all(&response).await;
                    });
                }
            })
        };
        CountingListener {
            addr,
            connections,
            task,
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
