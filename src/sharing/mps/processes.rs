//! MPS processes of the plugin's claims, found in `/proc`, and stopping them by signal.
//!
//! Owns: recognising a process as the MPS control daemon (or an MPS server) of a claim's
//! pipe directory from `/proc/<pid>/{cmdline,exe,environ}`, the scan for every such process
//! under the plugin's MPS directory, and SIGTERM-then-SIGKILL with a bound for a daemon that
//! ignores `quit`.
//!
//! Must not: decide when a daemon is stopped (the supervisor does), or signal a process it
//! has not just re-verified: pids are reused, so each signal is preceded by a fresh check
//! that the pid still runs the MPS binary with the claim's `CUDA_MPS_PIPE_DIRECTORY`.
//!
//! Follows NVIDIA's MPS documentation: the control daemon is `nvidia-cuda-mps-control` run
//! with `-d` (background) or `-f` (foreground), a client is the same binary without options,
//! the daemon starts `nvidia-cuda-mps-server` processes, and all of them find one another
//! through `CUDA_MPS_PIPE_DIRECTORY`
//! (<https://docs.nvidia.com/deploy/mps/appendix-tools-and-interface-reference.html>).
//! Clients are never signalled (they end by themselves).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The MPS server binary the control daemon starts.
pub const SERVER_NAME: &str = "nvidia-cuda-mps-server";

/// One MPS process: a control daemon or a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpsProcess {
    /// Process id.
    pub pid: u32,
    /// Its `CUDA_MPS_PIPE_DIRECTORY`.
    pub pipe_dir: PathBuf,
    /// Whether it is the control daemon (else a server).
    pub control: bool,
}

/// Reads `/proc` (or a stand-in root in tests).
#[derive(Debug, Clone)]
pub struct ProcScanner {
    root: PathBuf,
    /// File name of the control binary, e.g. `nvidia-cuda-mps-control`.
    control_name: Vec<u8>,
}

fn basename(path: &[u8]) -> &[u8] {
    path.rsplit(|b| *b == b'/').next().unwrap_or(path)
}

impl ProcScanner {
    /// A scanner of `/proc` for daemons of the control binary `control_path` (matched by
    /// file name, so a symlinked or relocated driver root still matches).
    pub fn new(control_path: &Path) -> Self {
        Self {
            root: PathBuf::from("/proc"),
            control_name: control_path
                .file_name()
                .unwrap_or_else(|| OsStr::new("nvidia-cuda-mps-control"))
                .as_bytes()
                .to_vec(),
        }
    }

    /// What `pid` is, if it is an MPS control daemon or server; `None` for anything else,
    /// for a client, a zombie or a process gone or unreadable.
    pub fn inspect(&self, pid: u32) -> Option<MpsProcess> {
        let dir = self.root.join(pid.to_string());
        let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
        let argv: Vec<&[u8]> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        let exe = std::fs::read_link(dir.join("exe")).ok();
        let exe_name = exe.as_deref().map(|e| basename(e.as_os_str().as_bytes()));
        // argv[1] covers an interpreted stand-in (`sh /path/nvidia-cuda-mps-control -d`).
        let named = |name: &[u8]| {
            exe_name == Some(name) || argv.iter().take(2).any(|a| basename(a) == name)
        };
        let control = if named(&self.control_name) {
            // The daemon runs with -d or -f; a client has no option.
            if !argv.iter().any(|a| *a == b"-d" || *a == b"-f") {
                return None;
            }
            true
        } else if named(SERVER_NAME.as_bytes()) {
            false
        } else {
            return None;
        };
        if !self.alive(pid) {
            return None;
        }
        let environ = std::fs::read(dir.join("environ")).ok()?;
        let pipe_dir = environ
            .split(|b| *b == 0)
            .find_map(|var| var.strip_prefix(b"CUDA_MPS_PIPE_DIRECTORY=".as_slice()))?;
        Some(MpsProcess {
            pid,
            pipe_dir: PathBuf::from(OsStr::from_bytes(pipe_dir)),
            control,
        })
    }

