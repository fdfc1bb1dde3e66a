//! The backlog lives on disk: memory stays flat however much is queued.

use std::time::Duration;

use steadfast::Message;
use steadfast_testkit::{FaultProxy, Mosquitto, ProxyMode};

use crate::{config, open};

/// A field of /proc/self/status in KiB (VmRSS, VmHWM).
fn proc_status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_while_a_large_backlog_queues_and_drains() {
    const N: usize = 200_000;
    const PAYLOAD: usize = 200; // 40 MB of payload in all
    let broker = Mosquitto::plain().await;
    let proxy = FaultProxy::start(broker.port()).await.unwrap();
    proxy.set(ProxyMode::Reset);
    let dir = tempfile::tempdir().unwrap();
    let c = open(config("backlog", &proxy.url(), dir.path())).await;
    let payload = vec![b'b'; PAYLOAD];
    // Warm up the allocator and the store before the baseline.
    c.publish(Message::new("backlog", payload.clone())).await.unwrap();
    let base = proc_status_kib("VmRSS:");
    for chunk in 0..N / 5000 {
        let mut pending = Vec::with_capacity(5000);
        for i in 0..5000 {
            let mut p = payload.clone();
            p[..8].copy_from_slice(format!("{:08}", chunk * 5000 + i).as_bytes());
            pending.push(c.enqueue(Message::new("backlog", p)).unwrap());
        }
        for p in pending {
            p.await.unwrap();
        }
    }
    assert_eq!(c.status().await.unwrap().queued, N as u64 + 1);
    proxy.set(ProxyMode::Pass);
    tokio::time::timeout(Duration::from_secs(180), c.wait_idle()).await.expect("backlog drained");
    let peak = proc_status_kib("VmHWM:");
    let grew_mib = peak.saturating_sub(base) / 1024;
    eprintln!("backlog of {N} messages: memory peak grew by {grew_mib} MiB");
    // Holding the backlog in memory would take well over 40 MiB.
    assert!(grew_mib < 24, "peak memory grew by {grew_mib} MiB over a 40 MB backlog");
    c.close().await;
}
