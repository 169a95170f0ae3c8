//! SHA-256 throughput of the hasher the store (and every worker) uses, on one core: the figure
//! behind "hashing is not the bottleneck" in ARCHITECTURE.md.
//!
//! `cargo run -p quorum-store --example sha256_throughput [MiB] [rounds]`
//! (the dev profile builds `sha2` at opt-level 3, so a release build is not needed).

use std::time::Instant;

use quorum_core::digest::Hasher;

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args
        .next()
        .map_or(1024, |a| a.parse().expect("MiB is a number"));
    let rounds: usize = args
        .next()
        .map_or(5, |a| a.parse().expect("rounds is a number"));
    // Uploads arrive in chunks of up to a few hundred KiB; hash in 256 KiB pieces like them.
    let chunk: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    let pieces = mib * 4;
    let mut best = f64::MAX;
    for round in 0..rounds {
        let started = Instant::now();
        let mut h = Hasher::new();
        for _ in 0..pieces {
            h.update(&chunk);
        }
        let digest = h.finish();
        let secs = started.elapsed().as_secs_f64();
        best = best.min(secs);
        let gbs = (pieces * chunk.len()) as f64 / secs / 1e9;
        println!("round {round}: {mib} MiB in {secs:.3} s = {gbs:.2} GB/s ({digest})");
    }
    let gbs = (pieces * chunk.len()) as f64 / best / 1e9;
    println!("best: {gbs:.2} GB/s per core");
}
