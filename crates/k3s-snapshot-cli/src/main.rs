//! `k3s-snapshot`: the binary. `server` runs and supervises etcd with scheduled snapshots;
//! `etcd-snapshot` takes, lists, deletes and prunes snapshots on demand. This is the only crate
//! that parses flags, prints, installs the log subscriber and handles signals.

mod args;
mod bar;
mod config;
mod etcd;
mod generate;
mod inspect;
mod ls;
#[cfg(test)]
mod readme_commands;
mod remote;
mod s3args;
mod secret;
mod server;
mod snapshot;
mod snapshot_args;
mod verify;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "k3s-snapshot", version, about = "etcd snapshots, restore and cluster reset, the k3s way")]
struct Cli {
    /// Log format
    #[arg(long, global = true, value_enum, default_value = "text", env = "K3S_LOG_FORMAT")]
    log_format: LogFormat,
    /// Debug logging
    #[arg(long, global = true, env = "K3S_DEBUG")]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run etcd with scheduled snapshots, or reset the cluster from a snapshot
    Server(server::ServerArgs),
    /// Save, list, delete and prune etcd snapshots
    EtcdSnapshot(snapshot_args::SnapshotArgs),
    /// etcd's health: status per member, defragmentation, alarms
    Etcd(etcd::EtcdArgs),
    /// Print the shell completion script: `source <(k3s-snapshot completion bash)`
    Completion {
        /// Shell to complete for
        #[arg(value_enum)]
        shell: generate::CompletionShell,
    },
}

/// `k3s-snapshot generate-dist-files DIR`: man pages, completions and the example config.yaml
/// for `cargo xtask dist`. Not a clap subcommand, so that neither the completions nor the man
/// pages offer it (clap_complete lists hidden subcommands too).
const GENERATE_DIST_FILES: &str = "generate-dist-files";

