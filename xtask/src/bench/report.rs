//! The bench's output: the table and ratio lines printed per size, the machine it ran on,
//! `results.json`, and `--redraw` of the charts from a `results.json`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::measure::Measured;
use super::{chart, Row, Scenario, MIB};

/// `--redraw FILE`: the chart of a `results.json` again (after a change to the chart itself),
/// next to it as `bench.png`, without measuring anything.
pub(super) fn redraw(file: &Path) -> Result<()> {
    chart::font()?;
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(file).with_context(|| format!("read {}", file.display()))?)
            .with_context(|| format!("{} is not a results.json", file.display()))?;
    let secs = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array().map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect()).unwrap_or_default()
    };
    if let Some(rows) = doc["replay"]["rows"].as_array() {
        let png = file.with_file_name("bench-replay.png");
        chart::draw_replay(&png, rows)?;
        println!("wrote {}", png.display());
    }
    let mut sizes = Vec::new();
    for size in doc["sizes"].as_array().unwrap_or(&Vec::new()) {
        let mib = size["values_mib"].as_u64().context("a size without values_mib")? as usize;
        let mut rows = Vec::new();
        for sc in size["scenarios"].as_array().context("a size without scenarios")? {
            let key = sc["scenario"].as_str().context("a scenario without a name")?;
            let Some(scenario) = Scenario::ALL.into_iter().find(|s| s.key() == key) else { continue };
            let peak = sc["our_peak_rss_kib"].as_u64().unwrap_or(0);
            let mut row = Row::new(scenario);
            let cpu = secs(&sc["ours_cpu_s"]);
            for (i, wall) in secs(&sc["ours_s"]).into_iter().enumerate() {
                row.ours.push(Measured {
                    wall: Duration::from_secs_f64(wall),
                    maxrss_kib: peak,
                    own_hwm_kib: Some(peak),
                    anon_peak_kib: sc["our_anon_peak_kib_sampled"].as_u64(),
                    cpu: Duration::from_secs_f64(cpu.get(i).copied().unwrap_or(0.0)),
                });
            }
            row.reference = secs(&sc["reference_s"]).into_iter().map(Duration::from_secs_f64).collect();
            row.reference_rss_kib = vec![sc["reference_peak_rss_kib"].as_u64().unwrap_or(0)];
            rows.push(row);
        }
        sizes.push((mib, rows));
    }
    if sizes.len() < 2 {
        if doc["replay"]["rows"].is_array() {
            return Ok(());
        }
        bail!("{} has {} db size(s); a chart needs at least two", file.display(), sizes.len());
    }
    let png = file.with_file_name("bench.png");
    chart::draw(&png, &sizes.iter().map(|(s, rows)| (*s, rows.as_slice())).collect::<Vec<_>>())?;
    println!("wrote {}", png.display());
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(super) fn print_report(size: usize, snap_bytes: u64, runs: usize, rows: &[Row]) {
    println!(
        "\n== db with {size} MiB of values (snapshot {:.1} MiB), median of {runs} interleaved runs",
        snap_bytes as f64 / MIB
    );
    println!(
        "{:<11} {:>9} {:>9} {:>7} {:>8} {:>13} {:>10}  reference",
        "scenario", "ours", "ref", "ratio", "our CPU", "our peak RSS", "(anon)"
    );
    for r in rows {
        println!(
            "{:<11} {:>8.2}s {:>8.2}s {:>6.2}x {:>7.2}s {:>9.1} MiB {:>6.1} MiB  {}",
            r.scenario.key(),
            r.ours_median(),
            r.reference_median(),
            r.ratio(),
            r.ours_cpu_median(),
            mib(r.our_peak_kib()),
            mib(r.our_anon_peak_kib()),
            r.scenario.reference()
        );
    }
    println!();
    // Every run's time, in the order they ran (the two sides alternate: ABBA), and the spread.
    for r in rows {
        let runs = |v: Vec<f64>| v.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>().join(" ");
        let spread = |v: &[f64]| {
            let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(l, h), &t| (l.min(t), h.max(t)));
            100.0 * (hi - lo) / super::median(v.to_vec())
        };
        let ours: Vec<f64> = r.ours.iter().map(|m| m.wall.as_secs_f64()).collect();
        let reference: Vec<f64> = r.reference.iter().map(Duration::as_secs_f64).collect();
        println!(
            "{:<11} ours [{}] spread {:.0}%; ref [{}] spread {:.0}%",
            r.scenario.key(),
            runs(ours.clone()),
            spread(&ours),
            runs(reference.clone()),
            spread(&reference)
        );
    }
    println!();
    // Where the CPU goes for the rows that read the bench's etcd (medians per run, seconds).
    for r in rows.iter().filter(|r| matches!(r.scenario, Scenario::Limit | Scenario::Save | Scenario::SaveS3)) {
        let med = |v: &[super::ServersCpu], f: fn(&super::ServersCpu) -> f64| super::median(v.iter().map(f).collect());
        println!(
            "{:<11} CPU s, ours: self {:.2}, etcd {:.2}, s3s-fs {:.2}; reference runs: etcd {:.2}, s3s-fs {:.2}",
            r.scenario.key(),
            r.ours_cpu_median(),
            med(&r.ours_servers_cpu, |c| c.etcd),
            med(&r.ours_servers_cpu, |c| c.s3),
            med(&r.reference_servers_cpu, |c| c.etcd),
            med(&r.reference_servers_cpu, |c| c.s3),
        );
    }
    println!();
    let limit_file = rows.iter().find(|r| r.scenario == Scenario::Limit).map(Row::ours_median);
    let against_limit = |r: &Row, target: f64| {
        limit_file
            .map(|l| format!("; {:.2}x the file-writing limit (target <= {target:.2}x)", r.ours_median() / l))
            .unwrap_or_default()
    };
    let save_alone = rows.iter().find(|r| r.scenario == Scenario::Save).map(Row::reference_median);
    for r in rows {
        let line = match r.scenario {
            Scenario::Limit => format!(
                "limit: writing the stream to a file {:.2} s, only reading it {:.2} s (the file costs {:.2}x)",
                r.ours_median(),
                r.reference_median(),
                r.ratio()
            ),
            Scenario::Save => {
                format!("save: {:.2}x etcdctl snapshot save (target <= 0.90x){}", r.ratio(), against_limit(r, 1.10))
            }
            Scenario::SaveS3 => {
                let alone = save_alone
                    .map(|s| format!("; {:.2}x etcdctl snapshot save alone (target <= 1.10x)", r.ours_median() / s))
                    .unwrap_or_default();
                format!("save+s3: {:.2}x etcdctl snapshot save + curl PUT{alone}{}", r.ratio(), against_limit(r, 1.30))
            }
            Scenario::Restore => {
                let plain = rows.iter().find(|x| x.scenario == Scenario::RestoreNoBump);
                let bump = plain
                    .map(|p| format!("; the revision bump costs {:.2} s", r.ours_median() - p.ours_median()))
                    .unwrap_or_default();
                format!("restore: {:.2}x etcdutl snapshot restore + etcd start (target <= 1.0x){bump}", r.ratio())
            }
            Scenario::RestoreNoBump => {
                format!("restore without the bump: {:.2}x etcdutl snapshot restore + etcd start", r.ratio())
            }
            Scenario::Status => format!("status: {:.2}x etcdutl snapshot status (with the sha256 check)", r.ratio()),
            Scenario::StatusFast => {
                format!("status --skip-hash-check: {:.2}x etcdutl snapshot status (target <= 1x)", r.ratio())
            }
            Scenario::SaveS3Age => {
                format!("save+s3+age: {:.2}x our unencrypted save+s3 (target <= 1.2x)", r.ratio())
            }
            Scenario::RestoreS3 => {
                format!("restore from S3: {:.2}x curl GET + etcdutl snapshot restore + etcd start", r.ratio())
            }
            Scenario::DeltaOverhead | Scenario::Replay => continue,
        };
        println!("{line}");
    }
    let rss: Vec<String> =
        rows.iter().map(|r| format!("{} {:.1} MiB", r.scenario.key(), mib(r.our_peak_kib()))).collect();
    println!("peak RSS: {} (target <= 38 MiB, etcdctl's)", rss.join(", "));
}

