//! Power loss, not only `kill -9`: the outbox lives on an ext4 filesystem
//! in a loop-mounted image; while appends run at full speed, the image file
//! is copied. The copy holds what reached the "disk" (the loop device's
//! backing file) and none of the filesystem's page cache: the state after
//! a power cut. Every message the outbox reported accepted before the cut
//! must be in it, unless the broker acknowledged it before the cut
//! (acknowledgements are committed without a sync: one taken back by the
//! cut only sends its message again). A file written without fsync just before the cut shows
//! that the copy really lost the page cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use steadfast_store::{Outbox, OutboxConfig, SqliteStore};

use crate::{block_on, msg};

fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd).args(args).status().map(|s| s.success()).unwrap_or(false)
}

/// A mounted loop filesystem, unmounted on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn mount(image: &Path, at: &Path) -> Option<Mounted> {
        std::fs::create_dir_all(at).ok()?;
        run("mount", &["-o", "loop", image.to_str()?, at.to_str()?]).then(|| Mounted(at.to_owned()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn what_was_accepted_survives_a_power_cut_that_loses_the_page_cache() {
    power_cut(OutboxConfig::default(), 2);
}

/// A bounded outbox whose publishers wait for room (`block`): the
/// acknowledgements make the room, so the batches that admit the waiting
/// messages are acknowledgement batches, which the writer syncs all the
/// same. (The next append's synced commit usually follows within a
/// millisecond and syncs them too, so this run rarely catches a writer
/// that does not: the rule is in `Writer::apply`.)
#[test]
fn what_was_admitted_by_an_acknowledgement_survives_a_power_cut() {
    use steadfast_store::Overflow;
    power_cut(OutboxConfig { max_messages: Some(200), overflow: Overflow::Block, ..OutboxConfig::default() }, 1);
}

/// Appends from eight writers at full speed while a broker acknowledges
/// every `ack_every`-th id, then a power cut: every message accepted and
/// not acknowledged before the cut is on the disk after it.
fn power_cut(config: OutboxConfig, ack_every: u64) {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(128 << 20).unwrap();
    assert!(run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]), "mkfs.ext4 (e2fsprogs) is needed");
    // Never skipped: a test that returned early would show as passed.
    let live = Mounted::mount(&image, &work.path().join("live")).unwrap_or_else(|| {
        panic!("cannot loop-mount an ext4 image: this test needs root (run the README's test command, scripts/test, as root)")
    });
    let dir = live.0.join("outbox");
    let (store, _) = SqliteStore::open(&dir).unwrap();
    let o = Outbox::start(Box::new(store), config).unwrap();
    let slot = block_on(o.configure(vec!["mqtt://127.0.0.1:1".into()], vec![], Default::default())).unwrap().slots[0];
    let accepted: Arc<Mutex<Vec<u64>>> = Arc::default();
    // Acknowledged by the broker: committed without a sync, in batches of
    // their own between the appends' synced ones. A power cut may take an
    // acknowledgement back (its message is then sent again), never an
    // accepted message that was not acknowledged.
    let acked: Arc<Mutex<std::collections::HashSet<u64>>> = Arc::default();
    let crash = work.path().join("crash.img");
    let sentinel = vec![0x5a; 1 << 20];
    let (at_cut, acked) = block_on(async {
        // Eight writers at full speed, each message 200 bytes.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..8 {
            let (o, accepted, stop) = (o.clone(), accepted.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let payload = format!("{w}:{i:08}:{}", "p".repeat(188));
                    let id = o.append(msg("power", payload), false).0.await.expect("accepted");
                    accepted.lock().unwrap().push(id);
                    i += 1;
                }
            }));
        }
        // The broker: accepted messages acknowledged in runs.
        let acker = {
            let (o, accepted, acked, stop) = (o.clone(), accepted.clone(), acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ids: Vec<u64> = {
                        let all = accepted.lock().unwrap();
                        let fresh = all[seen..].iter().copied().filter(|id| id % ack_every == 0).collect();
                        seen = all.len();
                        fresh
                    };
                    acked.lock().unwrap().extend(ids.iter().copied());
                    o.ack(slot, ids);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        // Enough accepted and acknowledged for the cut to say something,
        // however busy the machine (a fixed wait saw too few on a loaded
        // one): at least 2,000 and 1,000, as a quiet machine reaches in 1.5 s.
        let started = std::time::Instant::now();
        while accepted.lock().unwrap().len() < 2000 || acked.lock().unwrap().len() < 1000 {
            assert!(started.elapsed() < Duration::from_secs(120), "too few messages accepted or acknowledged in 120 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Written, never synced: the page cache must lose it.
        std::fs::write(live.0.join("sentinel"), &sentinel).unwrap();
        // The cut: what was accepted now must be on the disk now.
        let at_cut: Vec<u64> = accepted.lock().unwrap().clone();
        // Noted before each is sent: a superset of what reached the writer.
        let acked_at_cut = acked.lock().unwrap().clone();
        std::fs::copy(&image, &crash).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        acker.await.unwrap();
        (at_cut, acked_at_cut)
    });
    o.close();
    drop(live);
    assert!(at_cut.len() > 1000, "only {} messages accepted before the cut", at_cut.len());

    // Power back: the journal is replayed, the filesystem mounted, the
    // outbox opened as after a crash.
    let fsck = Command::new("fsck.ext4").args(["-f", "-y", crash.to_str().unwrap()]).status().unwrap();
    assert!(fsck.code().is_some_and(|c| c <= 1), "fsck.ext4 could not repair the image: {fsck}");
    let after = Mounted::mount(&crash, &work.path().join("after")).expect("mount the crash image");
    let unsynced = std::fs::metadata(after.0.join("sentinel")).map(|m| m.len()).unwrap_or(0);
    assert!(
        unsynced < sentinel.len() as u64,
        "the unsynced sentinel survived whole: this copy did not model a lost page cache"
    );
    let (mut store, report) = SqliteStore::open(&after.0.join("outbox")).unwrap();
    let survived: std::collections::HashSet<u64> = crate::recovery_ids(&mut store).into_iter().collect();
    assert!(acked.len() > 500, "only {} messages acknowledged before the cut", acked.len());
    let lost: Vec<&u64> = at_cut.iter().filter(|id| !acked.contains(id) && !survived.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} accepted message(s) lost by the power cut, first {:?}; {report:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!(
        "power cut: {} accepted before the cut, {} of them acknowledged, all the others there; {} on disk in all; the unsynced sentinel kept {unsynced} of {} bytes",
        at_cut.len(),
        acked.len(),
        survived.len(),
        sentinel.len()
    );
}
