//! `etcd-snapshot inspect keys|get|diff|export`: surgical recovery, read-only. A snapshot is
//! opened as a restore would find and fetch it ([`k3s_server_hooks::inspect::open`]: path, name,
//! `latest`, S3, zip, age, a delta chain replayed into a scratch copy), then read natively
//! ([`k3s_snapshot_core::inspect`]); values are decoded as Kubernetes stores them. Nothing is
//! restored, no etcd is started, and nothing is ever written into a live etcd: `export` prints
//! manifests for `kubectl apply`, which goes through the API server (admission, validation,
//! watches and caches stay right), where writing into etcd behind its back would not.
//!
//! Results go to stdout; what a value could not be (one line per key) to stderr, and the command
//! then exits 1 after doing every other key.

mod diff;
mod export;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use base64::Engine as _;
use k3s_server_hooks::inspect::{InspectRequest, Opened};
use k3s_snapshot_core::bbolt::Db;
use k3s_snapshot_core::inspect::at_rest::KeyRing;
use k3s_snapshot_core::inspect::k8s::{self, Decoded};
use k3s_snapshot_core::inspect::{self as core, Entry};

use crate::args::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    #[command(subcommand)]
    pub command: InspectCommand,
}

/// Where to read from, beside the snapshot's name: the chain and the keys for values encrypted
/// at rest.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// Read the state after replaying the delta chain that follows the snapshot
    #[arg(long)]
    pub deltas: bool,
    /// Read the state at this revision (from the chain when it is past the snapshot's; implies
    /// --deltas then)
    #[arg(long, visible_alias = "revision", conflicts_with = "to_time")]
    pub to_revision: Option<i64>,
    /// Read the state before this time, RFC 3339 (the newest snapshot taken before it with
    /// `latest`, and its chain up to that time)
    #[arg(long, value_parser = crate::server::parse_rfc3339)]
    pub to_time: Option<i64>,
    /// The API server's EncryptionConfiguration, to decrypt values encrypted at rest (k3s:
    /// ${data-dir}/server/cred/encryption-config.json)
    #[arg(long, value_name = "FILE")]
    pub encryption_config: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum InspectCommand {
    /// List the keys of a snapshot with their mod revision, version, lease and value size
    Keys {
        /// `latest`, a snapshot name (in S3 with --s3, else in the snapshot dir), or a path
        snapshot: String,
        #[command(flatten)]
        source: SourceArgs,
        /// Only keys starting with this
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many keys
        #[arg(long)]
        limit: Option<usize>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: ListFormat,
    },
    /// Print one value (decoded), or every version of it the snapshot and chain still hold
    Get {
        snapshot: String,
        key: String,
        #[command(flatten)]
        source: SourceArgs,
        /// Every version still held (compaction removes older ones), oldest first
        #[arg(long)]
        history: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value = "yaml")]
        output: ObjectFormat,
    },
    /// Keys added, removed and changed from A to B (each `NAME[@REVISION]`), or from A to the
    /// live cluster (--live, through --data-dir or --etcd-endpoints), with a summary by resource
    /// and namespace
    Diff {
        a: String,
        /// The second snapshot (not with --live)
        #[arg(required_unless_present = "live", conflicts_with = "live")]
        b: Option<String>,
        /// Compare with the live cluster's etcd
        #[arg(long)]
        live: bool,
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: ListFormat,
    },
    /// Print objects as manifests for `kubectl apply` (server-set fields and status removed)
    Export {
        snapshot: String,
        #[command(flatten)]
        source: SourceArgs,
        /// Objects whose key starts with this (e.g. /registry/secrets/prod/)
        #[arg(long, required_unless_present = "namespace")]
        prefix: Option<String>,
        /// Objects of this namespace (and the Namespace itself)
        #[arg(long, conflicts_with = "prefix")]
        namespace: Option<String>,
        /// Only this kind (Secret, secrets, …)
        #[arg(long)]
        kind: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "yaml")]
        output: ObjectFormat,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ObjectFormat {
    Yaml,
    Json,
}

