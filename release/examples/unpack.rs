//! Unpacks an archive the way the agent will, for manual checks and benchmarks:
//! `cargo run --release -p rollwave-release --example unpack -- ARCHIVE STAGING_DIR`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let arguments: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [archive, staging] = arguments.as_slice() else {
        eprintln!("usage: unpack ARCHIVE STAGING_DIR");
        return ExitCode::from(64);
    };
    let started = Instant::now();
    let digest = match rollwave_release::hash_file(archive) {
        Ok((digest, _)) => digest,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let hashed = started.elapsed();
    match rollwave_release::unpack(archive, staging, rollwave_release::Limits::default()) {
        Ok(report) => {
            println!(
                "sha256 {digest} in {hashed:?}; unpacked {} entries, {} bytes; total {:?}",
                report.entries,
                report.bytes_written,
                started.elapsed()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