pub(super) struct Machine {
    date: String,
    cores: usize,
    mem_gib: f64,
    kernel: String,
    etcd: String,
    s3s_fs: String,
}

pub(super) fn machine() -> Machine {
    let first_line = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_string())
            .unwrap_or_default()
    };
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0);
    Machine {
        date: first_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        mem_gib: mem_kib / 1024.0 / 1024.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        etcd: "3.5.1".into(),
        s3s_fs: first_line("s3s-fs", &["--version"]),
    }
}

pub(super) fn results_json(m: &Machine, runs: usize, sizes: &[(usize, u64, Vec<Row>)]) -> serde_json::Value {
    let secs = |v: &[Duration]| v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>();
    json!({
        "date": m.date,
        "machine": { "cores": m.cores, "mem_gib": (m.mem_gib * 10.0).round() / 10.0, "kernel": m.kernel, "etcd": m.etcd, "s3s_fs": m.s3s_fs },
        "runs": runs,
        "sizes": sizes.iter().map(|(size, snap, rows)| json!({
            "values_mib": size,
            "snapshot_bytes": snap,
            "scenarios": rows.iter().map(|r| json!({
                "scenario": r.scenario.key(),
                "reference": r.scenario.reference(),
                "ours_s": secs(&r.ours.iter().map(|m| m.wall).collect::<Vec<_>>()),
                "reference_s": secs(&r.reference),
                "ours_median_s": r.ours_median(),
                "reference_median_s": r.reference_median(),
                "ratio": r.ratio(),
                "ours_cpu_s": secs(&r.ours.iter().map(|m| m.cpu).collect::<Vec<_>>()),
                "our_peak_rss_kib": r.our_peak_kib(),
                "our_anon_peak_kib_sampled": r.our_anon_peak_kib(),
                "our_maxrss_with_children_kib": r.ours.iter().map(|m| m.maxrss_kib).max(),
                "reference_peak_rss_kib": r.reference_rss_kib.iter().max(),
                "ours_etcd_cpu_s": r.ours_servers_cpu.iter().map(|c| c.etcd).collect::<Vec<_>>(),
                "ours_s3s_fs_cpu_s": r.ours_servers_cpu.iter().map(|c| c.s3).collect::<Vec<_>>(),
                "reference_etcd_cpu_s": r.reference_servers_cpu.iter().map(|c| c.etcd).collect::<Vec<_>>(),
                "reference_s3s_fs_cpu_s": r.reference_servers_cpu.iter().map(|c| c.s3).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