/// An opened snapshot and its image.
pub(crate) struct Source {
    pub opened: Opened,
    pub db: Db,
}

impl Source {
    /// Where the state is read at, for what is printed.
    pub fn describe(&self, at: i64) -> String {
        match self.opened.replayed {
            Some((base, reached, n)) => format!(
                "snapshot {} (revision {base}) + {n} delta segments to revision {reached}, at revision {at}",
                self.opened.name
            ),
            None => format!("snapshot {} at revision {at}", self.opened.name),
        }
    }
}

pub(crate) async fn open(common: &CommonArgs, target: &str, s: &SourceArgs) -> anyhow::Result<Source> {
    let cfg = crate::verify::base_config(common, None).await?;
    let req = InspectRequest {
        target: target.to_string(),
        deltas: s.deltas || s.to_time.is_some(),
        to_revision: s.to_revision,
        to_time: s.to_time,
    };
    let opened = k3s_server_hooks::inspect::open(&cfg, &req).await?;
    let db = Db::open_image(&opened.db, opened.image_len)
        .map_err(|e| anyhow::anyhow!("{}: {e}; the snapshot is damaged", opened.name))?;
    Ok(Source { opened, db })
}

fn keyring(s: &SourceArgs) -> anyhow::Result<Option<KeyRing>> {
    s.encryption_config.as_deref().map(KeyRing::from_file).transpose().map_err(Into::into)
}

/// Counts the keys whose value could not be decoded, each reported in one line on stderr.
#[derive(Default)]
pub(crate) struct Failures(usize);

impl Failures {
    pub fn report(&mut self, key: &[u8], why: &str) {
        self.0 += 1;
        eprintln!("error: {}: {why}", show_key(key));
    }

    pub fn finish(self) -> anyhow::Result<()> {
        match self.0 {
            0 => Ok(()),
            n => bail!("{n} key(s) could not be read (each named above); everything else was printed"),
        }
    }
}

/// A key for printing: as text, with control characters escaped.
pub(crate) fn show_key(k: &[u8]) -> String {
    String::from_utf8_lossy(k).escape_debug().to_string()
}

pub async fn run(common: &CommonArgs, args: InspectArgs) -> anyhow::Result<()> {
    match args.command {
        InspectCommand::Keys { snapshot, source, prefix, limit, output } => {
            let src = open(common, &snapshot, &source).await?;
            keys(&src, &prefix, limit, output)
        }
        InspectCommand::Get { snapshot, key, source, history, output } => {
            let ring = keyring(&source)?;
            let src = open(common, &snapshot, &source).await?;
            get(&src, key.as_bytes(), history, output, ring.as_ref())
        }
        InspectCommand::Diff { a, b, live, source, prefix, output } => {
            let ring = keyring(&source)?;
            diff::run(common, &a, b.as_deref(), live, &source, &prefix, output, ring.as_ref()).await
        }
        InspectCommand::Export { snapshot, source, prefix, namespace, kind, output } => {
            let ring = keyring(&source)?;
            let src = open(common, &snapshot, &source).await?;
            let sel = export::Selection { prefix, namespace, kind };
            export::run(&src, &sel, output, ring.as_ref())
        }
    }
}

fn keys(src: &Source, prefix: &str, limit: Option<usize>, output: ListFormat) -> anyhow::Result<()> {
    let scan = core::state(&src.db, src.opened.at, prefix.as_bytes())?;
    eprintln!("# {}", src.describe(scan.revision));
    if src.opened.at.is_some_and(|a| a < scan.compacted) {
        eprintln!("# warning: revisions up to {} were compacted: keys changed after then show their newest state only up to that point", scan.compacted);
    }
    let mut out = std::io::stdout().lock();
    let rows = scan.keys.iter().take(limit.unwrap_or(usize::MAX));
    match output {
        ListFormat::Table => {
            writeln!(out, "{:<12} {:>8} {:>18} {:>10}  KEY", "MODREV", "VERSION", "LEASE", "SIZE")?;
            for (k, e) in rows {
                writeln!(
                    out,
                    "{:<12} {:>8} {:>18} {:>10}  {}",
                    e.revision,
                    e.version,
                    lease(e),
                    e.value_len,
                    show_key(k)
                )?;
            }
        }
        ListFormat::Json => {
            let items: Vec<serde_json::Value> = rows.map(|(k, e)| key_json(k, e)).collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
        }
    }
    Ok(())
}