    /// Every MPS process whose pipe directory `keep` accepts, control daemons first.
    pub fn scan(&self, keep: impl Fn(&Path) -> bool) -> Vec<MpsProcess> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut found: Vec<MpsProcess> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| self.inspect(pid))
            .filter(|p| keep(&p.pipe_dir))
            .collect();
        found.sort_by_key(|p| (!p.control, p.pid));
        found
    }

    /// The MPS processes serving exactly `pipe_dir`.
    pub fn of_pipe(&self, pipe_dir: &Path) -> Vec<MpsProcess> {
        self.scan(|p| p == pipe_dir)
    }

    /// Whether `pid` exists and is not a zombie (`/proc/<pid>/stat` state).
    pub fn alive(&self, pid: u32) -> bool {
        std::fs::read_to_string(self.root.join(pid.to_string()).join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ")
                    .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
            })
            .unwrap_or(false)
    }

    /// Waits until none of `pids` is alive, or `limit` passed; returns those still alive.
    pub async fn wait_gone(&self, pids: &[u32], limit: Duration) -> Vec<u32> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut delay = Duration::from_millis(5);
        loop {
            let left: Vec<u32> = pids.iter().copied().filter(|p| self.alive(*p)).collect();
            let now = tokio::time::Instant::now();
            if left.is_empty() || now >= deadline {
                return left;
            }
            // A process that is not our child gives no exit notification to wait on, so
            // poll /proc with a short, growing delay under the deadline.
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to `process` if its pid still is that MPS process (re-read from
    /// `/proc` just before). `Ok(false)` when it is gone or now something else.
    pub fn signal(&self, process: &MpsProcess, signal: Signal) -> std::io::Result<bool> {
        if self.inspect(process.pid).as_ref() != Some(process) {
            return Ok(false);
        }
        let Some(pid) = i32::try_from(process.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return Ok(false);
        };
        let sig = match signal {
            Signal::Term => rustix::process::Signal::TERM,
            Signal::Kill => rustix::process::Signal::KILL,
        };
        match rustix::process::kill_process(pid, sig) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::SRCH) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }
}

/// The signals used to stop a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: ask it to exit.
    Term,
    /// SIGKILL: end it.
    Kill,
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signal::Term => "SIGTERM",
            Signal::Kill => "SIGKILL",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A process whose argv and environment look like a daemon, a client or a stranger.
    fn spawn(dir: &Path, name: &str, args: &[&str], pipe: &Path) -> std::process::Child {
        let script = dir.join(name);
        crate::sharing::mps::test_support::write_script(
            &script,
            "#!/bin/sh\nwhile :; do sleep 1; done\n",
        );
        Command::new(&script)
            .args(args)
            .env("CUDA_MPS_PIPE_DIRECTORY", pipe)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }

    #[tokio::test]
    async fn finds_daemons_and_servers_of_a_pipe_dir_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let pipe = tmp.path().join("mps/claim-a/pipe");
        let other = tmp.path().join("mps/claim-b/pipe");
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let scanner = ProcScanner::new(&bin.join("nvidia-cuda-mps-control"));
        let mut daemon = spawn(&bin, "nvidia-cuda-mps-control", &["-d"], &pipe);
        let mut client = spawn(&bin, "nvidia-cuda-mps-control", &[], &pipe);
        let mut server = spawn(&bin, SERVER_NAME, &[], &pipe);
        let mut stranger = spawn(&bin, "unrelated", &["-d"], &pipe);
        let mut elsewhere = spawn(&bin, "nvidia-cuda-mps-control", &["-f"], &other);
        let found = scanner.of_pipe(&pipe);
        let pids: Vec<(u32, bool)> = found.iter().map(|p| (p.pid, p.control)).collect();
        assert_eq!(pids, [(daemon.id(), true), (server.id(), false)]);
        let under = scanner.scan(|p| p.starts_with(tmp.path().join("mps")));
        assert_eq!(under.len(), 3, "{under:?}");

        assert!(scanner.signal(&found[0], Signal::Term).unwrap());
        daemon.wait().unwrap();
        assert!(
            scanner
                .wait_gone(&[daemon.id()], Duration::from_secs(10))
                .await
                .is_empty()
        );
        assert!(
            !scanner.signal(&found[0], Signal::Kill).unwrap(),
            "gone: not signalled"
        );
        for child in [&mut client, &mut server, &mut stranger, &mut elsewhere] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}
