//! Locates the NVIDIA driver's user-space files under a driver root.
//!
//! Owns the ordered search lists for `libnvidia-ml.so.1`, `nvidia-smi` and
//! `nvidia-cuda-mps-control` below a driver root (`/` for a driver installed on the host,
//! `/run/nvidia/driver` for the GPU operator's driver container, mounted into the plugin
//! container, for example at `/driver-root`), and the resolution of symbolic links inside
//! that root: an absolute link such as `libnvidia-ml.so.1 -> /usr/lib64/libnvidia-ml.so.570.124.06`
//! means the path below the driver root, as it would after a `chroot`, not the plugin
//! container's own `/usr/lib64`. Explicit paths (the `--nvml-lib-path`, `--nvidia-smi-path`,
//! `--mps-control-path` flags) win over the search.
//!
//! Layouts covered: Debian and Ubuntu (`usr/lib/<multiarch>` with `x86_64-linux-gnu` or
//! `aarch64-linux-gnu`, the multiarch tuple of the running architecture only: a library of
//! another architecture cannot be loaded), RHEL-family and SUSE (`usr/lib64`), the GPU
//! operator's driver container (a Ubuntu or RHEL root file system at `/run/nvidia/driver`),
//! and the GKE layout (`usr/local/nvidia/lib64`, `usr/local/nvidia/bin`).
//!
//! It only reads file metadata and links; it must not load the library or run the tools.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

/// File name of the NVML library the driver installs (the ABI-versioned soname).
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";
/// File name of the NVIDIA System Management Interface tool.
pub const NVIDIA_SMI: &str = "nvidia-smi";
/// File name of the MPS control daemon.
pub const MPS_CONTROL: &str = "nvidia-cuda-mps-control";

/// Symbolic links followed for one path before giving up (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// Library directories below a driver root, most specific first, for the CPU
/// architecture `arch` (`std::env::consts::ARCH`: `x86_64`, `aarch64`).
pub fn library_dirs(arch: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(tuple) = multiarch_tuple(arch) {
        dirs.push(Path::new("usr/lib").join(tuple));
    }
    dirs.extend(["usr/lib64", "usr/lib"].map(PathBuf::from));
    if let Some(tuple) = multiarch_tuple(arch) {
        dirs.push(Path::new("lib").join(tuple));
    }
    dirs.extend(["lib64", "lib", "usr/local/nvidia/lib64"].map(PathBuf::from));
    dirs
}

/// Executable directories below a driver root, in search order.
pub fn binary_dirs() -> Vec<PathBuf> {
    [
        "usr/bin",
        "usr/sbin",
        "bin",
        "sbin",
        "usr/local/bin",
        "usr/local/nvidia/bin",
    ]
    .map(PathBuf::from)
    .to_vec()
}

/// Debian's multiarch tuple for a Rust `target_arch` name.
fn multiarch_tuple(arch: &str) -> Option<&'static str> {
    match arch {
        "x86_64" => Some("x86_64-linux-gnu"),
        "aarch64" => Some("aarch64-linux-gnu"),
        _ => None,
    }
}

/// Paths given on the command line; each one, when set, is used as is instead of a search.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--nvml-lib-path`.
    pub nvml_library: Option<PathBuf>,
    /// `--nvidia-smi-path`.
    pub nvidia_smi: Option<PathBuf>,
    /// `--mps-control-path`.
    pub mps_control: Option<PathBuf>,
}

/// A file that is in none of the searched places.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{file} not found under driver root {}; searched {}: set --driver-root to where the NVIDIA driver is installed (/ on the host, /run/nvidia/driver with the GPU operator) or give the path with --{flag}",
    root.display(),
    list(searched)
)]
pub struct NotFound {
    /// File name looked for, e.g. `libnvidia-ml.so.1`.
    pub file: &'static str,
    /// The driver root searched.
    pub root: PathBuf,
    /// Every path tried, in order (below `root`, or the override).
    pub searched: Vec<PathBuf>,
    /// The flag that names the file directly.
    pub flag: &'static str,
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where the driver's files are, as paths the plugin can open, links already resolved
/// inside the driver root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverFiles {
    /// The NVML library (required: the plugin cannot discover GPUs without it).
    pub nvml_library: PathBuf,
    /// `nvidia-smi` (needed for time-slice intervals only).
    pub nvidia_smi: Result<PathBuf, NotFound>,
    /// `nvidia-cuda-mps-control` (needed for MPS claims only).
    pub mps_control: Result<PathBuf, NotFound>,
}

