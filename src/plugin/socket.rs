//! Unix socket files for the kubelet-facing services.
//!
//! Owns creating a socket file (parent directories, replacing a stale socket left by a
//! previous instance, mode 0600 so only root-equivalent peers such as the kubelet can
//! connect) and removing it again. It removes a path only if it is a socket, and on
//! shutdown only if it is still the socket this instance created (same inode), so a
//! stopping instance never deletes a newer instance's socket.
//!
//! Also owns the socket names. Fixed: `<driver>-reg.sock` and `dra.sock`. Per instance
//! (rolling update, kubelet 1.33+), following the upstream Go helper's
//! `RollingUpdateRegistrarSocketFile`: the first registration name whose full path fits
//! in `sun_path` of `<driver>-<pod UID>-reg.sock`,
//! `<driver>-<base64url(SHA-256(pod UID)[:8])>-reg.sock` and
//! `dra-<base64url(SHA-256(driver, NUL, pod UID)[:16])>-reg.sock` (the last one even if it
//! does not fit); the DRA socket is `dra-<pod UID>.sock`, or `dra-<base64url(SHA-256(pod
//! UID)[:8])>.sock` when that path is too long (upstream has no fallback there).

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use tracing::{info, warn};

/// Longest socket path `bind(2)` accepts here: `sun_path` is 108 bytes and the standard
/// library keeps a terminating NUL (upstream Go allows 108 without it).
pub const MAX_SOCKET_PATH: usize = 107;

fn sha256_b64(data: &[u8], bytes: usize) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest.as_ref()[..bytes])
}

fn first_fitting(dir: &Path, candidates: Vec<String>) -> PathBuf {
    let fits = |name: &String| dir.join(name).as_os_str().len() <= MAX_SOCKET_PATH;
    let chosen = match candidates.iter().position(fits) {
        Some(i) => i,
        None => candidates.len() - 1,
    };
    candidates
        .into_iter()
        .nth(chosen)
        .map_or_else(PathBuf::new, |name| dir.join(name))
}

/// Registration socket path in the kubelet's `registry_dir`: `<driver>-reg.sock`, or
/// with `pod_uid` the per-instance name described in the module docs.
pub fn registration_socket_path(
    registry_dir: &Path,
    driver: &str,
    pod_uid: Option<&str>,
) -> PathBuf {
    let Some(uid) = pod_uid else {
        return registry_dir.join(format!("{driver}-reg.sock"));
    };
    let driver_uid = [driver.as_bytes(), b"\0", uid.as_bytes()].concat();
    first_fitting(
        registry_dir,
        vec![
            format!("{driver}-{uid}-reg.sock"),
            format!("{driver}-{}-reg.sock", sha256_b64(uid.as_bytes(), 8)),
            format!("dra-{}-reg.sock", sha256_b64(&driver_uid, 16)),
        ],
    )
}

/// DRA service socket path in the driver's `plugin_dir`: `dra.sock`, or with `pod_uid`
/// `dra-<pod UID>.sock` (hashed when too long, see the module docs).
pub fn dra_socket_path(plugin_dir: &Path, pod_uid: Option<&str>) -> PathBuf {
    let Some(uid) = pod_uid else {
        return plugin_dir.join("dra.sock");
    };
    first_fitting(
        plugin_dir,
        vec![
            format!("dra-{uid}.sock"),
            format!("dra-{}.sock", sha256_b64(uid.as_bytes(), 8)),
        ],
    )
}

/// Removes the socket a previous instance (that has exited) left at `path`; anything
/// that is not a socket is left alone and reported.
pub fn remove_left_behind(path: &Path) -> Result<(), SocketError> {
    remove_stale(path)
}

