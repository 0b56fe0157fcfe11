//! The state file: load, lock, modify, write back — shared by every process using the fake.
//!
//! Owns file handling only. A separate `<state>.lock` file carries an exclusive `flock`
//! (std `File::lock`) for the whole read-modify-write, so concurrent processes (the plugin,
//! `nvidia-smi`, a test) serialise. Writes are temp file + fsync + rename + directory
//! fsync, and happen only when the state changed. When a proc root is configured the fake
//! `/proc` tree is refreshed under the same lock.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::state::State;

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system error on `path`.
    #[error("state file I/O on {path}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not valid JSON of the expected shape.
    #[error("decoding state file {path}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Handle on one state file (cheap; opens files per operation).
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
    proc_root: Option<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl StateStore {
    /// A store for `path`; with `proc_root`, keep a fake `/proc` tree there in sync.
    pub fn new(path: impl Into<PathBuf>, proc_root: Option<PathBuf>) -> Self {
        StateStore {
            path: path.into(),
            proc_root,
        }
    }

    /// The state file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> Result<File, StoreError> {
        let mut lock_path = self.path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        f.lock().map_err(io(&lock_path))?;
        Ok(f)
    }

    fn load(&self) -> Result<State, StoreError> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Decode {
                path: self.path.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io(&self.path)(e)),
        }
    }

    /// A snapshot of the state (an empty state if the file does not exist yet).
    pub fn read(&self) -> Result<State, StoreError> {
        let _guard = self.lock()?;
        self.load()
    }

    /// Run `f` on the state under the lock; persist if it changed. Returns `f`'s result.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> Result<R, StoreError> {
        let _guard = self.lock()?;
        let before = self.load()?;
        let mut state = before.clone();
        let out = f(&mut state);
        if state != before || !self.path.exists() {
            self.write(&state)?;
            if let Some(root) = &self.proc_root {
                crate::procfs::sync(root, &state).map_err(io(root))?;
            }
        }
        Ok(out)
    }

    fn write(&self, state: &State) -> Result<(), StoreError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut bytes = serde_json::to_vec_pretty(state).map_err(|source| StoreError::Decode {
            path: self.path.clone(),
            source,
        })?;
        bytes.push(b'\n');
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io(&dir))?;
        tmp.write_all(&bytes).map_err(io(tmp.path()))?;
        tmp.as_file().sync_all().map_err(io(&self.path))?;
        tmp.persist(&self.path)
            .map_err(|e| io(&self.path)(e.error))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Fault, Times};

    #[test]
    fn update_persists_and_read_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("t.yaml.state.json"), None);
        assert_eq!(store.read().unwrap(), State::default());
        store
            .update(|s| {
                s.faults.push(Fault {
                    function: "nvmlShutdown".into(),
                    gpu_uuid: None,
                    error: 999,
                    times: Times::Once,
                })
            })
            .unwrap();
        let again = StateStore::new(store.path(), None).read().unwrap();
        assert_eq!(again.faults.len(), 1);
        let text = fs::read_to_string(store.path()).unwrap();
        assert!(text.contains("\"function\": \"nvmlShutdown\""), "{text}");
    }

    #[test]
    fn concurrent_updates_do_not_lose_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = StateStore::new(&path, None);
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        store.update(|s| s.mig_generation += 1).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            StateStore::new(&path, None).read().unwrap().mig_generation,
            40
        );
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            StateStore::new(&path, None).read(),
            Err(StoreError::Decode { .. })
        ));
    }
}
