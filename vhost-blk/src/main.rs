//! The vhost-blk binary: parse flags, start the daemon, map failures to exit codes
//! (2 for bad input at start-up, 1 for failures while serving).

use std::io::Write;
use std::process::ExitCode;

use vhost_blk::config::{Command, Config};
use vhost_blk::daemon::Daemon;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            writeln!(
                buf,
                "vhost-blk: {}: {}",
                record.level().as_str().to_ascii_lowercase(),
                record.args()
            )
        })
        .init();
    let config = match Config::parse(std::env::args_os()) {
        Ok(Command::Run(config)) => *config,
        Ok(Command::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vhost-blk: {e}");
            return ExitCode::from(2);
        }
    };
    let daemon = match Daemon::new(config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vhost-blk: {e:#}");
            return ExitCode::from(2);
        }
    };
    match daemon.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-blk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
