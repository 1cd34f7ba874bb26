//! A trainer's checkpoints in the store, so that a trainer restarted on another machine (its
//! `output_dir` gone with the first one) resumes from the store alone.
//!
//! ```text
//! <run>/checkpoints/000000000040/model.safetensors   each file of the checkpoint, by its path
//! <run>/checkpoints/000000000040/reference/…          inside the checkpoint folder
//! <run>/checkpoints/000000000040/READY                written last: every file's size and hash
//! ```
//!
//! A checkpoint without its READY marker (an upload cut short) does not exist for readers; a
//! file whose size or hash differs from the marker's makes the download an error naming it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::layout::READY_FILE;
use crate::store::Store;

/// The folder of every stored checkpoint.
pub const CHECKPOINTS: &str = "checkpoints/";

/// `checkpoints/<step, 12 digits>/<file>`.
pub fn checkpoint_key(step: u64, file: &str) -> String {
    format!("{CHECKPOINTS}{step:012}/{file}")
}

/// The READY marker of a stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointReady {
    /// The optimizer step the checkpoint was taken at.
    pub step: u64,
    /// Every file, by its path inside the checkpoint (`/`-separated).
    pub files: Vec<StoredFile>,
}

/// One file of a stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredFile {
    /// Its path inside the checkpoint.
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// xxh3-64 of its bytes, 16 hex digits.
    pub xxh3: String,
}

