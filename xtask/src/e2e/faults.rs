//! Faults: the S3 host's link cut during an upload, a partitioned etcd member taking scheduled
//! snapshots, `kill -9` at random moments of save, upload, download and reset, and a disk that
//! fills up during a save. After each, the next run must find a consistent state.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};

use super::net::{tick, Net};
use super::node::{files, kill_and_wait, s3_flags, tail, wait_until, Node, Out, RESET_DONE, S3_SECRET_KEY};
use super::scenarios::{self, strings, Contents};
use super::{Ctx, Etcd, Rng};

/// Cuts a host's link; plugs it back in when dropped, so that a failed check never leaves the
/// next scenario without S3 or a member.
struct Cut<'a> {
    net: &'a Net,
    host: &'static str,
    active: bool,
}

impl<'a> Cut<'a> {
    fn new(net: &'a Net, host: &'static str) -> Result<Cut<'a>> {
        net.cut(host)?;
        Ok(Cut { net, host, active: true })
    }

    fn heal(&mut self) -> Result<()> {
        if self.active {
            self.active = false;
            self.net.heal(self.host)?;
        }
        Ok(())
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        let _ = self.heal();
    }
}

/// A child with its output in files, killed on drop.
struct Bg {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Bg {
    fn spawn(cmd: &mut Command, dir: &Path, tag: &str) -> Result<Bg> {
        let (stdout, stderr) = (dir.join(format!("{tag}.out")), dir.join(format!("{tag}.err")));
        let child = cmd
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .context("spawn")?;
        Ok(Bg { child: Some(child), stdout, stderr })
    }

    fn running(&mut self) -> Result<bool> {
        Ok(match self.child.as_mut() {
            Some(c) => c.try_wait()?.is_none(),
            None => false,
        })
    }

    fn wait(mut self, timeout: Duration) -> Result<Out> {
        let deadline = Instant::now() + timeout;
        let mut c = self.child.take().expect("spawned");
        let status = loop {
            if let Some(s) = c.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("did not finish within {timeout:?}");
            }
            tick(Duration::from_millis(50))?;
        };
        Ok(Out {
            status,
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        })
    }

