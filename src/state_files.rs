//! Files the plugin writes in its state directories (the plugin dir and the CDI dir).
//!
//! Owns the write discipline shared by the checkpoint and the CDI specs: the directory
//! itself is opened by its configured path (the admin may point it anywhere), but no
//! entry below it is ever followed through a symbolic link (`openat` with `O_NOFOLLOW`,
//! `O_CREAT|O_EXCL` for temp files, `renameat`/`unlinkat`, which act on the link itself).
//! Directories created here get mode 0700 and files 0600, set with `fchmod`/`chmod` so the
//! process umask cannot widen (or narrow) them.
//!
//! Replacing a file is temp file (`.<name>.<random>.tmp`, never ending in `.json`, so CDI
//! runtimes watching the directory skip it) + rename, without fsync: every file written
//! here is boot-scoped (see the checkpoint module's docs for the argument). Must not decide
//! file content or names beyond the temp-name convention.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{AtFlags, Mode, OFlags};

/// Mode of directories the plugin creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of files the plugin writes.
pub const FILE_MODE: u32 = 0o600;

/// Suffix of temp files; a leftover one is garbage from a killed process.
pub const TEMP_SUFFIX: &str = ".tmp";

/// A state directory, addressed by path; every operation resolves entries relative to it
/// without following symbolic links.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// The directory at `path`. With `owned`, the directory is the plugin's alone and its
    /// mode is forced to 0700 even when it exists; otherwise (the CDI dir, shared with
    /// other producers) only a directory created here gets 0700. Missing directories are
    /// created (parents too, 0700). Errors: creating or chmod-ing failed.
    pub fn create(path: &Path, owned: bool) -> io::Result<Self> {
        let existed = path.is_dir();
        if !existed {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(path)?;
        }
        if owned || !existed {
            fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// The directory at `path`, which may not exist yet (reads then find nothing).
    pub fn at(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    /// The directory path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_dir(&self) -> io::Result<OwnedFd> {
        Ok(rustix::fs::open(
            &self.path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    }

    /// Reads entry `name`; `Ok(None)` when absent. A symbolic link is an error
    /// (`ELOOP`, [`is_symlink_error`]), never followed.
    pub fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let dir = match self.open_dir() {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let fd = match rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut bytes = Vec::new();
        File::from(fd).read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// Modification time of entry `name` itself (not a link's target); `Ok(None)` when absent.
    pub fn modified(&self, name: &str) -> io::Result<Option<SystemTime>> {
        match fs::symlink_metadata(self.path.join(name)) {
            Ok(meta) => meta.modified().map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether entry `name` is a symbolic link.
    pub fn is_symlink(&self, name: &str) -> bool {
        fs::symlink_metadata(self.path.join(name)).is_ok_and(|m| m.file_type().is_symlink())
    }

    /// Replaces entry `name` with `bytes` (mode 0600): a temp file created exclusively
    /// (`O_CREAT|O_EXCL|O_NOFOLLOW`), written, then renamed over `name` (a link named
    /// `name` is replaced, not followed). No fsync (boot-scoped state). On error the
    /// previous content is intact and the temp file is removed.
    pub fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let dir = self.open_dir()?;
        let temp = format!(".{name}.{}{TEMP_SUFFIX}", uuid::Uuid::new_v4().simple());
        let fd = rustix::fs::openat(
            &dir,
            &*temp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )?;
        let written = (|| {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(FILE_MODE))?;
            File::from(fd).write_all(bytes)?;
            rustix::fs::renameat(&dir, &*temp, &dir, name)?;
            Ok::<(), io::Error>(())
        })();
        if written.is_err() {
            let _ = rustix::fs::unlinkat(&dir, &*temp, AtFlags::empty());
        }
        written
    }

    /// Removes entry `name` (a link is removed, not its target); `Ok(false)` when absent.
    pub fn remove(&self, name: &str) -> io::Result<bool> {
        let dir = match self.open_dir() {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames entry `from` to `to` within the directory (links are moved, not followed).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let dir = self.open_dir()?;
        Ok(rustix::fs::renameat(&dir, from, &dir, to)?)
    }

    /// Names of the entries (any type); a missing directory lists as empty.
    pub fn names(&self) -> io::Result<Vec<String>> {
        let entries = match fs::read_dir(&self.path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in entries {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Removes leftover temp files of `name` (`.<name>.*.tmp`, from a process killed
    /// mid-write) and returns how many were removed.
    pub fn remove_temp_files(&self, name: &str) -> io::Result<usize> {
        let prefix = format!(".{name}.");
        let mut removed = 0;
        for entry in self.names()? {
            if entry.starts_with(&prefix) && entry.ends_with(TEMP_SUFFIX) && self.remove(&entry)? {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// True when `err` is what opening a symbolic link with `O_NOFOLLOW` returns (`ELOOP`).
pub fn is_symlink_error(err: &io::Error) -> bool {
    err.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn modes_ignore_the_umask() {
        // Mode bits passed to mkdir/open are masked by the umask; the explicit chmod is
        // what makes them exact, so a directory made 0777 beforehand is fixed too.
        let dir = tempfile::tempdir().expect("tempdir");
        let owned = dir.path().join("a/b");
        // Under umask 000 a plain mkdir would give 0777; other tests only get looser
        // modes meanwhile, which none of them asserts.
        let old = rustix::process::umask(Mode::empty());
        let d = StateDir::create(&owned, true);
        let written = d.as_ref().map(|d| d.replace("f.json", b"x").is_ok());
        rustix::process::umask(old);
        assert!(matches!(written, Ok(true)), "{written:?}");
        let d = d.expect("create");
        assert_eq!(mode(&owned), 0o700);
        fs::set_permissions(&owned, fs::Permissions::from_mode(0o777)).expect("chmod");
        StateDir::create(&owned, true).expect("again");
        assert_eq!(mode(&owned), 0o700, "an owned dir is forced back to 0700");
        d.replace("f.json", b"y").expect("rewrite");
        assert_eq!(mode(&owned.join("f.json")), 0o600);
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).expect("mkdir");
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).expect("chmod");
        StateDir::create(&shared, false).expect("shared");
        assert_eq!(
            mode(&shared),
            0o755,
            "an existing shared dir keeps its mode"
        );
    }

    #[test]
    fn links_below_the_dir_are_never_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::create(&dir.path().join("state"), true).expect("create");
        let target = dir.path().join("target");
        fs::write(&target, b"precious").expect("target");
        symlink(&target, state.path().join("f.json")).expect("link");
        let err = state.read("f.json").expect_err("a link is not read");
        assert!(is_symlink_error(&err), "{err}");
        state
            .replace("f.json", b"new")
            .expect("replace the link itself");
        assert_eq!(fs::read(&target).expect("target"), b"precious");
        assert!(!state.is_symlink("f.json"));
        assert_eq!(state.read("f.json").expect("read"), Some(b"new".to_vec()));
        symlink(&target, state.path().join("g.json")).expect("link");
        assert!(state.remove("g.json").expect("remove"));
        assert!(target.exists(), "removing a link leaves its target");
    }

    #[test]
    fn leftover_temp_files_are_removed_and_none_is_left_by_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::create(dir.path(), true).expect("create");
        state.replace("checkpoint.json", b"{}").expect("write");
        assert_eq!(state.names().expect("names"), ["checkpoint.json"]);
        fs::write(dir.path().join(".checkpoint.json.abc.tmp"), b"{").expect("temp");
        fs::write(dir.path().join(".other.json.abc.tmp"), b"{").expect("other");
        assert_eq!(
            state.remove_temp_files("checkpoint.json").expect("clean"),
            1
        );
        assert_eq!(
            state.names().expect("names"),
            [".other.json.abc.tmp", "checkpoint.json"]
        );
        assert_eq!(
            StateDir::at(&dir.path().join("none"))
                .read("x")
                .expect("read"),
            None
        );
    }
}
