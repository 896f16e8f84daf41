//! Spill files: when changes cannot be written before the process must
//! stop (the drain deadline passed with the database away, or the lease was
//! lost), the newest version of every unwritten entity goes to a local file,
//! fsynced with its folder. The next start replays every spill file before
//! hydration and removes a file only after its records are in the database
//! or quarantined.
//!
//! A record carries its *base*: the version the database held of the entity
//! as far as the writing process knew. Replay is a compare-and-set: a record
//! is written only where its row is still at its base, so a spill can never
//! overwrite what another process wrote meanwhile (a new lease holder), nor
//! bring back its tombstone; such a record becomes a conflict dead letter.
//! Records changed together share a group, replayed whole.
//!
//! A file is JSON lines: a header naming the format and the epoch of the
//! lease it was written under, one line per record (streamed), and a footer
//! with the record count and a checksum (FNV-1a 64 of every byte before the
//! footer). A missing footer, a count or checksum mismatch, or an
//! unparsable line makes the file *corrupt*: start-up stops with a clear
//! error and the file is kept for the operator.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The format name in a spill file's header.
const FORMAT: &str = "outbox-spill";
/// The format version written. Version 1 (no base, no groups, no epoch) is
/// still read.
const VERSION: u32 = 2;

/// One entity's newest unwritten state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpillRecord {
    /// Entity kind.
    pub kind: String,
    /// Entity id.
    pub id: String,
    /// The version in memory.
    pub version: u64,
    /// The version the database held, as far as the writer knew (0: no
    /// row). Absent in files of format version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
    /// Records of one group were changed together and are written
    /// together. Absent in files of format version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
    /// A tombstone.
    pub deleted: bool,
    /// The entity's JSON (absent for a tombstone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
}

/// What a spill file holds.
#[derive(Debug)]
pub struct SpillContent {
    /// The epoch of the lease the writer held (`None`: no lease, or format
    /// version 1).
    pub epoch: Option<u64>,
    /// Why it was written.
    pub reason: String,
    /// The records.
    pub records: Vec<SpillRecord>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    reason: String,
    created_at_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    epoch: Option<u64>,
    /// Announced by format version 1; version 2 streams its records and
    /// counts them in the footer only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    records: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// A writer that checksums what passes through it.
struct Checksummed<W> {
    inner: W,
    checksum: Fnv,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(bytes)?;
        self.checksum.update(&bytes[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Creates `dir` if missing, fsyncing each new folder in its parent, so
/// that the folder is still there after a power loss.
fn create_dir_durably(dir: &Path) -> Result<(), SpillError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durably(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(SpillError::Io { path: dir.to_path_buf(), source: e }),
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => sync_dir(Path::new(".")),
    }
}

/// Writes `records` to a new spill file in `dir` (created if missing),
/// streaming them: written to a temporary name, fsynced, renamed, and the
/// folder fsynced, so the file is either whole or absent. Returns the file
/// and the number of records. Blocking: call it off the async runtime.
pub fn write(
    dir: &Path,
    reason: &str,
    epoch: Option<u64>,
    records: impl IntoIterator<Item = SpillRecord>,
) -> Result<(PathBuf, u64), SpillError> {
    create_dir_durably(dir)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let name = format!("{:020}-{:09}-{}.spill", now.as_secs(), now.subsec_nanos(), std::process::id());
    let path = dir.join(name);
    let temporary = path.with_extension("spill.tmp");
    let file = OpenOptions::new().write(true).create_new(true).open(&temporary).map_err(io_error(&temporary))?;
    let mut out = Checksummed { inner: BufWriter::with_capacity(1 << 20, file), checksum: Fnv::new() };
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        reason: reason.into(),
        created_at_unix: now.as_secs(),
        epoch,
        records: None,
    };
    let line = |out: &mut Checksummed<BufWriter<File>>, value: &dyn erased::Line| -> io::Result<()> {
        value.write_to(out)?;
        out.write_all(b"\n")
    };
    let mut written = 0u64;
    let body = (|| {
        line(&mut out, &header)?;
        for record in records {
            line(&mut out, &record)?;
            written += 1;
        }
        let footer = Footer { end: true, records: written, fnv1a64: format!("{:016x}", out.checksum.0) };
        line(&mut out, &footer)?;
        let file = out.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    if let Err(e) = body {
        let _ = fs::remove_file(&temporary);
        return Err(SpillError::Io { path: temporary, source: e });
    }
    fs::rename(&temporary, &path).map_err(io_error(&path))?;
    sync_dir(dir)?;
    Ok((path, written))
}

/// Serializes one line of a spill file.
mod erased {
    use std::io::{self, Write};

    pub(super) trait Line {
        fn write_to(&self, out: &mut dyn Write) -> io::Result<()>;
    }

    impl<T: serde::Serialize> Line for T {
        fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
            serde_json::to_writer(out, self).map_err(io::Error::other)
        }
    }
}

/// Reads and verifies a spill file. Blocking: call it off the async
/// runtime.
pub fn read(path: &Path) -> Result<SpillContent, SpillError> {
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
    if header.format != FORMAT || !(1..=VERSION).contains(&header.version) {
        return Err(corrupt(format!("unknown format {} version {}", header.format, header.version)));
    }
    // Records until the footer; the checksum covers every byte before it.
    let mut records = Vec::with_capacity(header.records.unwrap_or(0).min(1_000_000) as usize);
    let (footer, expected) = loop {
        let before = checksum;
        let line = next_line(&mut checksum, true)?
            .ok_or_else(|| corrupt(format!("truncated after {} records: the end marker is missing", records.len())))?;
        if let Ok(footer) = serde_json::from_slice::<Footer>(&line) {
            break (footer, format!("{:016x}", before.0));
        }
        match serde_json::from_slice::<SpillRecord>(&line) {
            Ok(record) => records.push(record),
            // A truncated file may end in half a record line.
            Err(e) => return Err(corrupt(format!("record {} is unreadable: {e}", records.len()))),
        }
    };
    if !footer.end || footer.records != records.len() as u64 || header.records.is_some_and(|n| n != footer.records) {
        return Err(corrupt(format!(
            "the end marker counts {} records, the file holds {}{}",
            footer.records,
            records.len(),
            header.records.map(|n| format!(", the header announced {n}")).unwrap_or_default()
        )));
    }
    if footer.fnv1a64 != expected {
        return Err(corrupt(format!("checksum mismatch (file says {}, content is {expected})", footer.fnv1a64)));
    }
    if next_line(&mut checksum, false)?.is_some_and(|l| !l.is_empty()) {
        return Err(corrupt("data after the end marker".into()));
    }
    Ok(SpillContent { epoch: header.epoch, reason: header.reason, records })
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
            base: Some(version - 1),
            group: Some(7),
            deleted: false,
            data: Some(RawValue::from_string(format!("{{\"id\":\"{id}\"}}")).unwrap()),
        }
    }

