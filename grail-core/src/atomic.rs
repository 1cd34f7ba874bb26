//! Writes a crash cannot tear. A file or a whole directory is written under a temporary name
//! beside its destination, synced to disk and renamed into place, so a reader (or a resumed run)
//! finds either the previous version or the new one, never a mix. New files get the mode the
//! process's umask gives (as `File::create` does), whatever wrote them.

use std::fs::{self, File, Permissions};
use std::path::{Path, PathBuf};

use crate::error::{GrailError, Result};

/// A sibling of `path` for work in progress: `.<name>.tmp-<pid>`.
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flushes a directory's entries (a rename is durable once its directory is synced).
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| GrailError::io(dir, e))
}

/// Writes `path` atomically: `write` fills a temporary file of the same directory (it may replace
/// that file, as some writers do), which is then synced, given the umask's mode and renamed over
/// `path`.
pub fn write_file_with<E: From<GrailError>>(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let tmp = temporary(path);
    // Created here so that its mode is the umask's, even if `write` swaps in a file of its own.
    let mode: Permissions = File::create(&tmp)
        .and_then(|f| f.metadata())
        .map_err(|e| GrailError::io(&tmp, e))?
        .permissions();
    let written = write(&tmp).and_then(|()| {
        let file = File::options()
            .write(true)
            .open(&tmp)
            .map_err(|e| GrailError::io(&tmp, e))?;
        file.sync_all().map_err(|e| GrailError::io(&tmp, e))?;
        fs::set_permissions(&tmp, mode).map_err(|e| GrailError::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| GrailError::io(path, e).into())
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    Ok(sync_dir(parent(path))?)
}

/// Writes `bytes` to `path` atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_with(path, |tmp| -> Result<()> {
        fs::write(tmp, bytes).map_err(|e| GrailError::io(tmp, e))
    })
}

/// Writes the directory `dest` as a whole: `fill` writes every file into a fresh temporary
/// directory beside it; every file and the directory are synced; then the directory takes
/// `dest`'s place in one step (on Linux an atomic exchange with the previous `dest`, which is
/// then removed). Until that step the previous `dest`, if any, is untouched.
pub fn write_dir<E: From<GrailError>>(
    dest: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let tmp = temporary(dest);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| GrailError::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| GrailError::io(&tmp, e))?;
    let filled = fill(&tmp).and_then(|()| Ok(sync_tree(&tmp)?));
    if filled.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    filled?;
    if dest.exists() {
        replace_dir(&tmp, dest)?;
        // `tmp` now holds the previous version.
        fs::remove_dir_all(&tmp).map_err(|e| GrailError::io(&tmp, e))?;
    } else {
        fs::rename(&tmp, dest).map_err(|e| GrailError::io(dest, e))?;
    }
    Ok(sync_dir(parent(dest))?)
}

/// Syncs every file under `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| GrailError::io(dir, e))? {
        let path = entry.map_err(|e| GrailError::io(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| GrailError::io(&path, e))?;
        }
    }
    sync_dir(dir)
}

/// Swaps the directories `new` and `dest` in one step.
#[cfg(target_os = "linux")]
fn replace_dir(new: &Path, dest: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| {
            GrailError::io(
                p,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "path holds a NUL byte"),
            )
        })
    };
    let (a, b) = (c(new)?, c(dest)?);
    // SAFETY: both are valid NUL-terminated paths; renameat2 only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(GrailError::io(dest, std::io::Error::last_os_error()))
    }
}

/// Moves `dest` aside, then `new` into its place (a crash between the two renames leaves the
/// previous version under `new`'s name).
#[cfg(not(target_os = "linux"))]
fn replace_dir(new: &Path, dest: &Path) -> Result<()> {
    let aside = temporary(&dest.with_extension("old"));
    fs::rename(dest, &aside).map_err(|e| GrailError::io(dest, e))?;
    fs::rename(new, dest).map_err(|e| GrailError::io(dest, e))?;
    fs::rename(&aside, new).map_err(|e| GrailError::io(new, e))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_directory_is_replaced_whole_and_a_failed_fill_leaves_the_old_one() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("ckpt");
        write_dir(&dest, |d| write_file(&d.join("a"), b"one")).unwrap();
        write_dir(&dest, |d| {
            write_file(&d.join("a"), b"two")?;
            write_file(&d.join("b"), b"new")
        })
        .unwrap();
        assert_eq!(fs::read(dest.join("a")).unwrap(), b"two");
        assert_eq!(fs::read(dest.join("b")).unwrap(), b"new");
        let failed = write_dir(&dest, |d| -> Result<()> {
            write_file(&d.join("a"), b"three")?;
            Err(GrailError::Input("disk full".into()))
        });
        assert!(failed.is_err());
        assert_eq!(
            fs::read(dest.join("a")).unwrap(),
            b"two",
            "previous version kept"
        );
        // No temporary left behind either way.
        let names: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ckpt"]);
    }

    #[test]
    fn files_get_the_umask_mode_even_from_writers_that_use_private_temporaries() {
        let root = tempfile::tempdir().unwrap();
        let plain = root.path().join("plain");
        fs::write(&plain, b"x").unwrap();
        let expected = fs::metadata(&plain).unwrap().permissions().mode();
        let path = root.path().join("f");
        write_file_with(&path, |tmp| -> Result<()> {
            // Like safetensors' writer: a 0600 temporary renamed over the target.
            let private = tmp.with_extension("private");
            fs::write(&private, b"data").unwrap();
            fs::set_permissions(&private, Permissions::from_mode(0o600)).unwrap();
            fs::rename(&private, tmp).map_err(|e| GrailError::io(tmp, e))
        })
        .unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode(), expected);
        assert_eq!(fs::read(&path).unwrap(), b"data");
    }
}
