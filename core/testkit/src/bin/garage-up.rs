//! `garage-up <garage binary> <folder> [address]`: start a Garage node as the tests do
//! (its own folder, a layout, the bucket and a key made by its CLI), print where
//! it is as `GARAGE_*=value` lines, and keep it until this process ends, however
//! it ends. Its S3 API listens on `address` (default 127.0.0.1). For scripts
//! (`tests/bench/run.sh` with `BENCH_STORAGE=s3`, `tests/cluster/run.sh`).

use std::io::Write;
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (bin, dir, ip) = match args.as_slice() {
        [bin, dir] => (bin, dir, "127.0.0.1"),
        [bin, dir, ip] => (bin, dir, ip.as_str()),
        _ => {
            eprintln!("usage: garage-up <garage binary> <folder> [address]");
            std::process::exit(2);
        }
    };
    let g = berth_testkit::Garage::start_on(Path::new(bin), Path::new(dir), ip);
    g.reap_with_this_process();
    let mut out = std::io::stdout().lock();
    writeln!(out, "GARAGE_ENDPOINT={}", g.endpoint).unwrap();
    writeln!(out, "GARAGE_BUCKET={}", g.bucket).unwrap();
    writeln!(out, "GARAGE_REGION={}", g.region).unwrap();
    writeln!(out, "GARAGE_KEY_ID={}", g.access_key_id).unwrap();
    writeln!(out, "GARAGE_SECRET={}", g.secret_access_key).unwrap();
    out.flush().unwrap();
    drop(out);
    loop {
        std::thread::park();
    }
}
