//! A crash-consistency verifier for block devices served by a daemon.
//!
//! Every 4 KiB block the verifier writes is tagged: its LBA, a generation number unique to
//! that write, and a checksum over the whole block. Writes go eight at a time with FLUSH
//! barriers in between, while another thread kills the daemon with SIGKILL at a random
//! moment. After each restart every block is read and must be intact (tag matches its place,
//! checksum holds: nothing torn or misplaced), no older than the last version a completed
//! FLUSH covered, and no newer than anything ever written.

use std::time::Duration;

use crate::blkio_client::{Client, ClientOptions, SlotOp, Target};
use crate::daemon::{Daemon, DaemonCommand};

pub const BLOCK: usize = 4096;

/// The checksum of a tagged block's contents.
fn checksum(lba: u64, generation: u64, body: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ lba.rotate_left(17) ^ generation;
    for chunk in body.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_mul(0x0100_0000_01b3).rotate_left(5);
    }
    h
}

/// Fills `buf` (one block) with the tagged contents of (`lba`, `generation`).
pub fn tag_block(buf: &mut [u8], lba: u64, generation: u64) {
    let mut x = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation;
    for chunk in buf[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    buf[0..8].copy_from_slice(&lba.to_le_bytes());
    buf[8..16].copy_from_slice(&generation.to_le_bytes());
    let sum = checksum(lba, generation, &buf[24..]);
    buf[16..24].copy_from_slice(&sum.to_le_bytes());
}

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// All zeroes: never written.
    Blank,
    /// A tagged write of this generation.
    Generation(u64),
    /// Anything else: torn, misplaced or garbage.
    Corrupt,
}

pub fn inspect(buf: &[u8], lba: u64) -> Seen {
    if buf.iter().all(|&b| b == 0) {
        return Seen::Blank;
    }
    let tag_lba = u64::from_le_bytes(buf[0..8].try_into().unwrap_or_default());
    let generation = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
    let sum = u64::from_le_bytes(buf[16..24].try_into().unwrap_or_default());
    if tag_lba != lba || sum != checksum(lba, generation, &buf[24..]) {
        return Seen::Corrupt;
    }
    Seen::Generation(generation)
}

/// The verifier's knowledge of every block.
pub struct Verifier {
    blocks: u64,
    /// Generation every completed FLUSH guarantees, per block (0: none).
    flushed: Vec<u64>,
    /// Highest generation ever submitted, per block.
    written: Vec<u64>,
    /// Generation of the latest completed write, per block, since the last flush.
    completed: Vec<u64>,
    next_generation: u64,
    rng: u64,
}

/// What a run found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub rounds: usize,
    pub writes_acknowledged: u64,
    pub flushes: u64,
    /// Rounds in which at least one FLUSH completed before the kill.
    pub rounds_flushed: usize,
    pub blocks_checked: u64,
    pub problems: Vec<String>,
}