    /// SIGKILL now; whether it was still running.
    fn kill9(mut self) -> bool {
        let Some(mut c) = self.child.take() else { return false };
        let running = matches!(c.try_wait(), Ok(None));
        let _ = c.kill();
        let _ = c.wait();
        running
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The size of the largest `.part` in a directory whose name starts with `prefix`.
fn part_size(dir: &Path, prefix: &str) -> u64 {
    files(dir)
        .iter()
        .filter(|f| f.starts_with(prefix) && f.ends_with(".part"))
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

/// `etcd-snapshot ls` (with S3 when `s3` is given): no `.part` is listed and every listed
/// snapshot passes `etcd-snapshot status`. Returns how many were listed.
pub fn check_listing(n: &Node, s3: Option<&[String]>) -> Result<usize> {
    let mut ls = strings(&["ls"]);
    ls.extend_from_slice(s3.unwrap_or_default());
    let out = n.snapshot(&ls)?.check("etcd-snapshot ls")?;
    let mut count = 0;
    for line in out.stdout.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (name, location) = (cols[0], cols.get(1).copied().unwrap_or_default());
        ensure!(
            !name.ends_with(".part") && !location.ends_with(".part"),
            "etcd-snapshot ls lists a partial file: {line}"
        );
        let mut status = strings(&["status"]);
        if let Some(path) = location.strip_prefix("file://") {
            status.push(path.to_string());
        } else {
            status.push(name.to_string());
            status.extend_from_slice(s3.unwrap_or_default());
        }
        let st = n.snapshot(&status)?;
        ensure!(st.ok(), "listed snapshot {location} fails etcd-snapshot status ({})", st.describe());
        count += 1;
    }
    Ok(count)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// The unix seconds in a snapshot name `<prefix>-<node>-<secs>[.zip][.age]`.
fn name_secs(name: &str) -> Option<u64> {
    name.trim_end_matches(".age").trim_end_matches(".zip").rsplit('-').next()?.parse().ok()
}

/// (a) The S3 host's link is cut while a snapshot is being uploaded: on demand, then scheduled.
pub fn s3_link_cut(ctx: &Ctx, etcd: &Etcd, dir: &Path) -> Result<String> {
    let n = &ctx.nodes(dir, etcd)[0];
    let bucket = format!("linkcut-{}", etcd.short());
    ctx.s3.create_bucket(&bucket)?;
    let s3 = s3_flags(&bucket, "4s");
    let s = n.start(&strings(&["--etcd-disable-snapshots"]))?;
    n.put(&[("/e2e/x", "1")])?;
    n.load_bulk(40)?;

    // On demand: cut once the pipelined upload is under way (the local .part is growing).
    let mut save = strings(&["save"]);
    save.extend_from_slice(&s3);
    let mut bg = Bg::spawn(&mut n.snapshot_cmd(&save), dir, "save-cut")?;
    wait_until("the on-demand save to stream", Duration::from_secs(60), || {
        if !bg.running()? {
            bail!("the save ended before the link could be cut; make the snapshot bigger");
        }
        Ok(part_size(&n.snapshots(), "on-demand-") > 6 << 20)
    })?;
    let mut cut = Cut::new(&ctx.net, "objstore")?;
    let t = Instant::now();
    let out = bg.wait(Duration::from_secs(120))?;
    let took = t.elapsed();
    ensure!(!out.ok(), "the save succeeded with the S3 link cut: {}", out.stdout);
    ensure!(out.status.code() == Some(1), "the save exited {} (want 1)", out.status);
    ensure!(
        out.stderr.contains("saved locally"),
        "the error does not say the snapshot is kept locally: {}",
        tail(&out.stderr, 3)
    );
    ensure!(!out.stderr.contains(S3_SECRET_KEY), "the S3 secret key appears in the error");
    let error_line = failure_summary(&tail(&out.stderr, 1));
    let local: Vec<String> = files(&n.snapshots()).into_iter().filter(|f| f.starts_with("on-demand-")).collect();
    ensure!(local.len() == 1 && !local[0].ends_with(".part"), "want one whole local snapshot, found {local:?}");
    let kept = local[0].clone();
    let st = n.snapshot(&strings(&["status", &n.snapshots().join(&kept).display().to_string()]))?;
    ensure!(st.ok(), "the locally kept snapshot fails status ({})", st.describe());
    cut.heal()?;
    ensure!(
        !ctx.s3.object(&bucket, &format!("k3s/{kept}")).exists(),
        "an object exists under the name of the failed upload"
    );
    let listed = n.snapshot(&[strings(&["ls"]), s3.clone()].concat())?.check("ls --s3")?;
    ensure!(
        !listed.stdout.lines().any(|l| l.contains(&format!("s3://{bucket}/k3s/{kept}"))),
        "ls --s3 lists the failed upload"
    );
    // The next run, with the link back, uploads.
    let again = n.save(&s3)?;
    ensure!(
        ctx.s3.object(&bucket, &format!("k3s/{again}")).is_file(),
        "the save after the link came back did not upload"
    );
    s.stop()?;

    // Scheduled: the server keeps the local snapshot, logs the failure, uploads the next one.
    let mut flags = s3.clone();
    flags.extend(strings(&[
        "--etcd-snapshot-schedule-cron=@every 3s",
        "--etcd-snapshot-retention=4",
        "--etcd-s3-retention=4",
    ]));
    let mut s = n.start(&flags)?;
    const UPLOADED: &str = "snapshot uploaded";
    const UPLOAD_FAILED: &str = "upload failed; the local snapshot is kept";
    s.wait_for_log(UPLOADED, Duration::from_secs(60))?;
    wait_until("a scheduled save to stream", Duration::from_secs(60), || {
        Ok(part_size(&n.snapshots(), "etcd-snapshot-") > 6 << 20)
    })?;
    let mut cut = Cut::new(&ctx.net, "objstore")?;
    s.wait_for_log(UPLOAD_FAILED, Duration::from_secs(90))?;
    let uploads = s.log_count(UPLOADED);
    cut.heal()?;
    s.wait_for_log_count(UPLOADED, uploads + 1, Duration::from_secs(90))?;
    ensure!(!s.log_text().contains(S3_SECRET_KEY), "the S3 secret key appears in the server log");
    s.stop()?;
    let listed = check_listing(n, Some(&s3))?;
    Ok(format!(
        "on-demand upload failed after {:.1}s ({error_line}), kept locally; scheduled recovered; {listed} listed, all pass status",
        took.as_secs_f64()
    ))
}

/// S3 answers at a trickle (the link to it throttled to 2 Mbit/s, steady, never stalled) while
/// scheduled snapshots go on. Intended: every local snapshot is written at local speed (its save
/// takes a fraction of what the upload would need), each upload gives up at its deadline
/// (`--etcd-s3-timeout`) saying so and leaves no object, and once the link is fast again the next
/// upload lands.
pub fn s3_trickle(ctx: &Ctx, etcd: &Etcd, dir: &Path) -> Result<String> {
    let n = &ctx.nodes(dir, etcd)[0];
    let bucket = format!("trickle-{}", etcd.short());
    ctx.s3.create_bucket(&bucket)?;
    let s = n.start(&strings(&["--etcd-disable-snapshots"]))?;
    n.load_bulk(24)?;
    s.stop()?;
    // 24 MiB at 2 Mbit/s would take about 100 s; the deadline is 8 s.
    let mut flags = s3_flags(&bucket, "8s");
    flags.extend(strings(&[
        "--etcd-snapshot-schedule-cron=@every 4s",
        "--etcd-snapshot-retention=3",
        "--etcd-s3-retention=3",
    ]));
    ctx.net.throttle("objstore", "2mbit")?;
    let result = (|| {
        let mut s = n.start(&flags)?;
        // Once per scheduled run whose upload gave up.
        const GAVE_UP: &str = "scheduled snapshot upload failed";
        s.wait_for_log_count(GAVE_UP, 2, Duration::from_secs(120))?;
        let log = s.log_text();
        ensure!(
            log.contains("did not finish within 8s"),
            "the uploads did not give up at their deadline: {}",
            tail(&log, 4)
        );
        // Every local save's own duration, from its log line.
        let saves: Vec<u64> = log
            .lines()
            .filter(|l| l.contains("saved snapshot") && l.contains("etcd-snapshot-"))
            .filter_map(|l| l.split("duration_ms=").nth(1)?.split_whitespace().next()?.parse().ok())
            .collect();
        ensure!(saves.len() >= 2, "fewer than two local saves logged: {}", tail(&log, 8));
        let slowest = *saves.iter().max().expect("two or more");
        ensure!(slowest < 20_000, "a local save took {slowest} ms: it waited for the trickling upload");
        let local: Vec<String> =
            files(&n.snapshots()).into_iter().filter(|f| f.starts_with("etcd-snapshot-")).collect();
        ensure!(!local.is_empty() && local.iter().all(|f| !f.ends_with(".part")), "local snapshots: {local:?}");
        for f in &local {
            ensure!(
                !ctx.s3.object(&bucket, &format!("k3s/{f}")).exists(),
                "an upload that gave up left an object for {f}"
            );
        }
        ensure!(!log.contains(S3_SECRET_KEY), "the S3 secret key appears in the server log");
        // The link fast again: the next scheduled upload lands.
        ctx.net.unthrottle("objstore")?;
        s.wait_for_log("snapshot uploaded", Duration::from_secs(90))?;
        s.stop()?;
        Ok(format!(
            "{} local saves at {slowest} ms at most while S3 trickled; uploads gave up at 8 s; recovered",
            saves.len()
        ))
    })();
    let _ = ctx.net.unthrottle("objstore");
    let listed = check_listing(n, None)?;
    result.map(|r| format!("{r}; {listed} listed, all pass status"))
}

/// (b) One member of three is partitioned while every server takes a snapshot every 3 s.
/// Intended: the cut-off member takes no snapshot while it cannot confirm quorum (its scheduled
/// runs fail with a message that says so, and an on-demand save there fails too); the other two
/// keep taking them; after the partition heals, the member takes them again.
pub fn partition(ctx: &Ctx, etcd: &Etcd, dir: &Path) -> Result<String> {
    let nodes = ctx.nodes(dir, etcd);
    let flags = strings(&["--etcd-snapshot-schedule-cron=@every 3s", "--etcd-snapshot-retention=30"]);
    let mut servers = scenarios::start_cluster(&nodes, &flags)?;
    nodes[0].put(&[("/e2e/p", "1")])?;
    const SAVED: &str = "scheduled snapshot saved";
    const FAILED: &str = "scheduled snapshot failed";
    for s in servers.iter_mut() {
        s.wait_for_log(SAVED, Duration::from_secs(60))?;
    }
    let cut_at = now_secs();
    let mut cut = Cut::new(&ctx.net, "node3")?;
    let failed_before = servers[2].log_count(FAILED);
    servers[2].wait_for_log_count(FAILED, failed_before + 2, Duration::from_secs(60))?;
    let failure =
        servers[2].log_text().lines().rev().find(|l| l.contains(FAILED)).map(String::from).unwrap_or_default();
    ensure!(
        failure.to_lowercase().contains("quorum"),
        "the partitioned member's failure does not name the lost quorum: {failure}"
    );
    let on_demand = nodes[2].snapshot(&strings(&["save"]))?;
    ensure!(!on_demand.ok(), "an on-demand save on the partitioned member succeeded: {}", on_demand.stdout);
    ensure!(
        on_demand.stderr.to_lowercase().contains("quorum"),
        "the on-demand failure does not name the lost quorum: {}",
        tail(&on_demand.stderr, 2)
    );
    // A save that had passed its quorum check just before the cut may still finish (it was
    // current when it started); nothing may start later than that.
    let late: Vec<String> = files(&nodes[2].snapshots())
        .into_iter()
        .filter(|f| !f.ends_with(".part") && name_secs(f).is_some_and(|t| t >= cut_at + 2))
        .collect();
    ensure!(late.is_empty(), "the partitioned member saved snapshots after losing quorum: {late:?}");
    for (i, n) in nodes[..2].iter().enumerate() {
        let fresh = files(&n.snapshots()).iter().filter(|f| name_secs(f).is_some_and(|t| t > cut_at + 2)).count();
        ensure!(
            fresh > 0,
            "{} (with quorum) took no snapshot during the partition: {}",
            n.name,
            tail(&servers[i].log_text(), 4)
        );
    }
    let healed_at = now_secs();
    cut.heal()?;
    wait_until("the healed member to take a snapshot again", Duration::from_secs(60), || {
        Ok(files(&nodes[2].snapshots())
            .iter()
            .any(|f| !f.ends_with(".part") && name_secs(f).is_some_and(|t| t > healed_at)))
    })?;
    let stat = check_listing(&nodes[2], None)?;
    scenarios::stop_all(servers)?;
    Ok(format!(
        "cut-off member took none (\"{}\"), the other two kept on, it resumed after healing; {stat} listed, all whole",
        failure_summary(&failure)
    ))
}

/// The gist of an error line for the summary: etcd's own message when quoted, else the last
/// `: `-separated cause.
fn failure_summary(line: &str) -> String {
    if let Some(rest) = line.split("message: \"").nth(1) {
        return rest.split('"').next().unwrap_or_default().to_string();
    }
    let s = line.rsplit(": ").next().unwrap_or(line).trim();
    s.chars().take(100).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Save,
    Upload,
    Download,
    Reset,
}

/// (c) `kill -9` at random moments (from `--seed`) of a save, an upload, a download and a reset,
/// `--iterations` times; after each, the next start is consistent (one of the two possible
/// data sets, one member), nothing partial is listed and every listed snapshot passes status.
pub fn kill9(ctx: &Ctx, etcd: &Etcd, dir: &Path) -> Result<String> {
    let n = &ctx.nodes(dir, etcd)[0];
    let seed = ctx.seed ^ etcd.label.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let mut rng = Rng::new(seed);
    let bucket = format!("kill9-{}", etcd.short());
    ctx.s3.create_bucket(&bucket)?;
    let s3 = s3_flags(&bucket, "20s");
    let quiet = strings(&["--etcd-disable-snapshots"]);
    let mut server = Some(n.start(&quiet)?);
    n.put(&[("/e2e/base", "1")])?;
    n.load_bulk(24)?;
    let base = n.save(&[strings(&["--name=base"]), s3.clone()].concat())?;
    let snapshot_contents = Contents::read(n)?;
    let pristine = dir.join("pristine");
    std::fs::create_dir_all(&pristine)?;
    std::fs::copy(n.snapshots().join(&base), pristine.join(&base))?;
    n.put(&[("/e2e/after", "0")])?;

    // How long each operation takes uninterrupted, to spread the kills over it.
    let t = Instant::now();
    n.save(&[])?;
    let t_save = t.elapsed();
    let t = Instant::now();
    n.save(&s3)?;
    let t_upload = t.elapsed();
    server.take().expect("running").stop()?;
    let t = Instant::now();
    std::fs::remove_file(n.snapshots().join(&base))?;
    scenarios::reset(n, &[vec![format!("--cluster-reset-restore-path={base}")], s3.clone()].concat())?;
    let t_download = t.elapsed();
    let t = Instant::now();
    std::fs::remove_file(n.db().join("reset-flag"))?;
    scenarios::reset(n, &[format!("--cluster-reset-restore-path={}", pristine.join(&base).display())])?;
    let t_reset = t.elapsed();

    let mut notes = Vec::new();
    let mut orphans = 0;
    let phases = [Phase::Save, Phase::Upload, Phase::Download, Phase::Reset];
    let offset = rng.below(4) as usize;
    let mut iteration_log = String::new();
    // Each iteration starts from a running server whose data differs from the snapshot.
    server = Some(n.start(&quiet)?);
    for i in 0..ctx.iterations {
        n.put(&[("/e2e/after", &i.to_string())])?;
        let phase = phases[(i + offset) % 4];
        let old = Contents::read(n)?;
        let (budget, what) = match phase {
            Phase::Save => (t_save, "save"),
            Phase::Upload => (t_upload, "save --s3"),
            Phase::Download => (t_download, "reset from s3"),
            Phase::Reset => (t_reset, "reset from a file"),
        };
        let delay = rng.duration_upto(budget.mul_f64(1.1));
        let stage;
        let mut orphan_note = String::new();
        match phase {
            Phase::Save | Phase::Upload => {
                let mut args = strings(&["save"]);
                if phase == Phase::Upload {
                    args.extend_from_slice(&s3);
                }
                let bg = Bg::spawn(&mut n.snapshot_cmd(&args), dir, &format!("kill-{i}"))?;
                tick(delay)?;
                stage =
                    if part_size(&n.snapshots(), "on-demand-") > 0 { "while streaming" } else { "outside the stream" };
                let was_running = bg.kill9();
                let stage = if was_running { stage } else { "after it finished" };
                check_listing(n, Some(&s3))
                    .with_context(|| format!("iteration {i}: after kill -9 of {what} {stage}"))?;
                n.save(&args[1..]).with_context(|| format!("iteration {i}: the save after the kill"))?;
                iteration_log.push_str(&format!("#{i} {what} +{}ms {stage}; ", delay.as_millis()));
                // Keep the listing short: on-demand snapshots beyond the newest 2 go.
                n.snapshot(&[strings(&["prune", "--snapshot-retention=2"]), s3.clone()].concat())?.check("prune")?;
            }
            Phase::Download | Phase::Reset => {
                server.take().expect("running").stop()?;
                let restore = if phase == Phase::Download {
                    let _ = std::fs::remove_file(n.snapshots().join(&base));
                    [vec![format!("--cluster-reset-restore-path={base}")], s3.clone()].concat()
                } else {
                    vec![format!("--cluster-reset-restore-path={}", pristine.join(&base).display())]
                };
                let mut args = strings(&["--cluster-reset"]);
                args.extend(restore);
                let bg = Bg::spawn(&mut n.server_cmd(&args), dir, &format!("kill-{i}"))?;
                tick(delay)?;
                stage = if n.snapshots().join(format!("{base}.part")).exists() {
                    "while downloading"
                } else if !n.etcd_pids().is_empty() {
                    "while the restored etcd ran"
                } else if !n.restore_tool_pids().is_empty() {
                    "while etcdutl/etcdctl restored"
                } else if files(&n.db()).iter().any(|f| f.starts_with("etcd-restore") || f.starts_with("etcd-old-tmp"))
                {
                    "while swapping"
                } else {
                    "before the restore or after it"
                };
                let was_running = bg.kill9();
                let stage = if was_running { stage } else { "after it finished" };
                // A SIGKILL of the server leaves its etcd (a separate process) running; a service
                // manager kills the whole unit, so do that, and count it. A child forked just
                // before the kill may exec etcd a moment later, so look until two looks agree.
                let mut found = false;
                loop {
                    let left = n.leftover_pids();
                    if left.is_empty() {
                        tick(Duration::from_millis(300))?;
                        if n.leftover_pids().is_empty() {
                            break;
                        }
                        continue;
                    }
                    found = true;
                    kill_and_wait(&left);
                }
                if found {
                    orphans += 1;
                    orphan_note = " (etcd or its restore tool outlived the server; killed)".into();
                }
                // The next run is either the same reset again (it must complete, or be refused
                // because the killed one had finished) or a normal start.
                let rerun = rng.below(2) == 0;
                let mut next = "start";
                if rerun {
                    let out = n.run_server(&args, Duration::from_secs(180))?;
                    next = if out.ok() {
                        ensure!(
                            out.stderr.contains(RESET_DONE),
                            "iteration {i}: the reset after the kill exited 0 without its message"
                        );
                        "reset again, start"
                    } else if out.stderr.contains("previously reset") {
                        "reset refused (already done), start"
                    } else {
                        bail!("iteration {i}: the reset after kill -9 of {what} {stage} failed ({})", out.describe());
                    };
                }
                let s = n.start(&quiet).with_context(|| {
                    let ss = Command::new("ip").args(["netns", "exec", &n.ns, "ss", "-ltnpH"]).output();
                    let listeners =
                        ss.map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', " | ")).unwrap_or_default();
                    format!("iteration {i}: the {next} after kill -9 of {what} {stage} (listening: {listeners})")
                })?;
                let now = Contents::read(n)?;
                ensure!(
                    now == snapshot_contents || (!rerun && now == old),
                    "iteration {i}: after kill -9 of {what} {stage} and a {next}, etcd holds {} data: {:?}",
                    if rerun { "not the snapshot's" } else { "neither the old nor the snapshot's" },
                    now.small
                );
                let members = n.member_count()?;
                ensure!(members == 1, "iteration {i}: {members} members after the interrupted reset");
                check_listing(n, Some(&s3))
                    .with_context(|| format!("iteration {i}: after kill -9 of {what} {stage}"))?;
                let got = if now == old { "old data" } else { "restored data" };
                iteration_log
                    .push_str(&format!("#{i} {what} +{}ms {stage}{orphan_note}, {next} → {got}; ", delay.as_millis()));
                server = Some(s);
            }
        }
    }
    let left_parts = files(&n.snapshots()).iter().filter(|f| f.ends_with(".part")).count();
    if let Some(s) = server.take() {
        s.stop()?;
    }
    std::fs::write(dir.join("iterations.txt"), &iteration_log)?;
    println!("e2e:   kill9 on etcd {}: {iteration_log}", etcd.label);
    if orphans > 0 {
        notes.push(format!("{orphans} kills left an orphaned etcd process"));
    }
    if left_parts > 0 {
        notes.push(format!("{left_parts} unlisted .part files left on disk"));
    }
    Ok(format!(
        "{} kills (--seed {}) consistent; budgets save {}ms upload {}ms download+reset {}ms reset {}ms{}",
        ctx.iterations,
        ctx.seed,
        t_save.as_millis(),
        t_upload.as_millis(),
        t_download.as_millis(),
        t_reset.as_millis(),
        if notes.is_empty() { String::new() } else { format!("; {}", notes.join("; ")) }
    ))
}

/// A tmpfs mounted for the scenario, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(at)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(at)
            .output()?;
        ensure!(
            out.status.success(),
            "mount tmpfs at {}: {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Tmpfs(at.to_path_buf()))
    }

    fn resize(&self, size: &str) -> Result<()> {
        let out = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0).output()?;
        ensure!(out.status.success(), "remount tmpfs: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).stderr(Stdio::null()).status();
    }
}

/// (d) The snapshot dir is a small tmpfs that fills up during the save.
pub fn disk_full(ctx: &Ctx, etcd: &Etcd, dir: &Path) -> Result<String> {
    let n = &ctx.nodes(dir, etcd)[0];
    let mnt = Tmpfs::mount(&dir.join("small-disk"), "6m")?;
    let snapdir = mnt.0.join("snapshots");
    let s = n.start(&strings(&["--etcd-disable-snapshots"]))?;
    n.put(&[("/e2e/full", "1")])?;
    n.load_bulk(10)?;
    let out = n.snapshot(&strings(&["save", &format!("--dir={}", snapdir.display())]))?;
    ensure!(!out.ok(), "a save into a full disk succeeded: {}", out.stdout);
    ensure!(out.status.code() == Some(1), "exit {} (want 1)", out.status);
    let msg = tail(&out.stderr, 1);
    ensure!(
        msg.contains("No space left") || msg.to_lowercase().contains("space"),
        "the error does not say the disk is full: {msg}"
    );
    let left: Vec<String> = files(&snapdir).into_iter().chain(files(&mnt.0.join(".metadata"))).collect();
    ensure!(left.is_empty(), "the failed save left files behind: {left:?}");
    s.stop()?;

    // Scheduled snapshots into the full disk fail, are logged, leave nothing, and resume once
    // there is room.
    let mut s = n.start(&strings(&[
        "--etcd-snapshot-schedule-cron=@every 2s",
        &format!("--etcd-snapshot-dir={}", snapdir.display()),
    ]))?;
    s.wait_for_log_count("scheduled snapshot failed", 2, Duration::from_secs(60))?;
    let line =
        s.log_text().lines().rev().find(|l| l.contains("scheduled snapshot failed")).unwrap_or_default().to_string();
    ensure!(line.contains("No space left"), "the scheduled failure does not say the disk is full: {line}");
    let left: Vec<String> = files(&snapdir).into_iter().filter(|f| !f.ends_with(".part")).collect();
    ensure!(left.is_empty(), "failed scheduled snapshots left files: {left:?}");
    mnt.resize("64m")?;
    s.wait_for_log("scheduled snapshot saved", Duration::from_secs(60))?;
    s.stop()?;
    let parts: Vec<String> = files(&snapdir).into_iter().filter(|f| f.ends_with(".part")).collect();
    ensure!(parts.is_empty(), "partial files left: {parts:?}");
    let mut ls = strings(&["ls"]);
    ls.push(format!("--dir={}", snapdir.display()));
    let out = n.snapshot(&ls)?.check("ls")?;
    let rows = out.stdout.lines().skip(1).filter(|l| !l.trim().is_empty()).count();
    ensure!(rows >= 1, "no snapshot listed after the disk had room again");
    Ok(format!("refused (\"{}\"), nothing left behind; scheduled runs resumed after the resize", failure_summary(&msg)))
}
