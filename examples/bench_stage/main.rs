//! `cargo run --release --example bench_stage -- DIR`: the stage for `scripts/bench` (see
//! `stage.rs`). Prints the addresses as one JSON line and stays up until its standard input
//! closes (the harness holds it open), Ctrl-C, or ten hours.
// An example binary has no outside users; its stage module is shared with a test.
#![allow(unreachable_pub)]
// Test code may use std locks: poisoning there only fails the test that panicked.
#![allow(clippy::disallowed_types)]

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

mod stage;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: bench_stage DIR"))?;
    let stage = stage::start(Path::new(&dir)).await?;
    println!("{}", stage.info);
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    tokio::select! {
        _ = stdin_closed => {}
        _ = tokio::signal::ctrl_c() => {}
        () = tokio::time::sleep(Duration::from_secs(10 * 3600)) => {}
    }
    drop(stage);
    Ok(())
}
