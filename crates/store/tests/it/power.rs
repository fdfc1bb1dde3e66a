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

/// An ext4 image of 128 MiB, mounted (`live`); [`Disk::cut`] copies the
/// image as a power cut would leave it, [`Disk::after`] mounts that copy.
struct Disk {
    // Fields drop in this order: unmounted before the directory goes.
    live: Mounted,
    image: PathBuf,
    work: tempfile::TempDir,
}

/// The copy mounted after the cut, and the bytes of the sentinel it kept
/// (fewer than written, or the copy did not model a lost page cache).
struct After {
    mounted: Mounted,
    unsynced: u64,
    _work: tempfile::TempDir,
}

/// Written without a sync just before the cut: the page cache must lose it.
const SENTINEL: usize = 1 << 20;

impl Disk {
    fn new() -> Disk {
        let work = tempfile::tempdir().unwrap();
        let image = work.path().join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(128 << 20).unwrap();
        assert!(run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]), "mkfs.ext4 (e2fsprogs) is needed");
        // Never skipped: a test that returned early would show as passed.
        let live = Mounted::mount(&image, &work.path().join("live")).unwrap_or_else(|| {
            panic!("cannot loop-mount an ext4 image: this test needs root (run the README's test command, scripts/test, as root)")
        });
        Disk { live, image, work }
    }

    fn live(&self) -> &Path {
        &self.live.0
    }

    /// The cut: a file written without a sync, then the image copied.
    fn cut(&self) {
        std::fs::write(self.live().join("sentinel"), vec![0x5a; SENTINEL]).unwrap();
        std::fs::copy(&self.image, self.work.path().join("crash.img")).unwrap();
    }

    /// Power back: the live filesystem unmounted, the copy's journal
    /// replayed and the copy mounted.
    fn after(self) -> After {
        drop(self.live);
        let crash = self.work.path().join("crash.img");
        let fsck = Command::new("fsck.ext4").args(["-f", "-y", crash.to_str().unwrap()]).status().unwrap();
        assert!(fsck.code().is_some_and(|c| c <= 1), "fsck.ext4 could not repair the image: {fsck}");
        let after = Mounted::mount(&crash, &self.work.path().join("after")).expect("mount the crash image");
        let unsynced = std::fs::metadata(after.0.join("sentinel")).map(|m| m.len()).unwrap_or(0);
        assert!(
            unsynced < SENTINEL as u64,
            "the unsynced sentinel survived whole: this copy did not model a lost page cache"
        );
        After { mounted: after, unsynced, _work: self.work }
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
    let disk = Disk::new();
    let dir = disk.live().join("outbox");
    let (store, _) = SqliteStore::open(&dir).unwrap();
    let o = Outbox::start(Box::new(store), config).unwrap();
    let slot = block_on(o.configure(vec!["mqtt://127.0.0.1:1".into()], vec![], Default::default())).unwrap().slots[0];
    let accepted: Arc<Mutex<Vec<u64>>> = Arc::default();
    // Acknowledged by the broker: committed without a sync, in batches of
    // their own between the appends' synced ones. A power cut may take an
    // acknowledgement back (its message is then sent again), never an
    // accepted message that was not acknowledged.
    let acked: Arc<Mutex<std::collections::HashSet<u64>>> = Arc::default();
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
        // The cut: what was accepted now must be on the disk now.
        let at_cut: Vec<u64> = accepted.lock().unwrap().clone();
        // Noted before each is sent: a superset of what reached the writer.
        let acked_at_cut = acked.lock().unwrap().clone();
        disk.cut();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        acker.await.unwrap();
        (at_cut, acked_at_cut)
    });
    o.close();
    assert!(at_cut.len() > 1000, "only {} messages accepted before the cut", at_cut.len());

    // Power back: the outbox opened as after a crash.
    let after = disk.after();
    let (mut store, report) = SqliteStore::open(&after.mounted.0.join("outbox")).unwrap();
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
        "power cut: {} accepted before the cut, {} of them acknowledged, all the others there; {} on disk in all; the unsynced sentinel kept {} of {} bytes",
        at_cut.len(),
        acked.len(),
        survived.len(),
        after.unsynced,
        SENTINEL
    );
}

/// A consumer's inbox records whose identities were all acknowledged
/// ahead go without a sync of their own (`Outbox::inbox_record_runs`);
/// the next synced record puts them on the disk with it, also when it
/// changes nothing (its identities held already: the writer then writes a
/// mark, or SQLite would not sync). Records go at full speed, three
/// unsynced to one synced, until the cut: every identity recorded before
/// a synced record that finished before the cut is in the inbox after it.
#[test]
fn inbox_records_without_a_sync_are_on_the_disk_once_a_synced_one_followed() {
    let runs = |ids: &[(String, u64)]| steadfast_store::inbox_runs(ids, |(p, s)| (p.as_str(), *s));
    let disk = Disk::new();
    let (store, _) = SqliteStore::open(&disk.live().join("inbox")).unwrap();
    let o = Outbox::start(Box::new(store), OutboxConfig::default()).unwrap();
    let mut seq = 0u64;
    let mut next = || {
        let ids: Vec<(String, u64)> = (seq + 1..=seq + 10).map(|s| ("p".to_owned(), s)).collect();
        seq += 10;
        ids
    };
    // Identities whose record a finished synced record covers, and the
    // last ones, recorded after that without a sync.
    let (at_cut, uncovered) = block_on(async {
        let mut covered = Vec::new();
        let mut round = 0u64;
        // Until enough are covered and the last synced record held
        // nothing new: then only the writer's mark makes it sync.
        while covered.len() < 4000 || !round.is_multiple_of(2) {
            let mut last = Vec::new();
            for _ in 0..3 {
                last = next();
                covered.extend(last.iter().map(|(_, s)| *s));
                o.inbox_record_runs(runs(&last), false).await.expect("recorded");
            }
            // Every other round, the synced record holds nothing new.
            let ids = if round.is_multiple_of(2) { next() } else { last };
            round += 1;
            covered.extend(ids.iter().map(|(_, s)| *s));
            o.inbox_record(ids).await.expect("recorded and synced");
        }
        let mut uncovered = Vec::new();
        for _ in 0..3 {
            let ids = next();
            uncovered.extend(ids.iter().map(|(_, s)| *s));
            o.inbox_record_runs(runs(&ids), false).await.expect("recorded");
        }
        disk.cut();
        (covered, uncovered)
    });
    o.close();
    let after = disk.after();
    let (mut store, _) = SqliteStore::open(&after.mounted.0.join("inbox")).unwrap();
    let ids: Vec<(String, u64)> = at_cut.iter().map(|s| ("p".to_owned(), *s)).collect();
    let seen = steadfast_store::InboxStore::inbox_seen(&mut store, &ids).unwrap();
    let lost: Vec<u64> = at_cut.iter().zip(&seen).filter(|(_, s)| !**s).map(|(id, _)| *id).collect();
    assert!(
        lost.is_empty(),
        "{} covered identities lost by the power cut, first {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let ids: Vec<(String, u64)> = uncovered.iter().map(|s| ("p".to_owned(), *s)).collect();
    let kept = steadfast_store::InboxStore::inbox_seen(&mut store, &ids).unwrap().iter().filter(|s| **s).count();
    eprintln!(
        "power cut: {} identities covered by a synced record before the cut, all there; of the {} recorded after it without a sync, {kept} kept; the unsynced sentinel kept {} of {SENTINEL} bytes",
        at_cut.len(),
        uncovered.len(),
        after.unsynced
    );
}
