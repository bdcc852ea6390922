//! `tessera audit`: checking the audit log.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Subcommand;

#[derive(Subcommand)]
pub(super) enum AuditCommand {
    /// Check the hash chain; report the first tampered, missing or torn record.
    Verify { file: PathBuf },
}

pub(super) fn audit_verify(file: &Path) -> anyhow::Result<()> {
    let report = crate::audit::verify_file(file)?;
    for line in &report.recovered_torn_lines {
        println!("line {line}: torn by a crash and acknowledged by a recovery record");
    }
    match report.first_problem {
        None => {
            println!(
                "{}: {} records, chain intact",
                file.display(),
                report.records
            );
            if let Some(last) = report.last {
                println!("last record: seq {} hash {}", last.seq, last.hash);
            }
            Ok(())
        }
        Some(p) => bail!("{}: {p}", file.display()),
    }
}
