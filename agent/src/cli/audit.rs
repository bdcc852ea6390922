//! `tessera audit`: checking the audit log.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Subcommand;

use crate::audit::{AnchorState, anchor};

#[derive(Subcommand)]
pub(super) enum AuditCommand {
    /// Check the hash chain, and against the anchor that every acknowledged
    /// record is present and unchanged; report the first tampered, missing
    /// or torn record.
    Verify {
        file: PathBuf,
        /// The log's anchor (default: FILE.anchor, or `exchange.audit_anchor`
        /// wherever the agent keeps it).
        #[arg(long, conflicts_with = "no_anchor")]
        anchor: Option<PathBuf>,
        /// Check the chain alone (a log from before anchoring, or a copy
        /// without its anchor): truncation and rewriting go unnoticed.
        #[arg(long)]
        no_anchor: bool,
    },
}

pub(super) fn audit_verify(
    file: &Path,
    anchor: Option<&Path>,
    no_anchor: bool,
) -> anyhow::Result<()> {
    let anchor_path =
        (!no_anchor).then(|| anchor.map_or_else(|| anchor::default_path(file), Path::to_path_buf));
    let report = crate::audit::verify_file(file, anchor_path.as_deref())?;
    for line in &report.recovered_torn_lines {
        println!("line {line}: torn by a crash and acknowledged by a recovery record");
    }
    if let Some(p) = report.first_problem {
        bail!("{}: {p}", file.display());
    }
    println!(
        "{}: {} records, chain intact",
        file.display(),
        report.records
    );
    match (report.anchor, &anchor_path) {
        (Some(AnchorState::Holds { seq: 0, after }), Some(a)) => {
            println!(
                "anchored: no record acknowledged yet (anchor {})",
                a.display()
            );
            if after > 0 {
                println!(
                    "{after} record(s) not acknowledged (a crash before their first anchor write, or appended by someone else)"
                );
            }
        }
        (Some(AnchorState::Holds { seq, after }), Some(a)) => {
            println!(
                "anchored: every acknowledged record, up to seq {seq}, is present and unchanged (anchor {})",
                a.display()
            );
            if after > 0 {
                println!(
                    "{after} record(s) after the anchor: not acknowledged (being written now, left by a crash, or appended by someone else)"
                );
            }
        }
        (Some(AnchorState::Missing), Some(a)) => bail!(
            "{}: no anchor at {}: truncation and rewriting of acknowledged records cannot be detected (give --anchor, or --no-anchor to check the chain alone)",
            file.display(),
            a.display()
        ),
        _ => println!("chain only (--no-anchor): a cut or rewritten tail would go unnoticed"),
    }
    if let Some(last) = report.last {
        println!("last record: seq {} hash {}", last.seq, last.hash);
    }
    Ok(())
}
