//! Writes, removes and lists our claim spec files in the CDI directory.
//!
//! Owns file I/O on `<cdi-root>/gpu-dra.dev-claim_*.json`; must not build spec content.
//! Follows the CDI rule that runtimes watch the directory and load every `*.json`/`*.yaml`:
//! a spec is written under a temporary name in the same directory that does not end in
//! `.json` (so no runtime reads a half-written file) and renamed over the final name,
//! through [`crate::state_files`] (mode 0600, no symbolic link below the CDI dir followed).
//!
//! No fsync: on real nodes the CDI dir (`/var/run/cdi`) is tmpfs, so an fsync there is a
//! no-op, and a spec only matters to containers of the current boot. A plugin crash keeps
//! the page cache, so the rename is all a reader needs; after an OS crash every claim is
//! prepared again (the checkpoint's boot id voids the old state) and a spec left on a disk
//! CDI dir from the previous boot (older than the boot time) is removed by recovery, so
//! durability buys nothing.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::claim_spec::{SPEC_FILE_PREFIX, claim_uid_of_file_name, spec_path};
use super::spec::Spec;
use crate::state_files::StateDir;

/// Errors of CDI spec file operations.
#[derive(Debug, Error)]
pub enum CdiWriteError {
    /// The spec could not be serialised (a bug: the model holds only strings and numbers).
    #[error("cannot serialise CDI spec of claim {claim_uid}")]
    Serialize {
        /// Claim UID.
        claim_uid: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// Creating, writing, syncing or renaming the spec file failed.
    #[error("cannot write CDI spec {path}")]
    Write {
        /// Final spec path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Removing a spec file failed (other than it being absent).
    #[error("cannot remove CDI spec {path}")]
    Remove {
        /// Spec path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Listing the CDI directory failed.
    #[error("cannot list CDI directory {dir}")]
    List {
        /// The CDI root.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Writes `bytes` to `path` atomically: temp file in the same directory (named
/// `.<file name>.<random>.tmp`, never ending in `.json`, mode 0600), then rename; no fsync
/// (see the module docs). Creates the directory (0700) when missing. Errors: the path has
/// no file name or parent, a symbolic link below the directory, I/O.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let file_name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "path has no UTF-8 file name")
    })?;
    StateDir::create(dir, false)?.replace(file_name, bytes)
}

/// Writes the spec of `claim_uid` to `<cdi_root>/gpu-dra.dev-claim_<uid>.json`
/// atomically (pretty JSON, trailing newline) and returns the path.
pub fn write_spec(cdi_root: &Path, claim_uid: &str, spec: &Spec) -> Result<PathBuf, CdiWriteError> {
    let path = spec_path(cdi_root, claim_uid);
    let mut bytes = serde_json::to_vec_pretty(spec).map_err(|source| CdiWriteError::Serialize {
        claim_uid: claim_uid.to_string(),
        source,
    })?;
    bytes.push(b'\n');
    write_atomic(&path, &bytes).map_err(|source| CdiWriteError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Removes the spec of `claim_uid`; `Ok(false)` when it did not exist (idempotent).
pub fn remove_spec(cdi_root: &Path, claim_uid: &str) -> Result<bool, CdiWriteError> {
    let path = spec_path(cdi_root, claim_uid);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    StateDir::at(cdi_root)
        .remove(&name)
        .map_err(|source| CdiWriteError::Remove { path, source })
}

/// One of our spec files found in the CDI directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpecFile {
    /// The claim UID from the file name.
    pub claim_uid: String,
    /// Full path.
    pub path: PathBuf,
}

/// Lists our claim spec files (sorted by claim UID) for orphan cleanup; leftover temp
/// files of ours (`.gpu-dra.dev-claim_*.tmp`) are returned separately so they can be
/// deleted. A missing directory lists as empty.
pub fn list_specs(cdi_root: &Path) -> Result<(Vec<SpecFile>, Vec<PathBuf>), CdiWriteError> {
    let list_err = |source| CdiWriteError::List {
        dir: cdi_root.to_path_buf(),
        source,
    };
    let names = StateDir::at(cdi_root).names().map_err(list_err)?;
    let mut specs = Vec::new();
    let mut temps = Vec::new();
    for name in names {
        if let Some(uid) = claim_uid_of_file_name(&name) {
            specs.push(SpecFile {
                claim_uid: uid.to_string(),
                path: cdi_root.join(&name),
            });
        } else if name.starts_with(&format!(".{SPEC_FILE_PREFIX}")) && name.ends_with(".tmp") {
            temps.push(cdi_root.join(&name));
        }
    }
    specs.sort();
    temps.sort();
    Ok((specs, temps))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdi::claim_spec::{CdiDeviceInput, claim_spec};
    use std::fs;

    #[test]
    fn write_read_list_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("cdi");
        let spec = claim_spec("uid-1", &[CdiDeviceInput::gpu("gpu-0", "GPU-a", 0)]);
        let path = write_spec(&root, "uid-1", &spec).expect("write");
        assert_eq!(path, root.join("gpu-dra.dev-claim_uid-1.json"));
        let back: Spec = serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
        assert_eq!(back, spec);
        // Overwrite is fine (idempotent prepare).
        write_spec(&root, "uid-1", &spec).expect("rewrite");
        write_spec(&root, "uid-2", &spec).expect("write 2");
        fs::write(root.join("k8s.gpu.nvidia.com-claim_x.json"), "{}").expect("foreign");
        fs::write(root.join(".gpu-dra.dev-claim_uid-3.json.abc.tmp"), "{").expect("temp");
        let (specs, temps) = list_specs(&root).expect("list");
        let uids: Vec<_> = specs.iter().map(|s| s.claim_uid.as_str()).collect();
        assert_eq!(uids, ["uid-1", "uid-2"]);
        assert_eq!(temps, [root.join(".gpu-dra.dev-claim_uid-3.json.abc.tmp")]);
        assert!(remove_spec(&root, "uid-1").expect("remove"));
        assert!(!remove_spec(&root, "uid-1").expect("remove again"));
        let (specs, _) = list_specs(&root).expect("list");
        assert_eq!(specs.len(), 1);
    }

    #[test]
    fn no_temp_file_is_left_and_none_ends_in_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.json");
        write_atomic(&path, b"1").expect("write");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        assert_eq!(names, ["a.json"]);
    }

    #[test]
    fn missing_directory_lists_empty_and_write_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            list_specs(&dir.path().join("none")).expect("list"),
            (vec![], vec![])
        );
        let file = dir.path().join("file");
        fs::write(&file, "x").expect("file");
        let spec = claim_spec("u", &[]);
        let err = write_spec(&file, "u", &spec).expect_err("root is a file");
        assert!(
            err.to_string().contains("gpu-dra.dev-claim_u.json"),
            "{err}"
        );
    }
}
