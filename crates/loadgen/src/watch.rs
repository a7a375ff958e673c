//! `loadgen watch`: the part of the delta follower's cost that is etcd's. A bare client that
//! watches the whole key space with the follower's options (from the current revision, progress
//! notifications, fragments) and drops every event: no segment, no hash, no upload. It runs until
//! it is killed, and prints the events it saw on stderr every second, so a bench can tell that it
//! is following.

use anyhow::{bail, Context, Result};
use etcd_client::WatchOptions;

pub const USAGE: &str = "  loadgen watch --endpoints URL [--tls-dir DIR]
                   (watches every key from now on and drops the events, until killed)";

pub async fn run(args: &[String]) -> Result<()> {
    let a = crate::parse(args)?;
    if a.endpoints.is_empty() {
        bail!("loadgen watch needs --endpoints\n{USAGE}");
    }
    let mut client = crate::connect(&a).await?;
    let opts = WatchOptions::new().with_from_key().with_progress_notify().with_fragment();
    let mut stream = client.watch(vec![0u8], Some(opts)).await.context("start the watch")?;
    eprintln!("loadgen watch: watching");
    let (mut events, mut reported) = (0u64, std::time::Instant::now());
    while let Some(resp) = stream.message().await.context("read the watch")? {
        events += resp.events().len() as u64;
        if reported.elapsed().as_secs() >= 1 {
            eprintln!("loadgen watch: {events} events");
            reported = std::time::Instant::now();
        }
    }
    bail!("the watch ended after {events} events")
}
