//! Image files on this host, not something the API serves:
//! - `strata image check FILE [--repair leaks|all]` checks a qcow2 image or a tier's cache
//!   device that no daemon has open with storage-core's checker, and prints and exits as
//!   `qemu-img check` does: 0 clean, 2 corruptions left, 3 leaks only, 1 not checked.
//! - `strata image create FILE SIZE --format qcow2|luks [--key-file KEY]` makes a qcow2
//!   image (encrypted with a key: LUKS in qcow2) or a LUKS1 or LUKS2 image; exit 2 with
//!   one line naming the problem.

use std::path::Path;
use std::process::ExitCode;

use storage_core::check::{check_file, CheckReport, Repair};
use storage_core::crypto::{luks1, luks2};
use storage_core::qcow2::{self, CreateOptions, LuksHeader};
use storage_core::units::ByteSize;

use strata::cli::ImageCommand;

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

/// Makes the image `c` (an [`ImageCommand::Create`]) describes; exit 0, or 2 with one line.
pub fn create(c: &ImageCommand) -> ExitCode {
    match make(c) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strata: {e}");
            ExitCode::from(2)
        }
    }
}

fn make(c: &ImageCommand) -> Result<String, String> {
    let ImageCommand::Create {
        file,
        size,
        format,
        key_file,
        luks_version,
        sector_size,
        iter_time,
        cluster_size,
        backing,
        backing_format,
    } = c
    else {
        return Err("not an image create command".into());
    };
    let bytes = |what: &str, v: &str| {
        v.parse::<ByteSize>()
            .map(|b| b.0)
            .map_err(|e| format!("{what} {v:?}: {e}"))
    };
    let size = bytes("size", size)?;
    let name = file.display();
    let passphrase = key_file
        .as_deref()
        .map(storage_core::crypto::key_file::read)
        .transpose()
        .map_err(|e| e.to_string())?;
    if !(1..=60_000).contains(iter_time) {
        return Err(format!("--iter-time {iter_time}: 1 to 60000 milliseconds"));
    }
    let iterations = || storage_core::crypto::luks1::iterations_for(*iter_time);
    match format.as_str() {
        "qcow2" => {
            if *luks_version != 1 || *sector_size != 512 {
                return Err(
                    "--luks-version and --sector-size are for --format luks: an encrypted \
                     qcow2 image holds LUKS1 with 512-byte sectors, as QEMU writes it"
                        .into(),
                );
            }
            let encryption = passphrase
                .map(|p| LuksHeader::new(&p, iterations()))
                .transpose()
                .map_err(|e| e.to_string())?;
            let encrypted = encryption.is_some();
            let opts = CreateOptions {
                size,
                cluster_size: bytes("--cluster-size", cluster_size)?,
                backing: backing.clone().map(|b| {
                    let f = backing_format.clone().unwrap_or_else(|| "qcow2".into());
                    (b, f)
                }),
                encryption,
            };
            qcow2::create(file, &opts).map_err(|e| e.to_string())?;
            Ok(format!(
                "Formatting '{name}', fmt=qcow2 cluster_size={} size={size}{}{}",
                opts.cluster_size,
                opts.backing
                    .as_ref()
                    .map(|(b, f)| format!(" backing_file={b} backing_fmt={f}"))
                    .unwrap_or_default(),
                if encrypted {
                    " encrypt.format=luks"
                } else {
                    ""
                }
            ))
        }
        _ => {
            let Some(p) = passphrase else {
                return Err("--format luks needs --key-file".into());
            };
            if backing.is_some() {
                return Err("--backing is for --format qcow2".into());
            }
            let made = match luks_version {
                1 if *sector_size != 512 => {
                    return Err("LUKS1 has 512-byte sectors only (--luks-version 2)".into())
                }
                1 => luks1::create_image(file, size, &p, iterations()),
                _ => luks2::create_image(
                    file,
                    size,
                    *sector_size,
                    &p,
                    &storage_core::crypto::KeyslotCost::for_time(*iter_time),
                ),
            };
            made.map_err(|e| format!("{name}: {e}"))?;
            Ok(format!(
                "Formatting '{name}', fmt=luks{luks_version} size={size} \
                 cipher=aes-xts-plain64 sector_size={sector_size}"
            ))
        }
    }
}