/// Why a socket file could not be created or removed.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The parent directory could not be created.
    #[error("cannot create directory {path}")]
    CreateDir {
        /// Directory that failed.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket sits at the socket path; we do not delete it.
    #[error("{path} exists and is not a socket; remove it or choose another kubelet root")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The path could not be inspected or a stale socket could not be removed.
    #[error("cannot remove stale socket {path}")]
    Remove {
        /// The path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// bind(2) failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// chmod or stat of the new socket failed.
    #[error("cannot restrict permissions of {path}")]
    Permissions {
        /// The path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// A bound, listening Unix socket and the identity of its file.
#[derive(Debug)]
pub struct UnixSocket {
    path: PathBuf,
    /// (device, inode) of the socket file we created.
    identity: (u64, u64),
    listener: UnixListener,
}

/// Removes `path` if it is a socket; errors if it is anything else. Missing is fine.
fn remove_stale(path: &Path) -> Result<(), SocketError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(path).map_err(|source| SocketError::Remove {
                path: path.to_owned(),
                source,
            })?;
            info!(path = %path.display(), "removed stale socket");
            Ok(())
        }
        Ok(_) => Err(SocketError::NotASocket {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SocketError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

impl UnixSocket {
    /// Creates the parent directories, replaces a stale socket at `path`, binds, and
    /// restricts the socket to mode 0600. Does not need a Tokio runtime.
    pub fn bind(path: impl Into<PathBuf>) -> Result<Self, SocketError> {
        let path = path.into();
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|source| SocketError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
        }
        remove_stale(&path)?;
        let listener = UnixListener::bind(&path).map_err(|source| SocketError::Bind {
            path: path.clone(),
            source,
        })?;
        let perms = |source| SocketError::Permissions {
            path: path.clone(),
            source,
        };
        // bind(2) honours the umask; tighten explicitly so the mode never depends on it.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(perms)?;
        let meta = fs::symlink_metadata(&path).map_err(perms)?;
        listener.set_nonblocking(true).map_err(perms)?;
        Ok(Self {
            identity: (meta.dev(), meta.ino()),
            path,
            listener,
        })
    }

    /// Path of the socket file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A Tokio listener on a duplicate of the socket's descriptor; must be called
    /// within a Tokio runtime.
    pub fn tokio_listener(&self) -> io::Result<tokio::net::UnixListener> {
        tokio::net::UnixListener::from_std(self.listener.try_clone()?)
    }

    /// Removes the socket file if it is still the one this instance created; a file
    /// replaced by another instance, or already gone, is left alone.
    pub fn remove(&self) -> Result<(), SocketError> {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.identity => fs::remove_file(&self.path)
                .map_err(|source| SocketError::Remove {
                    path: self.path.clone(),
                    source,
                }),
            Ok(_) => {
                warn!(path = %self.path.display(), "socket was replaced by another instance; leaving it");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SocketError::Remove {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_creates_dirs_and_restricts_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/dra.sock");
        let socket = UnixSocket::bind(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        socket.remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reg.sock");
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale); // leaves the file behind, as a crashed instance would
        assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
        let socket = UnixSocket::bind(&path).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        socket.remove().unwrap();
    }

    #[test]
    fn regular_file_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reg.sock");
        fs::write(&path, b"keep").unwrap();
        let err = UnixSocket::bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket { .. }));
        assert_eq!(fs::read(&path).unwrap(), b"keep");
    }

    #[test]
    fn fixed_names_without_pod_uid() {
        let reg = registration_socket_path(
            Path::new("/var/lib/kubelet/plugins_registry"),
            "gpu.gpu-dra.dev",
            None,
        );
        assert_eq!(
            reg,
            PathBuf::from("/var/lib/kubelet/plugins_registry/gpu.gpu-dra.dev-reg.sock")
        );
        let dra = dra_socket_path(Path::new("/var/lib/kubelet/plugins/gpu.gpu-dra.dev"), None);
        assert_eq!(
            dra,
            PathBuf::from("/var/lib/kubelet/plugins/gpu.gpu-dra.dev/dra.sock")
        );
    }

    #[test]
    fn per_instance_names_fall_back_to_hashes_when_too_long() {
        let uid = "0e5f6b8a-3c1d-4f2e-9a7b-1c2d3e4f5a6b";
        let short = Path::new("/var/lib/kubelet/plugins_registry");
        assert_eq!(
            registration_socket_path(short, "gpu.gpu-dra.dev", Some(uid)),
            short.join(format!("gpu.gpu-dra.dev-{uid}-reg.sock"))
        );
        // 64 characters of directory: the full UID no longer fits in sun_path.
        let long = PathBuf::from(format!("/{}", "d".repeat(63)));
        let hashed = registration_socket_path(&long, "gpu.gpu-dra.dev", Some(uid));
        let name = hashed.file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(
            name,
            format!("gpu.gpu-dra.dev-{}-reg.sock", sha256_b64(uid.as_bytes(), 8))
        );
        assert_eq!(
            name.len(),
            "gpu.gpu-dra.dev-".len() + 11 + "-reg.sock".len()
        );
        // So long that only the driver-independent name is left (used even if too long).
        let longer = PathBuf::from(format!("/{}", "d".repeat(80)));
        let last = registration_socket_path(&longer, "gpu.gpu-dra.dev", Some(uid));
        let name = last.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("dra-") && name.ends_with("-reg.sock"),
            "{name}"
        );
        assert_eq!(name.len(), "dra-".len() + 22 + "-reg.sock".len());
        // Two pods never share a name.
        assert_ne!(
            registration_socket_path(&long, "gpu.gpu-dra.dev", Some("other")),
            hashed
        );

        assert_eq!(
            dra_socket_path(Path::new("/p"), Some(uid)),
            PathBuf::from(format!("/p/dra-{uid}.sock"))
        );
        let dra = dra_socket_path(&longer, Some(uid));
        assert!(
            dra.as_os_str().len() <= MAX_SOCKET_PATH,
            "{}",
            dra.display()
        );
        assert_ne!(dra, dra_socket_path(&longer, Some("other")));
    }

    #[test]
    fn socket_at_the_longest_allowed_path_binds() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().as_os_str().len() + 1;
        let path = dir.path().join("s".repeat(MAX_SOCKET_PATH - prefix));
        assert_eq!(path.as_os_str().len(), MAX_SOCKET_PATH);
        let socket = UnixSocket::bind(&path).unwrap();
        socket.remove().unwrap();
    }

    #[test]
    fn remove_leaves_a_newer_instances_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reg.sock");
        let old = UnixSocket::bind(&path).unwrap();
        let new = UnixSocket::bind(&path).unwrap();
        old.remove().unwrap();
        assert!(path.exists());
        new.remove().unwrap();
        assert!(!path.exists());
    }
}
