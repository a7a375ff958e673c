//! `loadgen put`: puts (and some deletes) at a steady rate with a bounded number in flight,
//! logging every operation (see the library), and printing the achieved rate and the latency
//! percentiles as JSON; optionally sampling a server's `/metrics` for the delta follower's lag.
//!
//! `loadgen check`: reads a restored keyspace and checks it against an op log, printing the RPO and
//! everything wrong as JSON.
//!
//! `loadgen watch`: a bare watch of every key (see `watch.rs`).
//!
//! Run by `cargo xtask e2e --only rpo` and `cargo xtask bench --only delta-overhead`.

mod chain;
mod limit;
mod watch;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use loadgen::{check, format_log, key, parse_key, parse_log, sent_after, value, Kind, Op, Restored};
use serde_json::json;

const USAGE: &str = "usage:
  loadgen put --endpoints URL[,URL…] [--tls-dir DIR] --rate N --duration SECS [--window N] [--prefix P]
              [--value-bytes N] [--delete-every N] [--log FILE] [--give-up SECS]
              [--metrics URL --metrics-ca FILE]
  loadgen check --endpoints URL[,URL…] [--tls-dir DIR] --log FILE --loss-unix-ns N --window-ms N
                [--point-in-time yes] (nothing sent after the loss time may be restored)
DIR holds server-ca.crt, client.crt and client.key (a k3s server's server/tls/etcd).";

/// A request that has not come back after this counts as failed.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Args {
    endpoints: Vec<String>,
    tls_dir: Option<PathBuf>,
    rate: f64,
    duration: f64,
    window: usize,
    prefix: String,
    value_bytes: usize,
    delete_every: u64,
    log: Option<PathBuf>,
    give_up: f64,
    metrics: Option<String>,
    metrics_ca: Option<PathBuf>,
    loss_unix_ns: u64,
    window_ms: u64,
    point_in_time: bool,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args { window: 64, prefix: "/load/".into(), value_bytes: 1024, give_up: 2.0, ..Args::default() };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |what: &str| v.parse::<f64>().with_context(|| format!("{what} takes a number, not {v:?}"));
        match flag.as_str() {
            "--endpoints" => a.endpoints = v.split(',').map(String::from).collect(),
            "--tls-dir" => a.tls_dir = Some(v.into()),
            "--rate" => a.rate = num("--rate")?,
            "--duration" => a.duration = num("--duration")?,
            "--window" => a.window = num("--window")? as usize,
            "--prefix" => a.prefix = v.clone(),
            "--value-bytes" => a.value_bytes = num("--value-bytes")? as usize,
            "--delete-every" => a.delete_every = num("--delete-every")? as u64,
            "--log" => a.log = Some(v.into()),
            "--give-up" => a.give_up = num("--give-up")?,
            "--metrics" => a.metrics = Some(v.clone()),
            "--metrics-ca" => a.metrics_ca = Some(v.into()),
            "--loss-unix-ns" => a.loss_unix_ns = v.parse().context("--loss-unix-ns")?,
            "--window-ms" => a.window_ms = v.parse().context("--window-ms")?,
            "--point-in-time" => a.point_in_time = v == "yes",
            _ => bail!("unknown flag {flag:?}\n{USAGE}"),
        }
    }
    if a.endpoints.is_empty() {
        bail!("--endpoints is missing\n{USAGE}");
    }
    Ok(a)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let result = rt.map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            match args.first().map(String::as_str) {
                Some("chain") => chain::run(&args[1..]),
                Some("snapshot") => limit::run(&args[1..]).await,
                Some("put") => put(parse(&args[1..])?).await,
                Some("check") => check_restored(parse(&args[1..])?).await,
                Some("watch") => watch::run(&args[1..]).await,
                _ => bail!("{USAGE}\n{}\n{}\n{}", chain::USAGE, limit::USAGE, watch::USAGE),
            }
        })
    });
    if let Err(e) = result {
        eprintln!("loadgen: error: {e:#}");
        std::process::exit(1);
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default()
}

async fn connect(a: &Args) -> Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(10));
    if let Some(dir) = &a.tls_dir {
        let read = |f: &str| std::fs::read(dir.join(f)).with_context(|| format!("read {}", dir.join(f).display()));
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read("server-ca.crt")?))
            .identity(Identity::from_pem(read("client.crt")?, read("client.key")?));
        opts = opts.with_tls(tls);
    }
    Client::connect(&a.endpoints, Some(opts)).await.with_context(|| format!("connect to {}", a.endpoints.join(",")))
}

/// Shared by the in-flight requests.
#[derive(Default)]
struct State {
    ops: Mutex<Vec<Op>>,
    /// Puts that came back and whose keys no delete has taken yet.
    live: Mutex<VecDeque<u64>>,
    max_rev: AtomicI64,
    /// Unix ns of the last response; and failures since it.
    last_ack_ns: AtomicU64,
    failures_since_ack: AtomicU64,
    failures: AtomicU64,
    /// Deletes that came back having deleted nothing (a put that came back is gone).
    empty_deletes: AtomicU64,
    first_error: Mutex<Option<String>>,
}

