//! Writing what could not be written to a spill file at shutdown.

use std::path::{Path, PathBuf};

use serde_json::value::RawValue;
use tracing::error;

use crate::metrics as m;
use crate::outbox::spill::{self, SpillRecord};
use crate::store::{Store, Unwritten};

/// Writes the store's unwritten entities to a new spill file in `dir`
/// (off the async runtime, streamed). Returns the number of records and the
/// file, or `None` when there was nothing to spill or it could not be kept
/// (logged).
pub(super) async fn spill(
    store: &Store,
    dir: Option<&Path>,
    reason: &'static str,
    epoch: Option<u64>,
) -> Option<(usize, PathBuf)> {
    let store = store.clone();
    let dir = dir.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || {
        let unwritten = store.unwritten();
        if unwritten.is_empty() {
            return None;
        }
        let Some(dir) = dir else {
            error!(records = unwritten.len(), "no spill folder: unwritten changes are lost");
            return None;
        };
        let total = unwritten.len();
        let records = unwritten.into_iter().filter_map(|entity| to_record(&store, entity));
        match spill::write(&dir, reason, epoch, records) {
            Ok((path, written)) => {
                let written = written as usize;
                m::spilled(written);
                error!(records = written, path = %path.display(), reason, epoch,
                    "spilled unwritten changes to a file; the next start replays them");
                if written < total {
                    error!(
                        lost = total - written,
                        "some unwritten entities could not be serialized and are not in the spill file"
                    );
                }
                Some((written, path))
            }
            Err(e) => {
                error!(error = %e, records = total, "could not write the spill file; these changes are lost");
                None
            }
        }
    })
    .await
    .expect("the spill task does not panic")
}

/// One unwritten entity as a spill record (`None`, logged, when it cannot
/// be serialized: written as null it would replay as a live entity without
/// data).
fn to_record(store: &Store, entity: Unwritten) -> Option<SpillRecord> {
    let kind = store.kinds()[entity.kind].name;
    let data = match &entity.value {
        None => None,
        Some(value) => {
            let mut json = Vec::new();
            let raw = value
                .write_json(&mut json)
                .map_err(|e| e.to_string())
                .and_then(|()| String::from_utf8(json).map_err(|e| e.to_string()))
                .and_then(|text| RawValue::from_string(text).map_err(|e| e.to_string()));
            match raw {
                Ok(raw) => Some(raw),
                Err(e) => {
                    error!(kind, id = %entity.id, version = entity.version, error = %e,
                        "an unwritten entity cannot be serialized; it is left out of the spill file");
                    return None;
                }
            }
        }
    };
    Some(SpillRecord {
        kind: kind.to_owned(),
        id: entity.id.to_string(),
        version: entity.version,
        base: Some(entity.base),
        group: Some(entity.group),
        deleted: entity.value.is_none(),
        data,
    })
}
