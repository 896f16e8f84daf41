//! Spill files (DESIGN I10): when changes cannot be written before the
//! process must stop (the drain deadline passed with the database away, or
//! the lease was lost), the newest version of every unwritten entity goes to
//! a local file, fsynced with its folder. The next start replays every spill
//! file into the database (version-guarded, in one transaction) before
//! hydration, and removes a file only after its commit.
//!
//! A file is JSON lines: a header naming the format and the record count,
//! one line per record, and a footer repeating the count with a checksum
//! (FNV-1a 64 of every byte before the footer). A missing footer, a count
//! or checksum mismatch, or an unparsable line makes the file *corrupt*:
//! start-up stops with a clear error and the file is kept for the operator.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The format name in a spill file's header.
const FORMAT: &str = "outbox-spill";
/// The format version.
const VERSION: u32 = 1;

/// One entity's newest unwritten state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpillRecord {
    /// Entity kind.
    pub kind: String,
    /// Entity id.
    pub id: String,
    /// The version in memory.
    pub version: u64,
    /// A tombstone.
    pub deleted: bool,
    /// The entity's JSON (absent for a tombstone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    reason: String,
    created_at_unix: u64,
    records: u64,
}

#[derive(Serialize, Deserialize)]
struct Footer {
    end: bool,
    records: u64,
    fnv1a64: String,
}

/// Why a spill file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// Reading or writing failed.
    #[error("spill file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is truncated or damaged; it is kept for the operator.
    #[error("spill file {path} is corrupt ({reason}); it was kept: inspect it, then move it away to start without it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// FNV-1a, 64 bits: enough to detect truncation and damage (not an
/// adversary).
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SpillError + '_ {
    move |source| SpillError::Io { path: path.to_path_buf(), source }
}

/// The spill files in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, SpillError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SpillError::Io { path: dir.to_path_buf(), source: e }),
    };
    let mut files: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "spill")).collect();
    files.sort();
    Ok(files)
}

/// Writes `records` to a new spill file in `dir` (created if missing):
/// written to a temporary name, fsynced, renamed, and the folder fsynced,
/// so the file is either whole or absent.
pub fn write(dir: &Path, reason: &str, records: &[SpillRecord]) -> Result<PathBuf, SpillError> {
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let name = format!("{:020}-{:09}-{}.spill", now.as_secs(), now.subsec_nanos(), std::process::id());
    let path = dir.join(name);
    let temporary = path.with_extension("spill.tmp");
    let mut body = Vec::with_capacity(records.len() * 256);
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        reason: reason.into(),
        created_at_unix: now.as_secs(),
        records: records.len() as u64,
    };
    serde_json::to_writer(&mut body, &header).expect("a header serializes");
    body.push(b'\n');
    for record in records {
        serde_json::to_writer(&mut body, record).expect("a record serializes");
        body.push(b'\n');
    }
    let mut checksum = Fnv::new();
    checksum.update(&body);
    let footer = Footer { end: true, records: records.len() as u64, fnv1a64: format!("{:016x}", checksum.0) };
    serde_json::to_writer(&mut body, &footer).expect("a footer serializes");
    body.push(b'\n');

    let mut file = OpenOptions::new().write(true).create_new(true).open(&temporary).map_err(io_error(&temporary))?;
    file.write_all(&body).map_err(io_error(&temporary))?;
    file.sync_all().map_err(io_error(&temporary))?;
    drop(file);
    fs::rename(&temporary, &path).map_err(io_error(&path))?;
    sync_dir(dir)?;
    Ok(path)
}

