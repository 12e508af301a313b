//! bwlimit is enforced by the source, per 64 KiB piece, within 10%.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use drplane_agent::{CancellationToken, Driver, SyncProgress, SyncRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_bwlimit_holds_within_ten_percent() {
    let src = Agent::start().await;
    let dst = Agent::start().await;
    let size = 12 * MIB;
    let rate = 4 * MIB;
    src.disk("v", size, false).await;
    fill_image(&src.path("v"), size, 5);
    dst.disk("v", size, true).await;
    let mut req = SyncRequest::new(src.endpoint(), "v", "v");
    req.bwlimit = Some(rate);
    let seen: Arc<Mutex<Vec<SyncProgress>>> = Arc::default();
    let s2 = seen.clone();
    let progress: drplane_agent::ProgressFn = Arc::new(move |p| s2.lock().unwrap().push(p));
    let t0 = Instant::now();
    let stats = dst
        .driver
        .sync_from(&req, Some(progress), CancellationToken::new())
        .await
        .unwrap();
    let elapsed = t0.elapsed();
    let expect = Duration::from_secs_f64(size as f64 / rate as f64);
    let ratio = elapsed.as_secs_f64() / expect.as_secs_f64();
    println!(
        "bwlimit: {} bytes at {} B/s took {:.3} s (expected {:.3} s, ratio {:.3}); effective {:.0} B/s",
        stats.data_bytes,
        rate,
        elapsed.as_secs_f64(),
        expect.as_secs_f64(),
        ratio,
        stats.data_bytes as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(stats.data_bytes, size);
    assert!(
        (0.9..=1.1).contains(&ratio),
        "elapsed {elapsed:?}, expected {expect:?}"
    );
    assert_eq!(
        dst.driver.checksum("v").await.unwrap(),
        src.driver.checksum("v").await.unwrap()
    );
    // Progress came in steps and ended at 100%.
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 10, "{} progress reports", seen.len());
    let last = seen.last().unwrap();
    assert_eq!(last.bytes_done, size);
    assert_eq!(last.bytes_total, size);
    assert!(seen.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done));
}