    fn text(records: &[SpillRecord]) -> Vec<String> {
        records.iter().map(|r| serde_json::to_string(r).unwrap()).collect()
    }

    /// A folder of this test's own, removed when the test ends (passed
    /// or failed).
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    impl std::ops::Deref for Scratch {
        type Target = Path;

        fn deref(&self) -> &Path {
            &self.0
        }
    }

    fn scratch() -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "outbox-spill-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    #[test]
    fn round_trip() {
        let scratch = scratch();
        let dir = scratch.join("nested").join("spill");
        let records = vec![record("a", 3), SpillRecord { deleted: true, data: None, ..record("b", 7) }];
        let (path, count) = write(&dir, "test", Some(4), records.clone()).unwrap();
        assert_eq!(count, 2);
        assert_eq!(list(&dir).unwrap(), vec![path.clone()]);
        let content = read(&path).unwrap();
        assert_eq!(text(&content.records), text(&records));
        assert_eq!(content.epoch, Some(4));
        remove(&path).unwrap();
        assert!(list(&dir).unwrap().is_empty());
    }

    #[test]
    fn format_1_files_are_read_without_base() {
        let dir = scratch();
        fs::create_dir_all(&*dir).unwrap();
        let body = "{\"format\":\"outbox-spill\",\"version\":1,\"reason\":\"old\",\"created_at_unix\":1,\"records\":1}\n\
                    {\"kind\":\"item\",\"id\":\"a\",\"version\":2,\"deleted\":false,\"data\":{\"id\":\"a\"}}\n";
        let mut checksum = Fnv::new();
        checksum.update(body.as_bytes());
        let path = dir.join("1.spill");
        fs::write(&path, format!("{body}{{\"end\":true,\"records\":1,\"fnv1a64\":\"{:016x}\"}}\n", checksum.0))
            .unwrap();
        let content = read(&path).unwrap();
        assert_eq!(content.records.len(), 1);
        assert_eq!(content.records[0].base, None);
        assert_eq!(content.epoch, None);
    }

    #[test]
    fn truncation_and_damage_are_detected() {
        let dir = scratch();
        let records = vec![record("a", 1), record("b", 2), record("c", 3)];
        let (path, _) = write(&dir, "test", None, records).unwrap();
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
    }
}
