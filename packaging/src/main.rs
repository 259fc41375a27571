//! `strata-manpages DIR`: writes the man pages of vhost-blk, vhost-fs and strata (one per
//! command and subcommand: `strata-disk-add.1`, ...) into DIR, from the same clap
//! definitions the programs parse their flags with, so the pages cannot drift from them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

fn write(cmd: clap::Command, dir: &Path, prefix: &str) -> Result<()> {
    let name = if prefix.is_empty() {
        cmd.get_name().to_owned()
    } else {
        format!("{prefix}-{}", cmd.get_name())
    };
    let cmd = cmd.name(name.clone());
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, page).with_context(|| path.display().to_string())?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write(sub.clone(), dir, &name)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let dir = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .context("usage: strata-manpages DIR")?,
    );
    std::fs::create_dir_all(&dir)?;
    write(vhost_blk::config::command(), &dir, "")?;
    write(vhost_fs::config::command(), &dir, "")?;
    write(strata::cli::command(), &dir, "")?;
    Ok(())
}
