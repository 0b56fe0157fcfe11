//! Unix socket files for the kubelet-facing services.
//!
//! Owns creating a socket file (parent directories, replacing a stale socket left by a
//! previous instance, mode 0600 so only root-equivalent peers such as the kubelet can
//! connect) and removing it again. It removes a path only if it is a socket, and on
//! shutdown only if it is still the socket this instance created (same inode), so a
//! stopping instance never deletes a newer instance's socket.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

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