/// Finds the driver's files under `root` for architecture `arch`; `overrides` win.
///
/// Errors: [`NotFound`] with every path tried when NVML is missing (an override that does
/// not exist counts as missing). A missing tool is reported in its field instead.
pub fn locate(root: &Path, arch: &str, overrides: &Overrides) -> Result<DriverFiles, NotFound> {
    let nvml_library = find(
        root,
        NVML_LIBRARY,
        "nvml-lib-path",
        &library_dirs(arch),
        overrides.nvml_library.as_deref(),
        Kind::Library,
    )?;
    let bins = binary_dirs();
    Ok(DriverFiles {
        nvml_library,
        nvidia_smi: find(
            root,
            NVIDIA_SMI,
            "nvidia-smi-path",
            &bins,
            overrides.nvidia_smi.as_deref(),
            Kind::Executable,
        ),
        mps_control: find(
            root,
            MPS_CONTROL,
            "mps-control-path",
            &bins,
            overrides.mps_control.as_deref(),
            Kind::Executable,
        ),
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Library,
    Executable,
}

fn find(
    root: &Path,
    file: &'static str,
    flag: &'static str,
    dirs: &[PathBuf],
    over: Option<&Path>,
    kind: Kind,
) -> Result<PathBuf, NotFound> {
    if let Some(path) = over {
        // A bare command name is left to the PATH lookup when it is run.
        let bare = path.components().count() == 1 && !path.is_absolute();
        if bare || usable(path, kind) {
            return Ok(path.to_path_buf());
        }
        return Err(NotFound {
            file,
            root: root.to_path_buf(),
            searched: vec![path.to_path_buf()],
            flag,
        });
    }
    let mut searched = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let relative = dir.join(file);
        searched.push(root.join(&relative));
        if let Some(found) = resolve_in_root(root, &relative)
            && usable(&found, kind)
        {
            return Ok(found);
        }
    }
    Err(NotFound {
        file,
        root: root.to_path_buf(),
        searched,
        flag,
    })
}

fn usable(path: &Path, kind: Kind) -> bool {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => match kind {
            Kind::Library => true,
            Kind::Executable => meta.permissions().mode() & 0o111 != 0,
        },
        _ => false,
    }
}

/// Resolves `relative` below `root` as if `root` were `/`: absolute link targets restart
/// at `root`, `..` never climbs above it. `None` when a component is missing or the
/// links loop.
pub fn resolve_in_root(root: &Path, relative: &Path) -> Option<PathBuf> {
    let mut pending: VecDeque<Part> = parts(relative).collect();
    let mut current = PathBuf::new();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        match part {
            Part::Root => current = PathBuf::new(),
            Part::Parent => {
                current.pop();
            }
            Part::Name(name) => {
                let next = current.join(name);
                let meta = std::fs::symlink_metadata(root.join(&next)).ok()?;
                if !meta.file_type().is_symlink() {
                    current = next;
                    continue;
                }
                links += 1;
                if links > MAX_LINKS {
                    return None;
                }
                // A relative target is relative to the link's directory (`current`).
                let target = std::fs::read_link(root.join(&next)).ok()?;
                for part in parts(&target).collect::<Vec<_>>().into_iter().rev() {
                    pending.push_front(part);
                }
            }
        }
    }
    Some(root.join(current))
}

/// One owned path component of a path being resolved.
enum Part {
    Root,
    Parent,
    Name(OsString),
}