fn init_logging(format: LogFormat, debug: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("K3S_SNAPSHOT_LOG").unwrap_or_else(|_| {
        EnvFilter::new(if debug { "debug,h2=info,hyper=info,tower=info,rustls=info" } else { "info" })
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let argv: Vec<_> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == GENERATE_DIST_FILES) {
        let [_, _, dir] = argv.as_slice() else {
            eprintln!("error: usage: k3s-snapshot {GENERATE_DIST_FILES} DIR");
            return ExitCode::from(2);
        };
        return match generate::write_dist_files(Cli::command(), std::path::Path::new(dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let merged = match config::merge(Cli::command(), argv) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::command().try_get_matches_from(&merged.argv).and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // Commands that only print what the clap definitions say: no logging, no runtime.
    match &cli.command {
        Command::Completion { shell } => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&generate::completion(Cli::command(), *shell));
            return ExitCode::SUCCESS;
        }
        Command::Server(_) | Command::EtcdSnapshot(_) | Command::Etcd(_) => {}
    }
    init_logging(cli.log_format, cli.debug);
    let cli_json = cli.log_format == LogFormat::Json;
    // The S3 client reads its proxy from the environment when it is built; set it while the
    // process still has one thread.
    let proxy = match &cli.command {
        Command::Server(a) => a.s3.proxy.clone(),
        Command::EtcdSnapshot(a) => a.common.s3.proxy.clone(),
        Command::Etcd(_) | Command::Completion { .. } => None,
    };
    if let Some(proxy) = proxy.filter(|p| !p.is_empty()) {
        for (k, v) in s3_backend::proxy_env(&proxy) {
            std::env::set_var(k, v);
        }
    }
    for w in &merged.warnings {
        tracing::warn!("{w}");
    }
    limit_malloc_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let cancel = CancellationToken::new();
        spawn_signal_handler(cancel.clone());
        let command = tokio::spawn(async move {
            match cli.command {
                Command::Server(args) => server::run(args, cancel).await,
                Command::EtcdSnapshot(args) => snapshot::run(args, cancel).await,
                Command::Etcd(args) => etcd::run(args).await,
                Command::Completion { .. } => Ok(()),
            }
        });
        command.await.unwrap_or_else(|e| Err(anyhow::anyhow!("the command stopped unexpectedly: {e}")))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr; with JSON logs, also as a log record for collectors.
            let msg = format!("{e:#}").replace('\n', " ");
            if cli_json {
                tracing::error!("{msg}");
            }
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM, SIGINT or SIGHUP cancels the token (a lost terminal must not leave etcd running
/// without us); a second one stops our child processes (etcd, etcdutl) at once and exits.
fn spawn_signal_handler(cancel: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
        else {
            return;
        };
        for n in 0..2 {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => "SIGHUP",
            };
            if n == 0 {
                tracing::info!(signal = name, "signal received, shutting down");
                cancel.cancel();
            } else {
                tracing::warn!(signal = name, "second signal: killing etcd and exiting now");
                k3s_server_hooks::children::kill_all();
                std::process::exit(130);
            }
        }
    });
}

/// glibc gives each thread that allocates under contention an arena of its own, and memory freed
/// in one is not reused by another: with the runtime's workers and blocking threads, a save to S3
/// peaked at 36 MiB resident for a 6 MiB heap. One arena (each thread keeps its own cache of
/// small blocks in front of it) brought that to 28.5 MiB at the same speed (2 arenas: 31 MiB;
/// measured 2026-12-06). Unless the operator set `MALLOC_ARENA_MAX`; called while the process
/// still has one thread.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
        #[allow(unsafe_code)]
        unsafe {
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("k3s-snapshot").chain(args.iter().copied()))
    }

    fn snapshot_args(args: &[&str]) -> snapshot_args::SnapshotArgs {
        match parse(args).unwrap().command {
            Command::EtcdSnapshot(a) => a,
            other => panic!("not etcd-snapshot: {other:?}"),
        }
    }

    #[test]
    fn debug_of_the_parsed_arguments_shows_no_secret() {
        let secrets = ["tok-Secret-1", "s3-Secret-2", "session-Secret-3"];
        for args in [
            vec![
                "server",
                "--token",
                secrets[0],
                "--etcd-s3-secret-key",
                secrets[1],
                "--etcd-s3-session-token",
                secrets[2],
            ],
            vec![
                "etcd-snapshot",
                "save",
                "--token",
                secrets[0],
                "--s3-secret-key",
                secrets[1],
                "--s3-session-token",
                secrets[2],
            ],
        ] {
            let shown = format!("{:?}", parse(&args).unwrap());
            for s in secrets {
                assert!(!shown.contains(s), "{s} in {shown}");
            }
            assert!(shown.contains("<redacted>"), "{shown}");
        }
    }

    #[test]
    fn bare_etcd_snapshot_is_save_with_k3s_defaults() {
        let a = snapshot_args(&["etcd-snapshot"]);
        assert!(a.command.is_none());
        assert_eq!(a.common.name, "on-demand");
        assert_eq!(a.common.retention, 5);
        assert!(!a.common.compress && !a.common.s3.enabled);
        assert_eq!(a.common.s3.endpoint, "s3.amazonaws.com");
        assert_eq!(a.common.s3.region, "us-east-1");
        assert_eq!(a.common.s3.retention, 5);
        assert_eq!(a.common.s3.timeout, std::time::Duration::from_secs(300));
    }

    #[test]
    fn both_spellings_of_the_snapshot_and_s3_flags_parse() {
        for (dir, ret, compress, s3, bucket, folder) in [
            ("--dir", "--snapshot-retention", "--snapshot-compress", "--s3", "--s3-bucket", "--s3-folder"),
            (
                "--etcd-snapshot-dir",
                "--etcd-snapshot-retention",
                "--etcd-snapshot-compress",
                "--etcd-s3",
                "--etcd-s3-bucket",
                "--etcd-s3-folder",
            ),
        ] {
            let a =
                snapshot_args(&["etcd-snapshot", "prune", dir, "/x", ret, "3", compress, s3, bucket, "b", folder, "f"]);
            assert!(matches!(a.command, Some(snapshot_args::SnapshotCommand::Prune)));
            assert_eq!(a.common.dir.as_deref(), Some(std::path::Path::new("/x")));
            assert_eq!(a.common.retention, 3);
            assert!(a.common.compress && a.common.s3.enabled);
            assert_eq!(a.common.s3.bucket.as_deref(), Some("b"));
            assert_eq!(a.common.s3.folder, "f");
        }
    }

    #[test]
    fn flags_may_come_before_or_after_the_subcommand() {
        let a = snapshot_args(&["etcd-snapshot", "--name", "x", "save", "--node-name", "n"]);
        assert_eq!(a.common.name, "x");
        assert_eq!(a.common.node_name.as_deref(), Some("n"));
    }

    #[test]
    fn ls_aliases_and_output_formats() {
        for alias in ["ls", "list", "l"] {
            let a = snapshot_args(&["etcd-snapshot", alias, "-o", "yaml"]);
            assert!(matches!(a.command, Some(snapshot_args::SnapshotCommand::Ls { output: args::OutputFormat::Yaml })));
        }
        assert!(parse(&["etcd-snapshot", "ls", "-o", "xml"]).is_err());
    }

    #[test]
    fn s3_options_all_parse() {
        let a = snapshot_args(&[
            "etcd-snapshot",
            "--s3",
            "--s3-endpoint",
            "h:9000",
            "--s3-endpoint-ca",
            "/ca.pem",
            "--s3-skip-ssl-verify",
            "--s3-access-key",
            "AK",
            "--s3-secret-key",
            "SK",
            "--s3-session-token",
            "ST",
            "--s3-region",
            "eu-west-1",
            "--s3-insecure",
            "--s3-timeout",
            "30s",
            "--s3-retention",
            "-1",
            "--s3-bucket-lookup-type",
            "path",
            "--s3-proxy",
            "http://proxy:3128",
        ]);
        let s = &a.common.s3;
        assert_eq!(s.endpoint, "h:9000");
        assert!(s.skip_ssl_verify && s.insecure);
        assert_eq!(s.timeout.as_secs(), 30);
        assert_eq!(s.retention, -1);
        assert_eq!(s.bucket_lookup, s3args::BucketLookup::Path);
        let debug = format!("{s:?}");
        assert!(!debug.contains("SK") && !debug.contains("ST"), "secrets redacted: {debug}");
    }

    #[test]
    fn encryption_and_sse_flags_parse_in_both_spellings() {
        for (rec, id, sse, kms) in [
            (
                "--snapshot-encryption-recipients-file",
                "--snapshot-encryption-identity-file",
                "--s3-sse",
                "--s3-sse-kms-key-id",
            ),
            (
                "--etcd-snapshot-encryption-recipients-file",
                "--etcd-snapshot-encryption-identity-file",
                "--etcd-s3-sse",
                "--etcd-s3-sse-kms-key-id",
            ),
        ] {
            let a =
                snapshot_args(&["etcd-snapshot", "save", rec, "/r.txt", id, "/k.txt", sse, "aws:kms", kms, "alias/x"]);
            assert_eq!(a.common.encryption_recipients_file.as_deref(), Some(std::path::Path::new("/r.txt")));
            assert_eq!(a.common.encryption_identity_file.as_deref(), Some(std::path::Path::new("/k.txt")));
            assert_eq!(a.common.s3.sse.as_deref(), Some("aws:kms"));
            assert_eq!(a.common.s3.sse_kms_key_id.as_deref(), Some("alias/x"));
        }
        assert!(parse(&["etcd-snapshot", "--s3-sse", "aes256"]).is_err(), "only AES256 or aws:kms");
        let a = snapshot_args(&["etcd-snapshot", "--s3", "--s3-bucket", "b", "--s3-sse-kms-key-id", "k"]);
        let e = a.common.s3.to_config().unwrap_err().to_string();
        assert!(e.contains("--etcd-s3-sse aws:kms"), "{e}");
        let s = match parse(&[
            "server",
            "--etcd-snapshot-encryption-recipients-file",
            "/r.txt",
            "--etcd-snapshot-encryption-identity-file",
            "/k.txt",
            "--etcd-s3-sse",
            "AES256",
        ])
        .unwrap()
        .command
        {
            Command::Server(s) => s,
            other => panic!("not server: {other:?}"),
        };
        assert_eq!(s.etcd_snapshot_encryption_recipients_file.as_deref(), Some(std::path::Path::new("/r.txt")));
        assert_eq!(s.etcd_snapshot_encryption_identity_file.as_deref(), Some(std::path::Path::new("/k.txt")));
        assert_eq!(s.s3.sse.as_deref(), Some("AES256"));
    }

    #[test]
    fn object_lock_and_customer_key_flags_parse_in_both_spellings() {
        for prefix in ["--s3-", "--etcd-s3-"] {
            let f = |name: &str| format!("{prefix}{name}");
            let args = [
                "etcd-snapshot".to_string(),
                "--s3".into(),
                f("bucket"),
                "b".into(),
                f("object-lock-mode"),
                "COMPLIANCE".into(),
                f("object-lock-days"),
                "30".into(),
                f("sse-customer-key-file"),
                "/etc/k3s/sse-c.key".into(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let cfg = snapshot_args(&args).common.s3.to_config().unwrap().unwrap();
            assert_eq!(
                cfg.object_lock,
                Some(s3_backend::ObjectLock { mode: s3_backend::LockMode::Compliance, days: 30 })
            );
            assert_eq!(cfg.sse_customer_key_file.as_deref(), Some(std::path::Path::new("/etc/k3s/sse-c.key")));
        }
        assert!(parse(&["etcd-snapshot", "--s3-object-lock-mode", "WORM"]).is_err());
        assert!(parse(&["etcd-snapshot", "--s3-object-lock-days", "-1"]).is_err());
        let a = snapshot_args(&["etcd-snapshot", "--s3", "--s3-bucket", "b", "--s3-object-lock-days", "3"]);
        let e = a.common.s3.to_config().unwrap_err().to_string();
        assert!(e.contains("--etcd-s3-object-lock-mode"), "{e}");
        let s = match parse(&["server", "--etcd-s3-object-lock-mode", "GOVERNANCE", "--etcd-s3-object-lock-days", "7"])
            .unwrap()
            .command
        {
            Command::Server(s) => s,
            other => panic!("not server: {other:?}"),
        };
        assert_eq!((s.s3.object_lock_mode.as_deref(), s.s3.object_lock_days), (Some("GOVERNANCE"), Some(7)));
    }

    #[test]
    fn completion_takes_bash_zsh_or_fish() {
        for shell in ["bash", "zsh", "fish"] {
            assert!(matches!(parse(&["completion", shell]).unwrap().command, Command::Completion { .. }), "{shell}");
        }
        assert!(parse(&["completion", "tcsh"]).is_err());
        assert!(parse(&["completion"]).is_err());
        // Not a clap subcommand: handled before parsing, so help and completions never show it.
        assert!(parse(&[GENERATE_DIST_FILES, "/tmp/x"]).is_err());
    }

    #[test]
    fn etcd_subcommands_parse() {
        for args in [
            &["etcd", "status", "-o", "json"][..],
            &["etcd", "defrag"],
            &["etcd", "alarm", "list"],
            &["etcd", "alarm", "disarm", "--data-dir", "/d"],
        ] {
            assert!(matches!(parse(args).unwrap().command, Command::Etcd(_)), "{args:?}");
        }
        let Command::Etcd(a) = parse(&[
            "etcd",
            "status",
            "--etcd-endpoints",
            "https://a:2379,https://b:2379",
            "--quota-backend-bytes",
            "8Gi",
        ])
        .unwrap()
        .command
        else {
            unreachable!()
        };
        assert_eq!(a.etcd.etcd_endpoints.len(), 2);
        assert_eq!(a.quota_backend_bytes, Some(8 << 30));
        assert!(parse(&["etcd", "alarm"]).is_err());
        assert!(parse(&["etcd", "status", "--quota-backend-bytes", "big"]).is_err());
    }

    #[test]
    fn delete_needs_a_name_and_retention_needs_a_number() {
        assert!(parse(&["etcd-snapshot", "delete"]).is_err());
        assert!(parse(&["etcd-snapshot", "prune", "--snapshot-retention", "five"]).is_err());
        assert!(parse(&["etcd-snapshot", "status"]).is_err());
    }
}
