//! A loopback TCP relay that damages an upload in transit: in the first request of each
//! connection that is a PUT naming `target`, it flips one bit of the body byte at `at` (counted
//! from the end of the request head) and relays everything else unchanged, both ways. Stands for
//! a link or a middlebox that corrupts data: S3 must refuse the body by its checksum.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct FlipProxy {
    /// `127.0.0.1:PORT`
    pub endpoint: String,
    flipped: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FlipProxy {
    /// Relays to `127.0.0.1:upstream`; `target`: a string the damaged request's line contains.
    pub fn start(upstream: u16, target: &str, at: usize) -> FlipProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let (flipped, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (f, s, target) = (flipped.clone(), stop.clone(), target.to_string());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || relay(s2, c2, None));
                let (f, target) = (f.clone(), target.clone());
                std::thread::spawn(move || relay(client, server, Some((target, at, f))));
            }
        });
        FlipProxy { endpoint, flipped, stop }
    }

    /// Bytes flipped so far.
    pub fn flipped(&self) -> usize {
        self.flipped.load(Ordering::SeqCst)
    }
}

impl Drop for FlipProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to`; with `flip`, damages the first request's body as described above.
fn relay(mut from: TcpStream, mut to: TcpStream, flip: Option<(String, usize, Arc<AtomicUsize>)>) {
    let mut buf = vec![0u8; 64 << 10];
    // The first request's head, until it is complete; then where its body starts.
    let mut head: Vec<u8> = Vec::new();
    let mut body_seen: Option<usize> = None;
    let mut armed = flip.is_some();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        if armed {
            let (target, at, count) = flip.as_ref().unwrap();
            let mut start = 0;
            if body_seen.is_none() {
                head.extend_from_slice(chunk);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    let line = String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap_or(0)])
                        .into_owned();
                    if !(line.starts_with("PUT ") && line.contains(target.as_str())) {
                        armed = false;
                    }
                    // Where the body starts within this chunk.
                    start = n - (head.len() - (end + 4));
                    body_seen = Some(0);
                }
            }
            if let (true, Some(seen)) = (armed, body_seen) {
                let body = &mut chunk[start..];
                if *at >= seen && *at < seen + body.len() {
                    body[*at - seen] ^= 0x01;
                    count.fetch_add(1, Ordering::SeqCst);
                    armed = false;
                }
                body_seen = Some(seen + body.len());
            }
        }
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
