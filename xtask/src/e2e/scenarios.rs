//! Restores: one server from a local snapshot, one server from an S3 object, and three servers
//! (reset on the first, the others rejoin). Each checks that the restored etcd holds exactly the
//! snapshot's keys.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Result};

use super::node::{s3_flags, tail, wait_until, Node, Server, RESET_DONE, RUNNING, S3_SECRET_KEY};
use super::{Blocked, Ctx, Etcd};

pub fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn with(base: &[&str], more: &[String]) -> Vec<String> {
    let mut v = strings(base);
    v.extend_from_slice(more);
    v
}

/// What a snapshot holds, read from etcd when it was taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Contents {
    pub keys: Vec<String>,
    pub small: Vec<(String, String)>,
}

impl Contents {
    pub fn read(n: &Node) -> Result<Contents> {
        Ok(Contents { keys: n.keys()?, small: n.small_kvs()? })
    }
}

/// Fails unless etcd on `n` holds exactly `want`.
pub fn expect_contents(n: &Node, want: &Contents) -> Result<()> {
    let got = Contents::read(n)?;
    if got != want.clone() {
        let extra: Vec<_> = got.keys.iter().filter(|k| !want.keys.contains(k)).collect();
        let missing: Vec<_> = want.keys.iter().filter(|k| !got.keys.contains(k)).collect();
        bail!(
            "etcd on {} does not hold exactly the snapshot's keys: extra {extra:?}, missing {missing:?}, /e2e/ values {:?} (want {:?})",
            n.name,
            got.small,
            want.small
        );
    }
    Ok(())
}

/// Runs `server --cluster-reset ARGS` and checks exit 0, the reset message and `reset-flag`.
pub fn reset(n: &Node, args: &[String]) -> Result<()> {
    let out = n.run_server(&with(&["--cluster-reset"], args), Duration::from_secs(180))?;
    ensure!(out.ok(), "cluster reset on {} failed ({})", n.name, out.describe());
    ensure!(
        out.stderr.contains(RESET_DONE),
        "cluster reset on {} exited 0 without the reset message: {}",
        n.name,
        tail(&out.stderr, 6)
    );
    ensure!(n.db().join("reset-flag").is_file(), "cluster reset on {} wrote no reset-flag", n.name);
    ensure!(!out.stderr.contains(S3_SECRET_KEY), "the S3 secret key appears in the reset's output");
    Ok(())
}

/// Starts normally after a reset: the flag is removed, one member, exactly `want`.
fn start_restored(n: &Node, want: &Contents, extra: &[String]) -> Result<Server> {
    let s = n.start(extra)?;
    ensure!(!n.db().join("reset-flag").exists(), "a normal start on {} did not remove reset-flag", n.name);
    expect_contents(n, want)?;
    let members = n.member_count()?;
    ensure!(members == 1, "{} members after the reset on {}, want 1", members, n.name);
    Ok(s)
}

pub fn restore(ctx: &Ctx, etcd: &Etcd, dir: &Path) -> Result<String> {
    let n = &ctx.nodes(dir, etcd)[0];
    let quiet = strings(&["--etcd-disable-snapshots"]);
    let s = n.start(&quiet)?;
    n.put(&[("/e2e/a", "1"), ("/e2e/b", "2")])?;
    let snap = n.save(&[])?;
    let want = Contents::read(n)?;
    n.put(&[("/e2e/c", "3")])?;
    n.del("/e2e/a")?;
    s.stop()?;
    let path = n.snapshots().join(&snap);
    reset(n, &[format!("--cluster-reset-restore-path={}", path.display())])?;
    ensure!(n.db().join("etcd-old/member").is_dir(), "the replaced data is not in etcd-old");
    start_restored(n, &want, &quiet)?.stop()?;
    Ok(format!("{} keys back from {snap}", want.keys.len()))
}

pub fn s3_restore(ctx: &Ctx, etcd: &Etcd, dir: &Path) -> Result<String> {
    let n = &ctx.nodes(dir, etcd)[0];
    let bucket = format!("restore-{}", etcd.short());
    ctx.s3.create_bucket(&bucket)?;
    let s3 = s3_flags(&bucket, "30s");
    let quiet = strings(&["--etcd-disable-snapshots"]);
    let s = n.start(&quiet)?;
    n.put(&[("/e2e/from-s3", "yes"), ("/e2e/b", "2")])?;
    n.load_bulk(12)?; // a multipart upload (parts of 8 MiB)
    let snap = n.save(&s3)?;
    let want = Contents::read(n)?;
    let object = ctx.s3.object(&bucket, &format!("k3s/{snap}"));
    ensure!(object.is_file(), "{snap} is not in the bucket ({})", object.display());
    ensure!(
        std::fs::metadata(&object)?.len() == std::fs::metadata(n.snapshots().join(&snap))?.len(),
        "the object's size differs from the local snapshot's"
    );
    // Only S3 has it now, so the restore must download it.
    std::fs::remove_file(n.snapshots().join(&snap))?;
    let _ = std::fs::remove_file(n.db().join(".metadata").join(&snap));
    n.put(&[("/e2e/later", "x")])?;
    n.del("/e2e/b")?;
    s.stop()?;
    let mut missing = s3.clone();
    missing.push("--cluster-reset-restore-path=no-such-snapshot-1".into());
    let out = n.run_server(&with(&["--cluster-reset"], &missing), Duration::from_secs(120))?;
    ensure!(
        !out.ok() && out.stderr.contains("no-such-snapshot-1"),
        "restoring a missing object was not refused by name: {}",
        out.describe()
    );
    ensure!(!n.db().join("etcd-old").exists(), "a refused restore moved the data");
    let mut args = s3.clone();
    args.push(format!("--cluster-reset-restore-path={snap}"));
    reset(n, &args)?;
    ensure!(n.snapshots().join(&snap).is_file(), "the object was not downloaded into the snapshot dir");
    start_restored(n, &want, &quiet)?.stop()?;
    Ok(format!("{} keys back from s3://{bucket}/k3s/{snap}", want.keys.len()))
}

