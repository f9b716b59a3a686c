// Random-key inserts (alone, after a get of each key, or with the epoch
// collector driven after each batch: `random-collect`, COLLECT pins) against
// sequential appends (one record per key, or packed into 6 KB chunks, with
// or without a get of the index key first: `read-chunked`) plus a small
// random index, in sled 0.34.7:
// batches of 4096, a flush after each, 500-byte values (`VALUE_BYTES`),
// 256 MiB of cache (`CACHE_MB`).
use std::time::Instant;

fn cpu() -> (f64, f64) {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(u.ru_utime), s(u.ru_stime))
}

fn rng(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_size(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

fn main() {
    let mode = std::env::args().nth(1).unwrap();
    let n: u64 = std::env::args().nth(2).unwrap().parse().unwrap();
    let dir = std::path::PathBuf::from(format!("/tmp/sledexp-data-{mode}"));
    let _ = std::fs::remove_dir_all(&dir);
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(
            std::env::var("CACHE_MB")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(256)
                << 20,
        )
        .flush_every_ms(None)
        .open()
        .unwrap();
    let t = db.open_tree("t").unwrap();
    let mut x = 0x9e3779b97f4a7c15u64;
    let value_bytes: usize = std::env::var("VALUE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let mut value = vec![0u8; value_bytes];
    let (start, c0) = (Instant::now(), cpu());
    let mut seq = 0u64;
    let mut chunk: Vec<u8> = Vec::new();
    let mut i = 0;
    let mut last = Instant::now();
    let mut last_i = 0;
    while i < n {
        let mut b = sled::Batch::default();
        for _ in 0..4096 {
            if i >= n {
                break;
            }
            i += 1;
            let id = format!("lead-{:016x}", rng(&mut x));
            for v in value.iter_mut().step_by(8) {
                *v = rng(&mut x) as u8;
            }
            match mode.as_str() {
                "random" | "random-collect" => {
                    let mut k = b"e\0".to_vec();
                    k.extend_from_slice(id.as_bytes());
                    b.insert(k, value.clone());
                }
                "append" => {
                    // the record under a sequential key; the id -> seq index entry
                    seq += 1;
                    let mut k = b"r\0".to_vec();
                    k.extend_from_slice(&seq.to_be_bytes());
                    b.insert(k, value.clone());
                    let mut ik = b"i\0".to_vec();
                    ik.extend_from_slice(id.as_bytes());
                    b.insert(ik, &seq.to_be_bytes()[..]);
                }
                "chunked" | "read-chunked" => {
                    // records packed 12 to a 6 KB chunk under a sequential key;
                    // the index maps the id to the chunk
                    chunk.extend_from_slice(&value);
                    let mut ik = b"i\0".to_vec();
                    ik.extend_from_slice(id.as_bytes());
                    if mode == "read-chunked" {
                        // the actor's lookup of a new key, in the index
                        let _ = t.get(&ik).unwrap();
                    }
                    b.insert(ik, &(seq + 1).to_be_bytes()[..]);
                    if chunk.len() >= 6000 {
                        seq += 1;
                        let mut k = b"r\0".to_vec();
                        k.extend_from_slice(&seq.to_be_bytes());
                        b.insert(k, std::mem::take(&mut chunk));
                    }
                }
                "read-random" => {
                    // the actor's lookup of a new key, then the insert
                    let mut k = b"e\0".to_vec();
                    k.extend_from_slice(id.as_bytes());
                    let _ = t.get(&k).unwrap();
                    b.insert(k, value.clone());
                }
                _ => panic!("mode"),
            }
        }
        t.apply_batch(b).unwrap();
        db.flush().unwrap();
        if mode == "random-collect" {
            // Drive crossbeam-epoch's collector: a thread collects at most
            // 8 bags (64 deferred frees each) per 128 pins, and a batch
            // pins once, so the garbage of a batch's inserts outruns it.
            let rounds: usize = std::env::var("COLLECT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(64);
            for _ in 0..rounds {
                sled::crossbeam_pin().flush();
            }
        }
        if last.elapsed().as_secs() >= 5 {
            eprintln!(
                "{mode}: {i} at {:.0}/s, {:.0}/s in the last {:.1} s",
                i as f64 / start.elapsed().as_secs_f64(),
                (i - last_i) as f64 / last.elapsed().as_secs_f64(),
                last.elapsed().as_secs_f64()
            );
            last = Instant::now();
            last_i = i;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let c1 = cpu();
    println!(
        "{mode} {n}: {:.0} inserts/s, user {:.1} s, system {:.1} s, {} MiB on disk",
        n as f64 / secs,
        c1.0 - c0.0,
        c1.1 - c0.1,
        dir_size(&dir) >> 20
    );
}
