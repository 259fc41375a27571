//! Termination signals (SIGTERM, SIGINT) delivered to one thread. The main thread blocks them
//! before it starts any other thread, so every thread inherits the mask and only the signal
//! thread, waiting in `sigwait`, receives them.

use std::io;

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (and every thread it starts later).
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_signals();
    // SAFETY: `set` is a valid, initialised signal set; the old mask is not needed.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Starts the thread that calls `on_signal` with each termination signal received.
pub fn spawn_signal_thread(on_signal: impl Fn(i32) + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let set = termination_signals();
            let mut sig = 0;
            // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                on_signal(sig);
            }
        })?;
    Ok(())
}

/// Ignores SIGXFSZ for the whole process. A write past RLIMIT_FSIZE then fails with EFBIG,
/// which the I/O paths answer as an I/O error, instead of killing the daemon (the default
/// action) with every request in flight.
pub fn ignore_file_size_signal() -> io::Result<()> {
    // SAFETY: installing SIG_IGN has no memory preconditions; the result is checked.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
