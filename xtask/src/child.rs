//! Child processes and ports of the xtasks: a child killed and reaped when dropped, and a free
//! loopback port to give a server.

use std::net::TcpListener;
use std::process::Child;

use anyhow::Result;

/// Kills and reaps a child process when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
