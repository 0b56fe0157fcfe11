//! The environment of the NVIDIA driver's tools that the plugin runs: `nvidia-smi`, and
//! `nvidia-cuda-mps-control` with the MPS server it starts for the first client.
//!
//! Owns: the driver library directory `<plugin-dir>/driver-libraries` ([`LIBRARY_DIR`]),
//! one symbolic link per NVIDIA user-space library (`libnvidia-*.so*`, `libcuda.so*`) of
//! the directory where `libnvidia-ml.so.1` was found, each pointing at the file it names
//! resolved inside the driver root; and `LD_LIBRARY_PATH` naming that directory, which the
//! callers set on those child processes only. These tools `dlopen()` `libnvidia-ml.so.1`
//! and `libcuda.so.1` by soname, which a driver root mounted at `/driver-root` in the
//! plugin container does not put on the dynamic loader's path.
//!
//! Why links and not the driver's library directory itself in `LD_LIBRARY_PATH`: that
//! directory also holds the driver root's own C library (`libc.so.6` of the host, or of
//! the GPU operator's driver container). Loaded by the plugin image's dynamic loader, a
//! C library of another glibc release fails (loader and libc share private symbols), and
//! the variable also reaches the launchers the daemon starts under (`setsid`,
//! `systemd-run`, `unshare`, `mount`, from the image). NVIDIA's libraries load into any
//! glibc from their minimum on (the NVIDIA container toolkit mounts them into arbitrary
//! containers the same way). And an absolute link such as
//! `libcuda.so.1 -> /usr/lib64/libcuda.so.570.124.06` in the GPU operator's root names a
//! path below the driver root, which the loader would look up in the container's own
//! `/usr/lib64`; the links here point at the resolved files
//! ([`crate::driver_root::resolve_in_root`]).
//!
//! The directory is a host path (under the kubelet plugin directory), so an MPS daemon
//! that outlives the plugin keeps finding its libraries, and the next plugin rewrites the
//! links in place (each replaced atomically).
//!
//! Must not: change the plugin's own environment (the plugin loads NVML by path).

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};

use crate::driver_root::resolve_in_root;

/// Name of the driver library directory below the plugin data directory.
pub const LIBRARY_DIR: &str = "driver-libraries";

/// The environment variable that points the dynamic loader at the links.
pub const LD_LIBRARY_PATH: &str = "LD_LIBRARY_PATH";

/// Environment variables (name, value) for the driver's tools.
pub type ToolEnv = Vec<(OsString, OsString)>;

/// Errors while writing the driver library directory.
#[derive(Debug, thiserror::Error)]
pub enum ToolEnvError {
    /// A directory could not be read or created, or a link written or removed.
    #[error("{action} {path}: check that the plugin data directory is writable")]
    Io {
        /// What was being done (`listing`, `creating`, `linking`, `removing`).
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ToolEnvError {
    let path = path.to_path_buf();
    move |source| ToolEnvError::Io {
        action,
        path,
        source,
    }
}

/// Whether `name` is one of the NVIDIA user-space libraries linked (`libnvidia-*.so*`,
/// `libcuda.so*`), not another library of the same directory such as `libc.so.6`.
pub fn is_driver_library(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    (name.starts_with("libnvidia-") || name.starts_with("libcuda.so")) && name.contains(".so")
}

/// The links for the NVIDIA libraries in `library_dir` (the directory of the resolved
/// `libnvidia-ml.so.1`): (file name, target), sorted by name. Below `root` each entry is
/// resolved inside the driver root; an entry that does not resolve to a file is left
/// out. Errors: the directory cannot be listed.
pub fn library_links(root: &Path, library_dir: &Path) -> io::Result<Vec<(OsString, PathBuf)>> {
    let mut links = Vec::new();
    for entry in std::fs::read_dir(library_dir)? {
        let name = entry?.file_name();
        if !is_driver_library(&name) {
            continue;
        }
        let target = match library_dir.strip_prefix(root) {
            Ok(relative) => resolve_in_root(root, &relative.join(&name)),
            Err(_) => std::fs::canonicalize(library_dir.join(&name)).ok(),
        };
        if let Some(target) = target.filter(|t| t.is_file()) {
            links.push((name, target));
        }
    }
    links.sort();
    Ok(links)
}

/// Writes `links` into `dir` (created if missing): each link replaced atomically, links
/// of libraries no longer there removed.
pub fn write_links(dir: &Path, links: &[(OsString, PathBuf)]) -> Result<(), ToolEnvError> {
    std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
    for (name, target) in links {
        let path = dir.join(name);
        let mut temp_name = OsString::from(".");
        temp_name.push(name);
        temp_name.push(".tmp");
        let temp = dir.join(temp_name);
        match std::fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("removing", &temp)(e)),
        }
        std::os::unix::fs::symlink(target, &temp).map_err(io_error("linking", &temp))?;
        std::fs::rename(&temp, &path).map_err(io_error("linking", &path))?;
    }
    for entry in std::fs::read_dir(dir).map_err(io_error("listing", dir))? {
        let entry = entry.map_err(io_error("listing", dir))?;
        let name = entry.file_name();
        if !links.iter().any(|(n, _)| *n == name) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io_error("removing", &path))?;
        }
    }
    Ok(())
}