impl Verifier {
    pub fn new(blocks: u64, seed: u64) -> Verifier {
        Verifier {
            blocks,
            flushed: vec![0; blocks as usize],
            written: vec![0; blocks as usize],
            completed: vec![0; blocks as usize],
            next_generation: 1,
            rng: seed | 1,
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Reads every block and checks it; returns the problems found.
    pub fn check(&self, client: &mut Client, report: &mut Report) -> Result<(), String> {
        let q = client.queue(0);
        let chunk = 256u64;
        let mut lba = 0;
        while lba < self.blocks {
            let n = chunk.min(self.blocks - lba);
            let data = q
                .read(lba * BLOCK as u64, (n as usize) * BLOCK)
                .map_err(|e| format!("read back at block {lba}: {e}"))?;
            for i in 0..n {
                let l = lba + i;
                let b = &data[(i as usize) * BLOCK..(i as usize + 1) * BLOCK];
                report.blocks_checked += 1;
                let (flushed, written) = (self.flushed[l as usize], self.written[l as usize]);
                match inspect(b, l) {
                    Seen::Blank if flushed == 0 => {}
                    Seen::Blank => report.problems.push(format!(
                        "block {l}: lost (blank, generation {flushed} was flushed)"
                    )),
                    Seen::Corrupt => report
                        .problems
                        .push(format!("block {l}: torn or misplaced")),
                    Seen::Generation(g) if g < flushed => report.problems.push(format!(
                        "block {l}: generation {g} is older than the flushed {flushed}"
                    )),
                    Seen::Generation(g) if g > written => report
                        .problems
                        .push(format!("block {l}: generation {g} was never written")),
                    Seen::Generation(_) => {}
                }
            }
            lba += n;
        }
        Ok(())
    }

    /// The daemon was restarted: acknowledged writes no flush covered may have been lost.
    pub fn crashed(&mut self) {
        self.completed.copy_from_slice(&self.flushed);
    }

    /// Writes tagged blocks with flush barriers until the daemon goes away (or `max_batches`).
    pub fn write_until_failure(
        &mut self,
        client: &mut Client,
        max_batches: usize,
        report: &mut Report,
    ) {
        let depth = 8;
        let q = client.queue(0);
        let Ok(mut pipe) = q.pipeline(depth, BLOCK) else {
            return;
        };
        for batch in 0..max_batches {
            let mut lbas = [u64::MAX; 8];
            for slot in 0..depth {
                // Half the writes go to a small hot set, so blocks are rewritten often.
                let r = self.random();
                let lba = if r.is_multiple_of(2) {
                    r / 2 % 64
                } else {
                    r / 2 % self.blocks
                };
                // One write per block in flight: two racing writes have no defined order.
                if lbas[..slot].contains(&lba) {
                    continue;
                }
                lbas[slot] = lba;
                let generation = self.next_generation;
                self.next_generation += 1;
                self.written[lba as usize] = generation;
                tag_block(pipe.slot_mut(slot), lba, generation);
                pipe.submit(slot, SlotOp::Write(lba * BLOCK as u64));
            }
            let mut failed = false;
            while pipe.in_flight() > 0 {
                let mut done = Vec::new();
                if pipe
                    .wait(1, |slot, result| done.push((slot, result.is_ok())))
                    .is_err()
                {
                    return;
                }
                for (slot, ok) in done {
                    if ok {
                        let lba = lbas[slot];
                        let generation = self.written[lba as usize];
                        self.completed[lba as usize] = generation;
                        report.writes_acknowledged += 1;
                    } else {
                        failed = true;
                    }
                }
            }
            if failed {
                return;
            }
            if batch % 3 == 2 {
                pipe.submit(0, SlotOp::Flush);
                let mut ok = false;
                if pipe.wait(1, |_, r| ok = r.is_ok()).is_err() || !ok {
                    return;
                }
                report.flushes += 1;
                for (f, c) in self.flushed.iter_mut().zip(&self.completed) {
                    *f = (*f).max(*c);
                }
            }
        }
    }

    /// Random delay before the kill, within `ms` milliseconds.
    pub fn kill_delay(&mut self, ms: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(ms.start + self.random() % ms.end.saturating_sub(ms.start).max(1))
    }
}

/// Connects to a freshly started daemon, retrying briefly.
pub fn connect(socket: &std::path::Path, daemon: &Daemon) -> Result<Client, String> {
    // A killed daemon never answers; one second is ample for any single request otherwise.
    let opts = ClientOptions::default().io_timeout(Duration::from_secs(1));
    let mut last = String::new();
    for _ in 0..50 {
        match Client::open_with(Target::VhostUser(socket), &opts) {
            Ok(c) => return Ok(c),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("cannot connect: {last}\n{}", daemon.output()))
}

/// Runs `rounds` crash rounds against daemons started by `start(round)`, which serve a disk
/// of `blocks` blocks on `socket`. Each round: start, verify everything, write with flush
/// barriers while a thread SIGKILLs the daemon after a random delay of up to 60 ms. One
/// more start verifies the last round's writes.
pub fn run_rounds(
    blocks: u64,
    rounds: usize,
    seed: u64,
    socket: &std::path::Path,
    start: impl FnMut(usize) -> DaemonCommand,
) -> Report {
    run_rounds_killing_within(blocks, rounds, seed, 1..61, socket, start, || {})
}

/// [`run_rounds`] with the kill `kill_within_ms` into each round's writes (a slower disk, a
/// network one, needs longer to complete a few flushes before it is killed), and
/// `after_kill` run once each killed daemon is gone (to fence it, as an operator would).
pub fn run_rounds_killing_within(
    blocks: u64,
    rounds: usize,
    seed: u64,
    kill_within_ms: std::ops::Range<u64>,
    socket: &std::path::Path,
    mut start: impl FnMut(usize) -> DaemonCommand,
    mut after_kill: impl FnMut(),
) -> Report {
    let mut v = Verifier::new(blocks, seed);
    let mut report = Report::default();
    for round in 0..=rounds {
        let label = if round == rounds {
            format!("final check (after round {})", round.saturating_sub(1))
        } else {
            format!("round {round}")
        };
        let mut daemon = match start(round).spawn() {
            Ok(d) => d,
            Err(e) => {
                report
                    .problems
                    .push(format!("{label}: daemon did not start: {e}"));
                break;
            }
        };
        let mut client = match connect(socket, &daemon) {
            Ok(c) => c,
            Err(e) => {
                report.problems.push(format!("{label}: {e}"));
                break;
            }
        };
        let before = report.problems.len();
        if let Err(e) = v.check(&mut client, &mut report) {
            report.problems.push(format!("{label}: {e}"));
            break;
        }
        for p in &mut report.problems[before..] {
            *p = format!("{label}: {p}");
        }
        if round == rounds {
            // Only there to check the last round's writes.
            daemon.kill();
            break;
        }
        let pid = daemon.pid() as libc::pid_t;
        let delay = v.kill_delay(kill_within_ms.clone());
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: sending a signal has no memory preconditions; the child is not reaped
            // until `daemon.kill()` below, so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let flushes = report.flushes;
        v.write_until_failure(&mut client, 10_000, &mut report);
        if report.flushes > flushes {
            report.rounds_flushed += 1;
        }
        let _ = killer.join();
        drop(client);
        daemon.kill();
        after_kill();
        v.crashed();
        report.rounds += 1;
        if report.problems.len() > 20 {
            break;
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_detect_tearing_and_misplacement() {
        let mut a = vec![0u8; BLOCK];
        tag_block(&mut a, 7, 42);
        assert_eq!(inspect(&a, 7), Seen::Generation(42));
        assert_eq!(inspect(&a, 8), Seen::Corrupt, "misplaced");
        let mut b = vec![0u8; BLOCK];
        tag_block(&mut b, 7, 43);
        let mut torn = a.clone();
        torn[2048..].copy_from_slice(&b[2048..]);
        assert_eq!(inspect(&torn, 7), Seen::Corrupt, "torn");
        let mut torn = b.clone();
        torn[512..1024].copy_from_slice(&a[512..1024]);
        assert_eq!(inspect(&torn, 7), Seen::Corrupt, "torn sector");
        assert_eq!(inspect(&vec![0u8; BLOCK], 7), Seen::Blank);
    }
}
