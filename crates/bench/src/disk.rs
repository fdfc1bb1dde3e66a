//! Where the bench puts its outboxes, and what a sync costs there: the
//! filesystem type (from /proc/self/mountinfo, the longest mount point
//! that holds the directory) and the latency of a raw `write` + `fsync`.
//! On tmpfs or ramfs a sync costs nothing, so a durable outbox there would
//! flatter every durable figure: the bench refuses such a directory unless
//! told otherwise.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::report::percentile;

/// Writes (each followed by its `fsync`) timed by the probe, at most.
pub const FSYNC_SAMPLES: usize = 200;
/// The probe stops earlier once it has spent this long (a slow disk).
const FSYNC_BUDGET: Duration = Duration::from_secs(10);
/// Bytes per probe write (about one small message).
const FSYNC_BYTES: usize = 64;

/// The outbox directory and what was measured there.
#[derive(Debug, Clone)]
pub struct OutboxDisk {
    /// The directory (as given; the outboxes go in fresh directories in it).
    pub dir: PathBuf,
    /// Filesystem type from mountinfo (`ext4`, `xfs`, `tmpfs`...).
    pub filesystem: String,
    /// The mount point that holds the directory.
    pub mount_point: PathBuf,
    /// True when it is memory-backed and `--allow-tmpfs` let it through.
    pub memory_backed: bool,
    /// Raw `write` + `fsync` latency, milliseconds: median.
    pub fsync_p50_ms: f64,
    /// 99th percentile.
    pub fsync_p99_ms: f64,
    /// How many writes were timed.
    pub fsync_samples: usize,
}

/// Why the outbox directory cannot be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum OutboxDirError {
    /// The directory is on a memory-backed filesystem and `--allow-tmpfs`
    /// was not given.
    MemoryBacked {
        /// The directory.
        dir: PathBuf,
        /// `tmpfs` or `ramfs`.
        filesystem: String,
        /// Its mount point.
        mount_point: PathBuf,
    },
    /// The directory is missing, unreadable, or no mount holds it.
    Io {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
}

impl fmt::Display for OutboxDirError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutboxDirError::MemoryBacked { dir, filesystem, mount_point } => write!(
                f,
                "the outbox directory {} is on {filesystem} (mounted at {}): a disk sync costs nothing there, so the durable figures would be flattered; pass --outbox-dir DIR on a disk-backed filesystem (e.g. --outbox-dir target), or --allow-tmpfs to measure it anyway",
                dir.display(),
                mount_point.display()
            ),
            OutboxDirError::Io { dir, error } => write!(f, "outbox directory {}: {error}", dir.display()),
        }
    }
}

/// The I/O error is part of the message (printed once, not again as a cause).
impl std::error::Error for OutboxDirError {}

/// True for filesystems that live in memory, where `fsync` is free.
pub fn is_memory_backed(filesystem: &str) -> bool {
    matches!(filesystem, "tmpfs" | "ramfs" | "devtmpfs")
}

