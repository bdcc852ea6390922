//! Runs one benchmark operation a fixed number of times, untimed, for
//! instruction counting under callgrind (`benches/callgrind.sh`); also turns
//! the last criterion run into a Markdown table.
//!
//! ```text
//! icount list                    # every operation and its default iterations
//! icount describe                # every operation and its input
//! icount <operation> <n>         # prepare, run once to warm up, then run n times
//! icount criterion-table [DIR]   # medians of the last `cargo bench -p tessera-benches`
//! ```
//!
//! `icount <op> 0` does the preparation and the warm-up call only; the script
//! subtracts it, so the difference divided by n is the cost of one call.
//! The authority runs on a fixed clock so tokens and certificates have the
//! same timestamps on every run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use serde_json::Value;
use tessera_benches::{FixedClock, OpSpec, catalog};

const USAGE: &str = "usage: icount list | icount describe | icount <operation> <iterations> | icount criterion-table [DIR]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ops = catalog();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["list"] => {
            for op in &ops {
                println!("{} {}", op.name(), op.icount_iterations);
            }
            ExitCode::SUCCESS
        }
        ["describe"] => {
            for op in &ops {
                let prepared = op.prepare(Arc::new(FixedClock::default()));
                println!("{}: {}", op.name(), prepared.detail);
            }
            ExitCode::SUCCESS
        }
        ["criterion-table"] => criterion_table(&ops, &default_criterion_dir()),
        ["criterion-table", dir] => criterion_table(&ops, Path::new(dir)),
        [name, n] => {
            let Ok(n) = n.parse::<u64>() else {
                eprintln!("error: iterations must be a number, got {n:?}");
                return ExitCode::from(2);
            };
            let Some(op) = ops.iter().find(|op| op.name() == *name) else {
                eprintln!("error: no operation {name:?}; see `icount list`");
                return ExitCode::from(2);
            };
            let mut prepared = op.prepare(Arc::new(FixedClock::default()));
            // Warm-up: one-time lazy initialisation belongs to the baseline.
            (prepared.run)();
            for _ in 0..std::hint::black_box(n) {
                (prepared.run)();
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn default_criterion_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
        .join("criterion")
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Nanoseconds, with a unit that keeps 3–4 significant digits.
fn time(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// Medians from criterion's `<dir>/<group>/<bench>/new/estimates.json`, in
/// catalog order.
fn criterion_table(ops: &[OpSpec], dir: &Path) -> ExitCode {
    println!("| operation | median | 95% CI of the median | MAD | throughput at median |");
    println!("|---|---:|---:|---:|---:|");
    let mut found = 0;
    for op in ops {
        let bench_dir = dir.join(op.group).join(&op.param).join("new");
        let Some(estimates) = read_json(&bench_dir.join("estimates.json")) else {
            continue;
        };
        let median = &estimates["median"];
        let (Some(point), Some(lo), Some(hi), Some(mad)) = (
            median["point_estimate"].as_f64(),
            median["confidence_interval"]["lower_bound"].as_f64(),
            median["confidence_interval"]["upper_bound"].as_f64(),
            estimates["median_abs_dev"]["point_estimate"].as_f64(),
        ) else {
            eprintln!("error: {}: unexpected estimates.json", bench_dir.display());
            return ExitCode::FAILURE;
        };
        let throughput = read_json(&bench_dir.join("benchmark.json"))
            .and_then(|b| b["throughput"]["Bytes"].as_f64())
            .map_or_else(
                || format!("{:.0} /s", 1e9 / point),
                |bytes| format!("{:.0} MiB/s", bytes / (point / 1e9) / f64::from(1 << 20)),
            );
        println!(
            "| {} | {} | {} – {} | {:.1} % | {} |",
            op.name(),
            time(point),
            time(lo),
            time(hi),
            100.0 * mad / point,
            throughput
        );
        found += 1;
    }
    if found == 0 {
        eprintln!(
            "error: no results under {}; run `cargo bench -p tessera-benches` first",
            dir.display()
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