/// Starts a server that joins `first`; a build without join support is [`Blocked`].
pub fn join(n: &Node, first: &Node, token: &str, extra: &[String]) -> Result<Server> {
    let mut args = vec![format!("--server={}", first.url()), format!("--token={token}")];
    args.extend_from_slice(extra);
    let mut s = n.spawn(&args)?;
    match s.wait_for_log(RUNNING, Duration::from_secs(120)) {
        Ok(()) => Ok(s),
        Err(e) => {
            let log = s.log_text();
            if log.contains("not supported by this build") {
                return Err(anyhow!(Blocked(format!(
                    "joining with --server is not implemented in this build yet ({}); no 3-member cluster",
                    tail(&log, 1)
                ))));
            }
            Err(e)
        }
    }
}

/// node1 with `--cluster-init`, node2 and node3 joining it one after the other; waits for three
/// members. `extra` goes to every server.
pub fn start_cluster(nodes: &[Node], extra: &[String]) -> Result<Vec<Server>> {
    let mut servers = vec![nodes[0].start(&with(&["--cluster-init"], extra))?];
    let token = nodes[0].token()?;
    for n in &nodes[1..] {
        servers.push(join(n, &nodes[0], &token, extra)?);
    }
    wait_until("three etcd members", Duration::from_secs(60), || Ok(nodes[0].member_count()? == 3))?;
    Ok(servers)
}

/// Stops servers, last first (the first server holds quorum longest).
pub fn stop_all(servers: Vec<Server>) -> Result<()> {
    let mut first_err = None;
    for s in servers.into_iter().rev() {
        if let Err(e) = s.stop() {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// An age key pair made by the stock `age-keygen`: (recipients file, identity file).
fn age_keys(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let keygen = ["/usr/bin/age-keygen", "/usr/local/bin/age-keygen"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("age-keygen is not installed; run `cargo xtask provision`"))?;
    let identity = dir.join("age.key");
    let out = std::process::Command::new(&keygen).arg("-o").arg(&identity).output()?;
    ensure!(out.status.success(), "age-keygen failed: {}", String::from_utf8_lossy(&out.stderr));
    let public = std::process::Command::new(&keygen).arg("-y").arg(&identity).output()?;
    ensure!(public.status.success(), "age-keygen -y failed");
    let recipients = dir.join("age.pub");
    std::fs::write(&recipients, &public.stdout)?;
    Ok((recipients, identity))
}

pub fn ha_restore(ctx: &Ctx, etcd: &Etcd, dir: &Path) -> Result<String> {
    let nodes = ctx.nodes(dir, etcd);
    let quiet = strings(&["--etcd-disable-snapshots"]);
    let servers = start_cluster(&nodes, &quiet)?;
    let token = nodes[0].token()?;
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    n1.put(&[("/e2e/ha-a", "1"), ("/e2e/ha-b", "2")])?;
    n2.put(&[("/e2e/ha-from-node2", "3")])?;
    // The snapshot is encrypted (age) and restored with the identity.
    let (recipients, identity) = age_keys(dir)?;
    let snap = n1.save(&[format!("--snapshot-encryption-recipients-file={}", recipients.display())])?;
    ensure!(snap.ends_with(".age"), "an encrypted save wrote {snap}, not a .age file");
    let want = Contents::read(n1)?;
    let snap_rev = n1.revision()?;
    n3.put(&[("/e2e/ha-later", "4")])?;
    n1.del("/e2e/ha-a")?;
    stop_all(servers)?;

    // The default restore moves the revision forward by 1e9 (and marks the past compacted).
    reset(
        n1,
        &[
            format!("--cluster-reset-restore-path={}", n1.snapshots().join(&snap).display()),
            format!("--etcd-snapshot-encryption-identity-file={}", identity.display()),
        ],
    )?;
    let s1 = start_restored(n1, &want, &quiet)?;
    let mut servers = vec![s1];

    // A joiner that still has its old db gets a clear error, not an etcd crash loop.
    let mut stale = n2.spawn(&with(&[&format!("--server={}", n1.url()), &format!("--token={token}")], &quiet))?;
    match stale.wait(Duration::from_secs(90)) {
        Ok(st) if !st.success() => {
            let log = stale.log_text();
            ensure!(
                log.to_lowercase().contains("delete"),
                "a joiner with its old db failed without saying to delete it: {}",
                tail(&log, 4)
            );
        }
        Ok(st) => bail!("a joiner with its old db exited {st} instead of refusing"),
        Err(e) => bail!("a joiner with its old db did not refuse: {e:#}"),
    }
    drop(stale);
    for n in [n2, n3] {
        std::fs::remove_dir_all(n.db())?;
        servers.push(join(n, n1, &token, &quiet)?);
    }
    wait_until("three etcd members after the rejoin", Duration::from_secs(60), || Ok(n1.member_count()? == 3))?;
    let bumped = snap_rev + 1_000_000_000;
    for n in &nodes {
        expect_contents(n, &want)?;
        let rev = n.revision()?;
        ensure!(rev >= bumped, "{} serves revision {rev}, below the bumped {bumped}", n.name);
    }
    stop_all(servers)?;
    Ok(format!(
        "encrypted snapshot restored on node1 (revision {snap_rev} bumped past {bumped}), stale joiner refused, 2 rejoined: 3 members serve exactly the {} keys of {snap} at the bumped revision",
        want.keys.len()
    ))
}