/// The mount (point, filesystem type) in `mountinfo` (the text of
/// /proc/self/mountinfo) that holds `path` (absolute, canonical): the
/// longest mount point that is a prefix of it; of equal ones the last
/// (mounted over the earlier).
pub fn mount_of(mountinfo: &str, path: &Path) -> Option<(PathBuf, String)> {
    let mut best: Option<(PathBuf, String)> = None;
    for line in mountinfo.lines() {
        // `36 35 98:0 /root /mnt rw,noatime master:1 - ext3 /dev/root rw`:
        // the mount point is the fifth field; the type follows ` - `.
        let Some((head, tail)) = line.split_once(" - ") else { continue };
        let Some(point) = head.split(' ').nth(4) else { continue };
        let Some(fstype) = tail.split(' ').next() else { continue };
        let point = PathBuf::from(unescape(point));
        if !path.starts_with(&point) {
            continue;
        }
        let longer = best.as_ref().is_none_or(|(b, _)| point.as_os_str().len() >= b.as_os_str().len());
        if longer {
            best = Some((point, fstype.to_owned()));
        }
    }
    best
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point and filesystem type that hold `dir`.
pub fn filesystem_of(dir: &Path) -> std::io::Result<(PathBuf, String)> {
    let path = dir.canonicalize()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    mount_of(&info, &path).ok_or_else(|| std::io::Error::other(format!("no mount holds {}", path.display())))
}

/// Times up to `samples` appends of a few bytes to a fresh file in `dir`,
/// each followed by `fsync`; stops early after `budget`. Milliseconds.
pub fn write_fsync_latencies(dir: &Path, samples: usize, budget: Duration) -> std::io::Result<Vec<f64>> {
    let mut file = tempfile::Builder::new().prefix("steadfast-bench-fsync-").tempfile_in(dir)?;
    let bytes = [b'f'; FSYNC_BYTES];
    let mut out = Vec::with_capacity(samples);
    let t0 = Instant::now();
    while out.len() < samples && t0.elapsed() < budget {
        let start = Instant::now();
        file.write_all(&bytes)?;
        file.as_file().sync_all()?;
        out.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// Times up to `samples` appends of `bytes` to a fresh file in `dir`, each
/// followed by `fsync`, paced at `rate` per second (as the latency runs
/// are); stops early after `budget`. Milliseconds. What a paced message
/// costs the disk alone, with its tail: the floor under the latency's.
pub fn paced_append_fsync(
    dir: &Path,
    samples: usize,
    rate: u32,
    bytes: usize,
    budget: Duration,
) -> std::io::Result<Vec<f64>> {
    let mut file = tempfile::Builder::new().prefix("steadfast-bench-paced-").tempfile_in(dir)?;
    let block = vec![b'p'; bytes];
    let every = Duration::from_secs(1) / rate.max(1);
    let mut out = Vec::with_capacity(samples);
    let t0 = Instant::now();
    let mut due = t0;
    while out.len() < samples && t0.elapsed() < budget {
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        due += every;
        let start = Instant::now();
        file.write_all(&block)?;
        file.as_file().sync_all()?;
        out.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// Checks `dir` (refused on tmpfs/ramfs unless `allow_memory`), then
/// measures its raw `write` + `fsync` latency.
pub fn probe(dir: &Path, allow_memory: bool) -> Result<OutboxDisk, OutboxDirError> {
    let io = |error| OutboxDirError::Io { dir: dir.to_owned(), error };
    let (mount_point, filesystem) = filesystem_of(dir).map_err(io)?;
    let memory_backed = is_memory_backed(&filesystem);
    if memory_backed && !allow_memory {
        return Err(OutboxDirError::MemoryBacked { dir: dir.to_owned(), filesystem, mount_point });
    }
    let mut lat = write_fsync_latencies(dir, FSYNC_SAMPLES, FSYNC_BUDGET).map_err(io)?;
    Ok(OutboxDisk {
        dir: dir.to_owned(),
        filesystem,
        mount_point,
        memory_backed,
        fsync_p50_ms: percentile(&mut lat, 50.0).unwrap_or(f64::NAN),
        fsync_p99_ms: percentile(&mut lat, 99.0).unwrap_or(f64::NAN),
        fsync_samples: lat.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid shared:12 - proc proc rw
24 22 0:22 / /tmp rw,nosuid,nodev shared:2 - tmpfs tmpfs rw,size=1024k
25 24 252:1 / /tmp/disk rw,relatime shared:3 - xfs /dev/vdb rw
26 22 0:23 / /mnt/with\\040space rw - ramfs ramfs rw
27 22 252:2 / /tmpfoo rw - btrfs /dev/vdc rw
28 24 0:24 / /tmp rw - ext4 /dev/vdd rw
";

    #[test]
    fn the_longest_mount_point_that_holds_the_path_wins() {
        let fs = |p: &str| mount_of(MOUNTINFO, Path::new(p)).map(|(m, t)| (m.display().to_string(), t));
        assert_eq!(fs("/home/x"), Some(("/".into(), "ext4".into())));
        assert_eq!(fs("/tmp/disk/outboxes"), Some(("/tmp/disk".into(), "xfs".into())));
        // A prefix of the text is not a prefix of the path.
        assert_eq!(fs("/tmpfoo/a"), Some(("/tmpfoo".into(), "btrfs".into())));
        assert_eq!(fs("/mnt/with space/a"), Some(("/mnt/with space".into(), "ramfs".into())));
        // Mounted over: the later mount at the same point.
        assert_eq!(fs("/tmp/x"), Some(("/tmp".into(), "ext4".into())));
        assert_eq!(mount_of("", Path::new("/x")), None);
    }

    #[test]
    fn memory_backed_filesystems_are_recognised() {
        for t in ["tmpfs", "ramfs", "devtmpfs"] {
            assert!(is_memory_backed(t), "{t}");
        }
        for t in ["ext4", "xfs", "btrfs", "overlay", "zfs", "nfs4"] {
            assert!(!is_memory_backed(t), "{t}");
        }
    }

    #[test]
    fn the_refusal_names_the_directory_and_the_fix() {
        let e = OutboxDirError::MemoryBacked {
            dir: "/tmp/o".into(),
            filesystem: "tmpfs".into(),
            mount_point: "/tmp".into(),
        };
        let s = e.to_string();
        assert!(
            s.contains("/tmp/o") && s.contains("tmpfs") && s.contains("--outbox-dir") && s.contains("--allow-tmpfs"),
            "{s}"
        );
    }

    #[test]
    fn a_disk_directory_is_probed_and_a_missing_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_, fs) = filesystem_of(dir.path()).unwrap();
        let probed = probe(dir.path(), true).unwrap();
        assert_eq!(probed.filesystem, fs);
        assert!(probed.fsync_samples > 0 && probed.fsync_p50_ms > 0.0 && probed.fsync_p99_ms >= probed.fsync_p50_ms);
        assert!(matches!(probe(&dir.path().join("missing"), false), Err(OutboxDirError::Io { .. })));
        // The probe leaves nothing behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A real tmpfs (needs root and `mount`; skipped, saying so, without).
    #[test]
    fn a_tmpfs_mount_is_detected_and_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "steadfast-bench-test"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (not root?)");
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(dir.path());
        let inner = dir.path().join("outboxes");
        std::fs::create_dir(&inner).unwrap();
        let (point, fs) = filesystem_of(&inner).unwrap();
        assert_eq!((point, fs.as_str()), (dir.path().canonicalize().unwrap(), "tmpfs"));
        match probe(&inner, false) {
            Err(OutboxDirError::MemoryBacked { dir, filesystem, .. }) => {
                assert_eq!((dir, filesystem.as_str()), (inner.clone(), "tmpfs"));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let allowed = probe(&inner, true).unwrap();
        assert!(allowed.memory_backed && allowed.filesystem == "tmpfs");
    }
}
