//! Ids reserved ahead, in a file beside the database.
//!
//! An outbox id is the producer's sequence number: handed out twice, the
//! second message is taken for a copy of the first by every inbox and
//! silently dropped. The database remembers the highest id it handed out,
//! but a damaged database may have lost that page. So before an id above
//! the reservation is used, the reservation is raised by a block and
//! synced, in `outbox.ids`; a recovery starts above whatever it says.
//! It costs three syncs per [`BLOCK`] ids, and after damage the sequence
//! jumps by up to a block (consumers may report that as a gap: honestly,
//! since what was lost is not known).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::StoreError;

/// The file, beside `outbox.db`.
pub(crate) const FILE: &str = "outbox.ids";

/// Ids reserved at a time.
pub(crate) const BLOCK: u64 = 1 << 16;

/// The highest id reserved in `dir`, 0 when nothing was (an outbox from
/// before reservations, or a file that cannot be read: the caller then
/// knows nothing more than the database says).
pub(crate) fn read(dir: &Path) -> u64 {
    fs::read_to_string(dir.join(FILE)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Reserves every id up to `upto`, durably: written to a new file, synced,
/// renamed over the old one, and the directory synced.
pub(crate) fn write(dir: &Path, upto: u64) -> Result<(), StoreError> {
    let io = |path: PathBuf| {
        let dir = dir.to_owned();
        move |source: std::io::Error| match source.raw_os_error() {
            // A full disk says so, as the database's own writes do.
            Some(28 | 122) => StoreError::DiskFull { path: dir },
            _ => StoreError::Io { path, source },
        }
    };
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.new"));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(tmp.clone()))?;
        writeln!(f, "{upto}").and_then(|()| f.sync_all()).map_err(io(tmp.clone()))?;
    }
    fs::rename(&tmp, &path).map_err(io(path.clone()))?;
    // Some filesystems cannot sync a directory (EINVAL); SQLite goes on
    // there too.
    match File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if e.raw_os_error() != Some(22) => Err(io(dir.to_owned())(e)),
        _ => Ok(()),
    }
}

/// Where the sequence must continue when the database's own record of the
/// highest id handed out (`recorded`, 0 for none) is behind the
/// reservation by more than an intact database can be: empty, or more
/// than a block behind (a block plus a rolled-back batch is the most an
/// intact one lags, so two blocks is a safe bound). `None`: it is not.
pub(crate) fn lost_floor(recorded: u64, reserved: u64) -> Option<u64> {
    (reserved > 0 && (recorded == 0 || recorded + 2 * BLOCK < reserved)).then_some(reserved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_database_far_behind_its_reservation_has_lost_its_record() {
        assert_eq!(lost_floor(0, 0), None, "an outbox from before reservations");
        assert_eq!(lost_floor(5, 0), None);
        assert_eq!(lost_floor(0, 1 + BLOCK), Some(1 + BLOCK), "emptied");
        assert_eq!(lost_floor(1, 1 + BLOCK), None, "just reserved");
        assert_eq!(lost_floor(70_000, 70_000 + BLOCK), None);
        assert_eq!(lost_floor(10, 10 + 3 * BLOCK), Some(10 + 3 * BLOCK), "cut back");
    }

    #[test]
    fn a_reservation_is_read_back_and_a_missing_or_garbled_one_is_zero() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), 0);
        write(dir.path(), 70_000).unwrap();
        assert_eq!(read(dir.path()), 70_000);
        write(dir.path(), 140_000).unwrap();
        assert_eq!(read(dir.path()), 140_000);
        fs::write(dir.path().join(FILE), "garbage").unwrap();
        assert_eq!(read(dir.path()), 0);
    }
}