fn hash(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

fn file_error(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::File {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Every file under `dir`, as (path inside `dir` with `/` separators, path on disk), sorted.
pub fn files_under(dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).map_err(|e| file_error(&folder, e))? {
            let path = entry.map_err(|e| file_error(&folder, e))?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let rel = path.strip_prefix(dir).expect("under dir");
                let name = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((name, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Uploads `files` (path inside the checkpoint, file on disk) as the checkpoint at `step`, its
/// READY marker last, then removes the oldest stored checkpoints beyond `keep`. Returns the
/// bytes sent (files unchanged since an earlier upload of the same step are not sent again).
pub fn upload(
    store: &Store,
    step: u64,
    files: &[(String, PathBuf)],
    keep: Option<usize>,
) -> Result<u64, StoreError> {
    // A step uploaded again (the final checkpoint at a step a periodic one took): files its
    // marker already vouches for, unchanged, stay; the marker goes first, so that it never
    // vouches for files being replaced.
    let marker_key = checkpoint_key(step, READY_FILE);
    let before: Vec<StoredFile> = store
        .get(&marker_key)?
        .and_then(|b| serde_json::from_slice::<CheckpointReady>(&b).ok())
        .map_or_else(Vec::new, |r| r.files);
    store.delete(&marker_key)?;
    let mut ready = CheckpointReady {
        step,
        files: Vec::new(),
    };
    let mut uploaded = 0;
    for (name, path) in files {
        let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
        let file = StoredFile {
            path: name.clone(),
            bytes: bytes.len() as u64,
            xxh3: hash(&bytes),
        };
        if !before.contains(&file) {
            uploaded += file.bytes;
            store.put(&checkpoint_key(step, name), bytes)?;
        }
        ready.files.push(file);
    }
    let marker = serde_json::to_vec_pretty(&ready).expect("plain data serialises");
    store.put(&marker_key, marker)?;
    prune(store, step, keep)?;
    Ok(uploaded)
}

/// Below `step`: removes the complete checkpoints beyond the newest `keep` (`step` counted
/// among them) and the files of uploads cut short. Nothing at or above `step` is touched.
fn prune(store: &Store, step: u64, keep: Option<usize>) -> Result<(), StoreError> {
    let older: Vec<u64> = stored(store)?.into_iter().filter(|&s| s < step).collect();
    let kept = keep.map_or(older.len(), |k| k.saturating_sub(1).min(older.len()));
    let kept = &older[older.len() - kept..];
    let mut folders: Vec<u64> = store
        .list(CHECKPOINTS)?
        .iter()
        .filter_map(|key| folder_step(key))
        .filter(|&s| s < step && !kept.contains(&s))
        .collect();
    folders.dedup();
    for old in folders {
        remove(store, old)?;
    }
    Ok(())
}

/// The step of a key under [`CHECKPOINTS`], if it is one.
fn folder_step(key: &str) -> Option<u64> {
    let (dir, _) = key.strip_prefix(CHECKPOINTS)?.split_once('/')?;
    let digits = dir.len() == 12 && dir.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| dir.parse().ok()).flatten()
}

/// The steps of every complete stored checkpoint (with its READY marker), oldest first.
pub fn stored(store: &Store) -> Result<Vec<u64>, StoreError> {
    let marker = format!("/{READY_FILE}");
    let mut steps: Vec<u64> = store
        .list(CHECKPOINTS)?
        .iter()
        .filter(|key| key.ends_with(&marker))
        .filter_map(|key| folder_step(key))
        .collect();
    steps.sort();
    Ok(steps)
}

/// Writes the stored checkpoint at `step` into `dir` (which must exist), checking every file
/// against its READY marker.
pub fn download(store: &Store, step: u64, dir: &Path) -> Result<(), StoreError> {
    let marker_key = checkpoint_key(step, READY_FILE);
    let corrupt = |key: &str, why: String| StoreError::Corrupt {
        key: store.location(key),
        why,
    };
    let marker = store
        .get(&marker_key)?
        .ok_or_else(|| corrupt(&marker_key, "no such checkpoint".into()))?;
    let ready: CheckpointReady = serde_json::from_slice(&marker)
        .map_err(|e| corrupt(&marker_key, format!("unreadable READY marker: {e}")))?;
    for file in &ready.files {
        let key = checkpoint_key(step, &file.path);
        let safe = !file.path.is_empty()
            && file
                .path
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if !safe {
            return Err(corrupt(
                &marker_key,
                format!("bad file path `{}`", file.path),
            ));
        }
        let bytes = store
            .get(&key)?
            .ok_or_else(|| corrupt(&key, "missing (the READY marker lists it)".into()))?;
        if bytes.len() as u64 != file.bytes || hash(&bytes) != file.xxh3 {
            return Err(corrupt(
                &key,
                format!(
                    "{} bytes with xxh3 {}, the READY marker says {} bytes with xxh3 {}",
                    bytes.len(),
                    hash(&bytes),
                    file.bytes,
                    file.xxh3
                ),
            ));
        }
        let path = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| file_error(parent, e))?;
        }
        std::fs::write(&path, &bytes).map_err(|e| file_error(&path, e))?;
    }
    Ok(())
}

/// Takes the READY marker of a stored checkpoint found corrupt away, so that it no longer
/// counts as one (its files go with the next upload's pruning).
pub fn discard(store: &Store, step: u64) -> Result<(), StoreError> {
    store.delete(&checkpoint_key(step, READY_FILE))
}

/// Removes the stored checkpoint at `step`, its READY marker first (so that no reader sees a
/// checkpoint whose files are going).
pub fn remove(store: &Store, step: u64) -> Result<(), StoreError> {
    store.delete(&checkpoint_key(step, READY_FILE))?;
    for key in store.list(&format!("{CHECKPOINTS}{step:012}/"))? {
        store.delete(&key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint_folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"weights").unwrap();
        std::fs::create_dir(dir.path().join("reference")).unwrap();
        std::fs::write(dir.path().join("reference/model.safetensors"), b"ref").unwrap();
        dir
    }

    #[test]
    fn a_checkpoint_comes_back_file_for_file_and_old_ones_go() {
        let store = Store::open("memory://", "run").unwrap();
        let src = checkpoint_folder();
        let files = files_under(src.path()).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["model.safetensors", "reference/model.safetensors"]);
        for step in [2, 4, 6] {
            upload(&store, step, &files, Some(2)).unwrap();
        }
        assert_eq!(stored(&store).unwrap(), [4, 6]);
        // The same step again uploads only what changed.
        std::fs::write(src.path().join("model.safetensors"), b"weights2").unwrap();
        assert_eq!(upload(&store, 6, &files, Some(2)).unwrap(), 8);
        assert!(store.list(&checkpoint_key(2, "")).unwrap().is_empty());
        let dest = tempfile::tempdir().unwrap();
        download(&store, 6, dest.path()).unwrap();
        let back = std::fs::read(dest.path().join("reference/model.safetensors")).unwrap();
        assert_eq!(back, b"ref");
        let back = std::fs::read(dest.path().join("model.safetensors")).unwrap();
        assert_eq!(back, b"weights2");
    }

    #[test]
    fn an_upload_cut_short_is_not_a_checkpoint_and_a_changed_file_is_an_error() {
        let store = Store::open("memory://", "run").unwrap();
        let src = checkpoint_folder();
        let files = files_under(src.path()).unwrap();
        upload(&store, 2, &files, None).unwrap();
        // Killed before its marker: the files are there, the checkpoint is not.
        store
            .put(&checkpoint_key(4, "model.safetensors"), b"half".to_vec())
            .unwrap();
        assert_eq!(stored(&store).unwrap(), [2]);
        // The next upload clears the cut-short one below it, and keeps the step it writes even
        // with newer steps in the store.
        upload(&store, 6, &files, Some(1)).unwrap();
        assert!(store.list(&checkpoint_key(4, "")).unwrap().is_empty());
        assert_eq!(stored(&store).unwrap(), [6]);
        upload(&store, 2, &files, Some(1)).unwrap();
        assert_eq!(stored(&store).unwrap(), [2, 6]);
        store
            .put(&checkpoint_key(2, "model.safetensors"), b"weighs".to_vec())
            .unwrap();
        let dest = tempfile::tempdir().unwrap();
        let err = download(&store, 2, dest.path()).unwrap_err().to_string();
        assert!(
            err.contains("checkpoints/000000000002/model.safetensors"),
            "{err}"
        );
        assert!(err.contains("READY marker says 7 bytes"), "{err}");
    }
}