fn parts(path: &Path) -> impl Iterator<Item = Part> + '_ {
    path.components().filter_map(|c| match c {
        Component::RootDir | Component::Prefix(_) => Some(Part::Root),
        Component::CurDir => None,
        Component::ParentDir => Some(Part::Parent),
        Component::Normal(name) => Some(Part::Name(name.to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake driver root: `files` created (executable), `links` as (link, target).
    fn root_with(files: &[&str], links: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for file in files {
            let path = dir.path().join(file);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, b"\x7fELF").expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        for (link, target) in links {
            let path = dir.path().join(link);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            symlink(target, &path).expect("symlink");
        }
        dir
    }

    fn found(root: &Path, arch: &str) -> DriverFiles {
        locate(root, arch, &Overrides::default()).expect("driver files found")
    }

    #[test]
    fn debian_x86_64_with_the_soname_link() {
        let root = root_with(
            &[
                "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.570.124.06",
                "usr/bin/nvidia-smi",
                "usr/bin/nvidia-cuda-mps-control",
            ],
            &[(
                "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
                "libnvidia-ml.so.570.124.06",
            )],
        );
        let files = found(root.path(), "x86_64");
        let r = root.path();
        assert_eq!(
            files.nvml_library,
            r.join("usr/lib/x86_64-linux-gnu/libnvidia-ml.so.570.124.06")
        );
        assert_eq!(files.nvidia_smi, Ok(r.join("usr/bin/nvidia-smi")));
        assert_eq!(
            files.mps_control,
            Ok(r.join("usr/bin/nvidia-cuda-mps-control"))
        );
    }

    #[test]
    fn debian_arm64_uses_its_own_multiarch_dir_only() {
        let root = root_with(
            &[
                "usr/lib/aarch64-linux-gnu/libnvidia-ml.so.1",
                "usr/bin/nvidia-smi",
            ],
            &[],
        );
        let files = found(root.path(), "aarch64");
        assert_eq!(
            files.nvml_library,
            root.path()
                .join("usr/lib/aarch64-linux-gnu/libnvidia-ml.so.1")
        );
        // An arm64 library cannot be loaded on x86-64: not found there.
        let err = locate(root.path(), "x86_64", &Overrides::default()).unwrap_err();
        assert!(
            !err.searched
                .iter()
                .any(|p| p.starts_with(root.path().join("usr/lib/aarch64-linux-gnu")))
        );
    }

    #[test]
    fn rhel_lib64() {
        let root = root_with(&["usr/lib64/libnvidia-ml.so.1", "usr/bin/nvidia-smi"], &[]);
        let files = found(root.path(), "x86_64");
        assert_eq!(
            files.nvml_library,
            root.path().join("usr/lib64/libnvidia-ml.so.1")
        );
        // No MPS tool in this install: reported with where it was looked for.
        let missing = files.mps_control.unwrap_err();
        assert_eq!(missing.file, MPS_CONTROL);
        assert_eq!(
            missing.searched[0],
            root.path().join("usr/bin/nvidia-cuda-mps-control")
        );
        assert_eq!(missing.searched.len(), binary_dirs().len());
    }

    #[test]
    fn gpu_operator_root_with_absolute_links_stays_inside_the_root() {
        // The operator's driver container (a RHEL image) at <host>/run/nvidia/driver,
        // its links absolute within that file system.
        let host = root_with(
            &[
                "run/nvidia/driver/usr/lib64/libnvidia-ml.so.570.124.06",
                "run/nvidia/driver/usr/bin/nvidia-smi",
                "run/nvidia/driver/usr/bin/nvidia-cuda-mps-control",
            ],
            &[
                (
                    "run/nvidia/driver/usr/lib64/libnvidia-ml.so.1",
                    "/usr/lib64/libnvidia-ml.so.570.124.06",
                ),
                // usrmerge: /lib64 -> usr/lib64
                ("run/nvidia/driver/lib64", "usr/lib64"),
            ],
        );
        let root = host.path().join("run/nvidia/driver");
        let files = found(&root, "x86_64");
        assert_eq!(
            files.nvml_library,
            root.join("usr/lib64/libnvidia-ml.so.570.124.06")
        );
        assert_eq!(files.nvidia_smi, Ok(root.join("usr/bin/nvidia-smi")));
    }

    #[test]
    fn gke_layout() {
        let root = root_with(
            &[
                "usr/local/nvidia/lib64/libnvidia-ml.so.1",
                "usr/local/nvidia/bin/nvidia-smi",
            ],
            &[],
        );
        let files = found(root.path(), "x86_64");
        assert_eq!(
            files.nvml_library,
            root.path().join("usr/local/nvidia/lib64/libnvidia-ml.so.1")
        );
        assert_eq!(
            files.nvidia_smi,
            Ok(root.path().join("usr/local/nvidia/bin/nvidia-smi"))
        );
    }

    #[test]
    fn nothing_found_lists_every_path_searched() {
        let root = root_with(&["usr/bin/nvidia-smi"], &[]);
        let err = locate(root.path(), "x86_64", &Overrides::default()).unwrap_err();
        let expected: Vec<PathBuf> = library_dirs("x86_64")
            .iter()
            .map(|d| root.path().join(d).join(NVML_LIBRARY))
            .collect();
        assert_eq!(err.searched, expected);
        let message = err.to_string();
        for path in &expected {
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
        assert!(message.contains("--nvml-lib-path"), "{message}");
    }

    #[test]
    fn overrides_win_and_a_missing_override_is_not_found() {
        let root = root_with(
            &[
                "usr/lib64/libnvidia-ml.so.1",
                "usr/bin/nvidia-smi",
                "opt/fake/libnvidia_ml.so",
                "opt/fake/nvidia-smi",
            ],
            &[],
        );
        let r = root.path();
        let overrides = Overrides {
            nvml_library: Some(r.join("opt/fake/libnvidia_ml.so")),
            nvidia_smi: Some(r.join("opt/fake/nvidia-smi")),
            mps_control: Some(PathBuf::from("nvidia-cuda-mps-control")),
        };
        let files = locate(r, "x86_64", &overrides).expect("found");
        assert_eq!(files.nvml_library, r.join("opt/fake/libnvidia_ml.so"));
        assert_eq!(files.nvidia_smi, Ok(r.join("opt/fake/nvidia-smi")));
        // A bare name is looked up in PATH when run.
        assert_eq!(
            files.mps_control,
            Ok(PathBuf::from("nvidia-cuda-mps-control"))
        );

        let gone = Overrides {
            nvml_library: Some(r.join("opt/none/libnvidia-ml.so.1")),
            ..Overrides::default()
        };
        let err = locate(r, "x86_64", &gone).unwrap_err();
        assert_eq!(err.searched, vec![r.join("opt/none/libnvidia-ml.so.1")]);
    }

    #[test]
    fn a_non_executable_tool_is_skipped() {
        let root = root_with(
            &[
                "usr/lib64/libnvidia-ml.so.1",
                "usr/bin/nvidia-smi",
                "usr/sbin/nvidia-smi",
            ],
            &[],
        );
        let r = root.path();
        std::fs::set_permissions(
            r.join("usr/bin/nvidia-smi"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        assert_eq!(
            found(r, "x86_64").nvidia_smi,
            Ok(r.join("usr/sbin/nvidia-smi"))
        );
    }

    #[test]
    fn links_never_leave_the_root_and_loops_end() {
        let root = root_with(
            &["usr/lib64/libnvidia-ml.so.1"],
            &[
                ("a/escape", "../../../../usr/lib64/libnvidia-ml.so.1"),
                ("loop/one", "two"),
                ("loop/two", "one"),
            ],
        );
        let r = root.path();
        assert_eq!(
            resolve_in_root(r, Path::new("a/escape")),
            Some(r.join("usr/lib64/libnvidia-ml.so.1"))
        );
        assert_eq!(resolve_in_root(r, Path::new("loop/one")), None);
        assert_eq!(resolve_in_root(r, Path::new("missing/file")), None);
    }
}