/// Reads and verifies a spill file.
pub fn read(path: &Path) -> Result<Vec<SpillRecord>, SpillError> {
    let corrupt = |reason: String| SpillError::Corrupt { path: path.to_path_buf(), reason };
    let file = File::open(path).map_err(io_error(path))?;
    let mut lines = BufReader::new(file).split(b'\n');
    let mut checksum = Fnv::new();
    let mut next_line = |checksum: &mut Fnv, track: bool| -> Result<Option<Vec<u8>>, SpillError> {
        match lines.next() {
            None => Ok(None),
            Some(Err(e)) => Err(SpillError::Io { path: path.to_path_buf(), source: e }),
            Some(Ok(line)) => {
                if track {
                    checksum.update(&line);
                    checksum.update(b"\n");
                }
                Ok(Some(line))
            }
        }
    };
    let header_line = next_line(&mut checksum, true)?.ok_or_else(|| corrupt("the file is empty".into()))?;
    let header: Header =
        serde_json::from_slice(&header_line).map_err(|e| corrupt(format!("unreadable header: {e}")))?;
    if header.format != FORMAT || header.version != VERSION {
        return Err(corrupt(format!("unknown format {} version {}", header.format, header.version)));
    }
    let mut records = Vec::with_capacity(header.records.min(1_000_000) as usize);
    for index in 0..header.records {
        let line = next_line(&mut checksum, true)?
            .ok_or_else(|| corrupt(format!("truncated: {index} of {} records present", header.records)))?;
        match serde_json::from_slice::<SpillRecord>(&line) {
            Ok(record) => records.push(record),
            // A truncated file may end in half a record line.
            Err(e) => return Err(corrupt(format!("record {index} is unreadable: {e}"))),
        }
    }
    let expected = format!("{:016x}", checksum.0);
    let footer_line =
        next_line(&mut checksum, false)?.ok_or_else(|| corrupt("truncated: the end marker is missing".into()))?;
    let footer: Footer =
        serde_json::from_slice(&footer_line).map_err(|e| corrupt(format!("unreadable end marker: {e}")))?;
    if !footer.end || footer.records != header.records {
        return Err(corrupt(format!(
            "the end marker counts {} records, the header {}",
            footer.records, header.records
        )));
    }
    if footer.fnv1a64 != expected {
        return Err(corrupt(format!("checksum mismatch (file says {}, content is {expected})", footer.fnv1a64)));
    }
    if next_line(&mut checksum, false)?.is_some_and(|l| !l.is_empty()) {
        return Err(corrupt("data after the end marker".into()));
    }
    Ok(records)
}

/// Removes a replayed spill file and fsyncs its folder.
pub fn remove(path: &Path) -> Result<(), SpillError> {
    fs::remove_file(path).map_err(io_error(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), SpillError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, version: u64) -> SpillRecord {
        SpillRecord {
            kind: "item".into(),
            id: id.into(),
            version,
            deleted: false,
            data: Some(serde_json::json!({"id": id})),
        }
    }

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "outbox-spill-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn round_trip() {
        let dir = scratch();
        let records = vec![record("a", 3), SpillRecord { deleted: true, data: None, ..record("b", 7) }];
        let path = write(&dir, "test", &records).unwrap();
        assert_eq!(list(&dir).unwrap(), vec![path.clone()]);
        assert_eq!(read(&path).unwrap(), records);
        remove(&path).unwrap();
        assert!(list(&dir).unwrap().is_empty());
    }

    #[test]
    fn truncation_and_damage_are_detected() {
        let dir = scratch();
        let path = write(&dir, "test", &[record("a", 1), record("b", 2), record("c", 3)]).unwrap();
        let full = fs::read(&path).unwrap();
        // (A file missing only its final newline is still whole.)
        for cut in [0, 10, full.len() / 2, full.len() - 5] {
            fs::write(&path, &full[..cut]).unwrap();
            assert!(matches!(read(&path), Err(SpillError::Corrupt { .. })), "cut at {cut} is detected");
        }
        let mut damaged = full.clone();
        let at = damaged.iter().position(|&b| b == b'"').unwrap() + 200;
        damaged[at.min(full.len() - 10)] ^= 0x01;
        fs::write(&path, &damaged).unwrap();
        assert!(matches!(read(&path), Err(SpillError::Corrupt { .. })), "a flipped bit is detected");
        fs::remove_dir_all(&dir).unwrap();
    }
}
