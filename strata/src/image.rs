//! `strata image check FILE [--repair leaks|all]`: checks a qcow2 image or a tier's cache
//! device that no daemon has open, here (the image is a file on this host, not something the API serves), with
//! storage-core's checker, and prints and exits as `qemu-img check` does: 0 clean, 2
//! corruptions left, 3 leaks only, 1 not checked.

use std::path::Path;
use std::process::ExitCode;

use storage_core::check::{check_file, CheckReport, Repair};

fn text(r: &CheckReport) -> String {
    // A cache device's "leaks" are damaged spare superblock copies, its clusters slots.
    let cache = r.format == "strata-cache";
    let leaked = if cache {
        "damaged superblock copies"
    } else {
        "leaked clusters"
    };
    let mut out = String::new();
    for m in &r.messages {
        out.push_str(m);
        out.push('\n');
    }
    if r.leaks_fixed + r.corruptions_fixed > 0 {
        out.push_str(&format!(
            "The following inconsistencies were found and repaired:\n\n    {} {leaked}\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        ));
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    }
    if r.corruptions > 0 {
        out.push_str(&format!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to \
             the image may corrupt it.\n",
            r.corruptions
        ));
    }
    if r.leaks > 0 {
        out.push_str(&format!(
            "\n{} {leaked} were found on the image.\nThis means {}, but no harm to data.\n",
            r.leaks,
            if cache {
                "a spare copy lost"
            } else {
                "waste of disk space"
            }
        ));
    }
    if r.check_errors > 0 {
        out.push_str(&format!(
            "\n{} internal errors have occurred during the check.\n",
            r.check_errors
        ));
    }
    if let Some(d) = r.dirty_blocks {
        out.push_str(&format!(
            "{d} blocks are dirty (in the cache, not yet on the capacity device)\n"
        ));
    }
    out.push_str(&format!(
        "{}/{} = {:.2}% {}\nImage end offset: {}\n",
        r.allocated_clusters,
        r.total_clusters,
        if r.total_clusters == 0 {
            0.0
        } else {
            r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64
        },
        if cache {
            "of the cache slots in use"
        } else {
            "allocated"
        },
        r.image_end_offset
    ));
    out
}

/// Runs the check; what to print and the exit code.
pub fn run(file: &Path, repair: Option<&str>, as_json: bool) -> ExitCode {
    let repair = match repair.map(str::parse::<Repair>) {
        None => Repair::None,
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            eprintln!("strata: --repair: {e}");
            return ExitCode::from(2);
        }
    };
    match check_file(file, repair) {
        Ok(r) => {
            if as_json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r.json(file)).unwrap_or_default()
                );
            } else {
                print!("{}", text(&r));
            }
            ExitCode::from(r.exit_code())
        }
        Err(e) => {
            eprintln!("strata: {e}");
            ExitCode::from(2)
        }
    }
}