fn lease(e: &Entry) -> String {
    if e.lease == 0 {
        "-".into()
    } else {
        format!("{:x}", e.lease)
    }
}

fn key_json(k: &[u8], e: &Entry) -> serde_json::Value {
    serde_json::json!({
        "key": String::from_utf8_lossy(k),
        "modRevision": e.revision,
        "createRevision": e.create_revision,
        "version": e.version,
        "lease": e.lease,
        "size": e.value_len,
    })
}

fn get(src: &Source, key: &[u8], history: bool, output: ObjectFormat, ring: Option<&KeyRing>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let mut failures = Failures::default();
    if history {
        let versions = core::history(&src.db, key, src.opened.at)?;
        if versions.is_empty() {
            bail!("key {} is not in {} (no version of it is left)", show_key(key), src.opened.name);
        }
        eprintln!("# {} versions of {} in {}", versions.len(), show_key(key), src.opened.name);
        for v in versions {
            if v.tombstone {
                writeln!(out, "# revision {}: deleted", v.entry.revision)?;
                continue;
            }
            writeln!(
                out,
                "# revision {} (version {}, created at revision {})",
                v.entry.revision, v.entry.version, v.entry.create_revision
            )?;
            print_value(&mut out, src, key, &v.entry, output, ring, &mut failures)?;
        }
        return failures.finish();
    }
    let scan = core::state(&src.db, src.opened.at, key)?;
    let Some(e) = scan.keys.get(key) else {
        bail!(
            "key {} is not in {} at revision {}; `inspect keys --prefix` lists what is there, `get --history` what is left of it",
            show_key(key),
            src.opened.name,
            scan.revision
        );
    };
    eprintln!("# {}: {} (mod revision {})", src.describe(scan.revision), show_key(key), e.revision);
    print_value(&mut out, src, key, e, output, ring, &mut failures)?;
    failures.finish()
}

/// Prints one value decoded: an object as YAML or JSON, text as it is, bytes as base64; what
/// cannot be printed is a failure line.
fn print_value(
    out: &mut impl Write,
    src: &Source,
    key: &[u8],
    e: &Entry,
    output: ObjectFormat,
    ring: Option<&KeyRing>,
    failures: &mut Failures,
) -> anyhow::Result<()> {
    let value = core::value_at(&src.db, e)?;
    match k8s::decode(value, ring) {
        Err(why) => failures.report(key, &why),
        Ok(Decoded::Object { json, .. }) => write_object(out, &json, output)?,
        Ok(Decoded::Undecoded { api_version, kind, raw_len }) => failures.report(
            key,
            &format!(
                "a {kind} ({api_version}) stored as protobuf, a type this build does not decode ({raw_len} bytes)"
            ),
        ),
        Ok(Decoded::Encrypted { provider, key_name, why }) => {
            failures.report(key, &format!("encrypted at rest ({provider}, key {key_name:?}): {why}"))
        }
        Ok(Decoded::Text(t)) => writeln!(out, "{t}")?,
        Ok(Decoded::Binary(b)) => writeln!(out, "{}", base64::engine::general_purpose::STANDARD.encode(b))?,
    }
    Ok(())
}

pub(crate) fn write_object(out: &mut impl Write, json: &serde_json::Value, output: ObjectFormat) -> anyhow::Result<()> {
    match output {
        ObjectFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(json)?)?,
        ObjectFormat::Yaml => write!(out, "{}", serde_yaml::to_string(json).context("writing YAML")?)?,
    }
    Ok(())
}