async fn put(a: Args) -> Result<()> {
    if a.rate <= 0.0 || a.duration <= 0.0 || a.window == 0 {
        bail!("--rate, --duration and --window must be above 0");
    }
    let client = connect(&a).await?;
    let state = Arc::new(State::default());
    let permits = Arc::new(tokio::sync::Semaphore::new(a.window));
    let planned = (a.rate * a.duration) as u64;
    let stop_sampling = Arc::new(AtomicU64::new(0));
    let sampler = match &a.metrics {
        Some(url) => {
            Some(tokio::spawn(sample_metrics(url.clone(), a.metrics_ca.clone(), state.clone(), stop_sampling.clone())))
        }
        None => None,
    };
    let start = Instant::now();
    let start_ns = now_ns();
    state.last_ack_ns.store(start_ns, Ordering::Relaxed);
    let mut issued = 0u64;
    let mut gave_up = false;
    let mut from_front = false;
    for seq in 0..planned {
        tokio::time::sleep_until((start + Duration::from_secs_f64(seq as f64 / a.rate)).into()).await;
        let permit = permits.clone().acquire_owned().await?;
        let since_ack = now_ns().saturating_sub(state.last_ack_ns.load(Ordering::Relaxed));
        if state.failures_since_ack.load(Ordering::Relaxed) > 0 && since_ack as f64 > a.give_up * 1e9 {
            gave_up = true;
            break;
        }
        let mut kind = Kind::Put;
        if a.delete_every > 0 && seq % a.delete_every == a.delete_every - 1 {
            // Alternately the oldest and the newest key still there.
            let mut live = state.live.lock().expect("not poisoned");
            from_front = !from_front;
            if let Some(target) = if from_front { live.pop_front() } else { live.pop_back() } {
                kind = Kind::Delete { target };
            }
        }
        let mut kv = client.kv_client();
        let (st, prefix, vb) = (state.clone(), a.prefix.clone(), a.value_bytes);
        issued += 1;
        tokio::spawn(async move {
            let send_ns = now_ns();
            let result = match kind {
                Kind::Put => tokio::time::timeout(OP_TIMEOUT, kv.put(key(&prefix, seq), value(seq, vb), None))
                    .await
                    .map(|r| r.map(|r| (r.header().map_or(0, |h| h.revision()), 1))),
                Kind::Delete { target } => tokio::time::timeout(OP_TIMEOUT, kv.delete(key(&prefix, target), None))
                    .await
                    .map(|r| r.map(|r| (r.header().map_or(0, |h| h.revision()), r.deleted()))),
            };
            let mut op = Op { seq, kind, rev: 0, send_ns, ack_ns: 0 };
            match result {
                Ok(Ok((rev, deleted))) => {
                    op.rev = rev;
                    op.ack_ns = now_ns();
                    st.max_rev.fetch_max(rev, Ordering::Relaxed);
                    st.last_ack_ns.fetch_max(op.ack_ns, Ordering::Relaxed);
                    st.failures_since_ack.store(0, Ordering::Relaxed);
                    match kind {
                        Kind::Put => st.live.lock().expect("not poisoned").push_back(seq),
                        Kind::Delete { .. } if deleted != 1 => {
                            st.empty_deletes.fetch_add(1, Ordering::Relaxed);
                        }
                        Kind::Delete { .. } => {}
                    }
                }
                Ok(Err(e)) => failed(&st, e.to_string()),
                Err(_) => failed(&st, format!("no response within {OP_TIMEOUT:?}")),
            }
            st.ops.lock().expect("not poisoned").push(op);
            drop(permit);
        });
    }
    let issue_secs = start.elapsed().as_secs_f64();
    // Let what is in flight come back (or time out).
    let _ = tokio::time::timeout(OP_TIMEOUT * 2, permits.acquire_many(a.window as u32)).await;
    stop_sampling.store(1, Ordering::Relaxed);
    let mut samples = Vec::new();
    let mut caught_up_after = serde_json::Value::Null;
    if let Some(s) = sampler {
        (samples, caught_up_after) = s.await??;
    }

    let mut ops = std::mem::take(&mut *state.ops.lock().expect("not poisoned"));
    ops.sort_by_key(|o| o.seq);
    if let Some(path) = &a.log {
        std::fs::write(path, format_log(&a.prefix, a.value_bytes, &ops))
            .with_context(|| format!("write {}", path.display()))?;
    }
    let mut lat: Vec<f64> = ops.iter().filter(|o| o.acked()).map(|o| (o.ack_ns - o.send_ns) as f64 / 1e6).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| if lat.is_empty() { f64::NAN } else { lat[((lat.len() - 1) as f64 * p).round() as usize] };
    let acked = lat.len();
    let last_ack = ops.iter().map(|o| o.ack_ns).max().unwrap_or(0);
    let active_secs = last_ack.saturating_sub(start_ns) as f64 / 1e9;
    let summary = json!({
        "planned": planned,
        "issued": issued,
        "acked": acked,
        "puts_acked": ops.iter().filter(|o| o.acked() && o.kind == Kind::Put).count(),
        "deletes_acked": ops.iter().filter(|o| o.acked() && o.kind != Kind::Put).count(),
        "failed": state.failures.load(Ordering::Relaxed),
        "empty_deletes": state.empty_deletes.load(Ordering::Relaxed),
        "first_error": state.first_error.lock().expect("not poisoned").clone(),
        "gave_up": gave_up,
        "target_rate": a.rate,
        "achieved_rate": if active_secs > 0.0 { acked as f64 / active_secs } else { 0.0 },
        "issue_secs": issue_secs,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": lat.last().copied().unwrap_or(f64::NAN),
        "start_unix_ns": start_ns,
        "last_ack_unix_ns": last_ack,
        "max_rev": state.max_rev.load(Ordering::Relaxed),
        "samples": samples,
        "caught_up_after_s": caught_up_after,
    });
    println!("{summary}");
    Ok(())
}