/// The tools' environment for links in `dir` (pure): `LD_LIBRARY_PATH=<dir>`.
pub fn tool_env(dir: &Path) -> ToolEnv {
    vec![(OsString::from(LD_LIBRARY_PATH), dir.as_os_str().to_owned())]
}

/// Links the NVIDIA libraries next to `nvml_library` (found under driver root `root`)
/// into `dir` and returns the tools' environment.
///
/// Errors: [`ToolEnvError`] when the library directory cannot be listed or `dir` written.
pub fn prepare(root: &Path, nvml_library: &Path, dir: &Path) -> Result<ToolEnv, ToolEnvError> {
    let library_dir = nvml_library.parent().unwrap_or(Path::new("/"));
    let links = library_links(root, library_dir).map_err(io_error("listing", library_dir))?;
    write_links(dir, &links)?;
    Ok(tool_env(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::time::Duration;

    use crate::sharing::control::{NvidiaSmiTimeSlice, TimeSlice, TimeSliceControl as _};
    use crate::sharing::mps::test_support::write_script;
    use crate::sharing::policy::MpsLimits;
    use crate::sharing::{MpsSettings, MpsSupervisor};

    /// A GPU operator style driver root (RHEL layout, absolute soname links) with the
    /// driver root's own C library next to NVML.
    fn operator_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let lib = root.path().join("usr/lib64");
        std::fs::create_dir_all(&lib).unwrap();
        for file in [
            "libnvidia-ml.so.570.124.06",
            "libcuda.so.570.124.06",
            "libnvidia-ptxjitcompiler.so.570.124.06",
            "libc.so.6",
        ] {
            std::fs::write(lib.join(file), b"\x7fELF").unwrap();
        }
        for (link, target) in [
            ("libnvidia-ml.so.1", "/usr/lib64/libnvidia-ml.so.570.124.06"),
            ("libcuda.so.1", "/usr/lib64/libcuda.so.570.124.06"),
            (
                "libnvidia-ptxjitcompiler.so.1",
                "libnvidia-ptxjitcompiler.so.570.124.06",
            ),
            ("libnvidia-gone.so.1", "/usr/lib64/libnvidia-gone.so.1.0"),
        ] {
            symlink(target, lib.join(link)).unwrap();
        }
        root
    }

    #[test]
    fn links_only_nvidia_libraries_resolved_inside_the_root() {
        let root = operator_root();
        let lib = root.path().join("usr/lib64");
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join(LIBRARY_DIR);
        let before = std::env::var_os(LD_LIBRARY_PATH);
        let env = prepare(root.path(), &lib.join("libnvidia-ml.so.570.124.06"), &dir).unwrap();
        assert_eq!(
            env,
            vec![(
                OsString::from("LD_LIBRARY_PATH"),
                dir.as_os_str().to_owned()
            )]
        );
        assert_eq!(
            std::env::var_os(LD_LIBRARY_PATH),
            before,
            "the plugin's own environment is unchanged"
        );
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        // No libc.so.6, no dangling link.
        assert_eq!(
            names,
            [
                "libcuda.so.1",
                "libcuda.so.570.124.06",
                "libnvidia-ml.so.1",
                "libnvidia-ml.so.570.124.06",
                "libnvidia-ptxjitcompiler.so.1",
                "libnvidia-ptxjitcompiler.so.570.124.06",
            ]
        );
        // The absolute link means the file below the driver root.
        assert_eq!(
            std::fs::read_link(dir.join("libcuda.so.1")).unwrap(),
            lib.join("libcuda.so.570.124.06")
        );
        assert_eq!(
            std::fs::read_link(dir.join("libnvidia-ml.so.1")).unwrap(),
            lib.join("libnvidia-ml.so.570.124.06")
        );
    }

    #[test]
    fn a_second_prepare_replaces_links_and_drops_removed_libraries() {
        let root = operator_root();
        let lib = root.path().join("usr/lib64");
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join(LIBRARY_DIR);
        let nvml = lib.join("libnvidia-ml.so.570.124.06");
        prepare(root.path(), &nvml, &dir).unwrap();
        // A driver update: a new libcuda, the JIT compiler gone.
        std::fs::write(lib.join("libcuda.so.580.1"), b"\x7fELF").unwrap();
        std::fs::remove_file(lib.join("libcuda.so.1")).unwrap();
        symlink("libcuda.so.580.1", lib.join("libcuda.so.1")).unwrap();
        for file in [
            "libnvidia-ptxjitcompiler.so.1",
            "libnvidia-ptxjitcompiler.so.570.124.06",
        ] {
            std::fs::remove_file(lib.join(file)).unwrap();
        }
        prepare(root.path(), &nvml, &dir).unwrap();
        assert_eq!(
            std::fs::read_link(dir.join("libcuda.so.1")).unwrap(),
            lib.join("libcuda.so.580.1")
        );
        assert!(!dir.join("libnvidia-ptxjitcompiler.so.1").exists());
        assert!(
            std::fs::read_dir(&dir).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")),
            "no temp links left"
        );
    }

    #[test]
    fn only_nvidia_library_names_are_driver_libraries() {
        for name in [
            "libnvidia-ml.so.1",
            "libcuda.so.1",
            "libnvidia-cfg.so.570.1",
        ] {
            assert!(is_driver_library(OsStr::new(name)), "{name}");
        }
        for name in [
            "libc.so.6",
            "libcudart.so.12",
            "libnvidia-ml.txt",
            "nvidia-smi",
        ] {
            assert!(!is_driver_library(OsStr::new(name)), "{name}");
        }
    }

    #[tokio::test]
    async fn nvidia_smi_and_mps_control_run_with_the_tool_env() {
        let dir = tempfile::tempdir().unwrap();
        let env = tool_env(&dir.path().join(LIBRARY_DIR));
        let record = dir.path().join("ld-path");
        // Records LD_LIBRARY_PATH on every run; as the MPS tool it also answers `-d`
        // (creates the control pipe) and reads commands.
        let tool = dir.path().join("tool");
        write_script(
            &tool,
            &format!(
                "#!/bin/sh\necho \"$0 $1 $LD_LIBRARY_PATH\" >> '{}'\n\
                 if [ \"$1\" = -d ]; then : > \"$CUDA_MPS_PIPE_DIRECTORY/control\"; exit 0; fi\n\
                 [ -n \"$CUDA_MPS_PIPE_DIRECTORY\" ] && cat > /dev/null\nexit 0\n",
                record.display()
            ),
        );
        NvidiaSmiTimeSlice::new(&tool, Duration::from_secs(10))
            .with_env(env.clone())
            .set_time_slice("GPU-1", TimeSlice::Long)
            .await
            .unwrap();
        let mps = MpsSupervisor::new(MpsSettings {
            control_path: tool.clone(),
            root_dir: dir.path().join("mps"),
            ready_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(10),
            private_shm: None,
        })
        .with_tool_env(env);
        let limits = MpsLimits {
            active_thread_percentage: Some(50),
            ..MpsLimits::default()
        };
        mps.start("c", &["GPU-1".to_owned()], &limits)
            .await
            .unwrap();
        let lines = std::fs::read_to_string(&record).unwrap();
        let expected = dir.path().join(LIBRARY_DIR).display().to_string();
        let runs: Vec<&str> = lines.lines().collect();
        // nvidia-smi, the daemon launch (-d) and one control command.
        assert_eq!(runs.len(), 3, "{lines}");
        for run in runs {
            assert!(run.ends_with(&format!(" {expected}")), "{run}");
        }
    }
}