fn failed(st: &State, e: String) {
    st.failures.fetch_add(1, Ordering::Relaxed);
    st.failures_since_ack.fetch_add(1, Ordering::Relaxed);
    st.first_error.lock().expect("not poisoned").get_or_insert(e);
}

/// One value of a Prometheus text line `name value`.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Every 250 ms while the load runs: `[seconds, newest acknowledged revision, shipped revision,
/// k3s_snapshot_delta_lag_revisions, k3s_snapshot_delta_lag_seconds]`. After the load, how long
/// until everything acknowledged was shipped (null when not within 60 s).
async fn sample_metrics(
    url: String,
    ca: Option<PathBuf>,
    st: Arc<State>,
    stop: Arc<AtomicU64>,
) -> Result<(Vec<serde_json::Value>, serde_json::Value)> {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(2));
    if let Some(ca) = &ca {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&read(ca)?)?);
    }
    let http = b.build()?;
    let get = |http: reqwest::Client, url: String| async move {
        let text = http.get(&url).send().await.ok()?.text().await.ok()?;
        Some((
            metric(&text, "k3s_snapshot_delta_shipped_revision")?,
            metric(&text, "k3s_snapshot_delta_lag_revisions")?,
            metric(&text, "k3s_snapshot_delta_lag_seconds")?,
        ))
    };
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while stop.load(Ordering::Relaxed) == 0 {
        tick.tick().await;
        let acked = st.max_rev.load(Ordering::Relaxed);
        if acked == 0 {
            continue; // nothing acknowledged yet: no lag to speak of
        }
        if let Some((shipped, lag_rev, lag_secs)) = get(http.clone(), url.clone()).await {
            samples.push(json!([t0.elapsed().as_secs_f64(), acked, shipped, lag_rev, lag_secs]));
        }
    }
    let done = Instant::now();
    let target = st.max_rev.load(Ordering::Relaxed) as f64;
    while done.elapsed() < Duration::from_secs(60) {
        if get(http.clone(), url.clone()).await.is_some_and(|(shipped, _, _)| shipped >= target) {
            return Ok((samples, json!(done.elapsed().as_secs_f64())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((samples, serde_json::Value::Null))
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("read {}", p.display()))
}

async fn check_restored(a: Args) -> Result<()> {
    let log = a.log.as_ref().context("--log is missing")?;
    let (prefix, value_bytes, ops) =
        parse_log(&String::from_utf8_lossy(&read(log)?)).map_err(|e| anyhow::anyhow!("{}: {e}", log.display()))?;
    let mut client = connect(&a).await?;
    let mut end = prefix.clone().into_bytes();
    *end.last_mut().context("--prefix is empty")? += 1;
    let mut from = prefix.clone().into_bytes();
    let (mut restored, mut stray) = (Restored::new(), Vec::new());
    loop {
        let opts = GetOptions::new().with_range(end.clone()).with_limit(500);
        let r = client.get(from.clone(), Some(opts)).await.context("read the restored keys")?;
        for kv in r.kvs() {
            let k = String::from_utf8_lossy(kv.key()).into_owned();
            match parse_key(&prefix, &k) {
                Some(seq) => {
                    restored.insert(seq, (kv.value().to_vec(), kv.mod_revision()));
                }
                None => stray.push(k),
            }
        }
        match r.kvs().last() {
            Some(last) if r.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    let mut out = check(&ops, &restored, &stray, value_bytes, a.loss_unix_ns, a.window_ms * 1_000_000);
    if a.point_in_time {
        out.violations.extend(sent_after(&ops, &restored, out.visible_rev, a.loss_unix_ns));
    }
    println!(
        "{}",
        json!({
            "visible_rev": out.visible_rev,
            "rpo_ms": out.rpo_ns as f64 / 1e6,
            "last_ack_before_loss_unix_ns": out.last_ack_before_loss_ns,
            "newest_visible_ack_unix_ns": out.newest_visible_ack_ns,
            "acked": out.acked,
            "required": out.required,
            "present_keys": out.present_keys,
            "unacked_present": out.unacked_present,
            "deletes_applied": out.deletes_applied,
            "violations": out.violations.iter().take(20).collect::<Vec<_>>(),
            "violation_count": out.violations.len(),
        })
    );
    Ok(())
}
