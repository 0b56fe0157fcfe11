//! The fake `nvidia-cuda-mps-control`: records MPS control daemons and the commands their
//! clients send, in the shared state, so tests can assert the limits a plugin applied.
//!
//! Owns the daemon record lifecycle and the client command language; it never runs GPU
//! work. Follows the real tool's interface (CUDA MPS documentation): `-d` starts a daemon
//! in the background (`-f` in the foreground), keyed by `CUDA_MPS_PIPE_DIRECTORY`
//! (default `/tmp/nvidia-mps`), logging under `CUDA_MPS_LOG_DIRECTORY` (default
//! `/var/log/nvidia-mps`); without options it is a client reading commands from stdin:
//! `set_default_active_thread_percentage P` (echoes `P` as `%.1f`),
//! `get_default_active_thread_percentage`, `set_default_device_pinned_mem_limit DEV LIMIT`
//! (`DEV` an index or a GPU-/MIG- UUID, `LIMIT` like `2G`, `8192M`),
//! `get_default_device_pinned_mem_limit DEV`, `quit`; server-level commands (`ps`,
//! `get_server_list`, `set_active_thread_percentage PID P`, ...) are recorded only.
//! Each accepted command is also logged as `Cmd:<line>` in `<log dir>/control.log`.
//! A daemon started with `-p 3` (drivers with MPS v3) also takes the `server` and
//! `namespace` commands of [`crate::mps_v3`].
//!
//! The daemon process writes `<pipe dir>/control` (a plain-file stand-in for the real
//! named pipe), `<pipe dir>/nvidia-cuda-mps-control.pid` and `<log dir>/control.log`, and
//! exits (removing the pipe-dir files) once `quit` is recorded.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::state::{MpsDaemon, NO_EFFECT};
use crate::store::StateStore;

/// Default `CUDA_MPS_PIPE_DIRECTORY`.
pub const DEFAULT_PIPE_DIR: &str = "/tmp/nvidia-mps";
/// Default `CUDA_MPS_LOG_DIRECTORY`.
pub const DEFAULT_LOG_DIR: &str = "/var/log/nvidia-mps";

/// The MPS environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpsEnv {
    /// `CUDA_MPS_PIPE_DIRECTORY`.
    pub pipe_dir: String,
    /// `CUDA_MPS_LOG_DIRECTORY`.
    pub log_dir: String,
    /// `CUDA_VISIBLE_DEVICES`.
    pub visible_devices: Option<String>,
}

impl MpsEnv {
    /// From the process environment, with the real tool's defaults.
    pub fn from_env() -> MpsEnv {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        MpsEnv {
            pipe_dir: var("CUDA_MPS_PIPE_DIRECTORY").unwrap_or_else(|| DEFAULT_PIPE_DIR.into()),
            log_dir: var("CUDA_MPS_LOG_DIRECTORY").unwrap_or_else(|| DEFAULT_LOG_DIR.into()),
            visible_devices: var("CUDA_VISIBLE_DEVICES"),
        }
    }
}

/// Record a daemon for `env` with process id `pid`; `Err` with the real tool's message if
/// one is already running on that pipe directory.
pub fn record_start(store: &StateStore, env: &MpsEnv, pid: u32) -> Result<(), String> {
    record_start_with(store, env, pid, (2, false))
}

/// [`record_start`] of a daemon with (protocol, multi-user) from
/// [`crate::mps_v3::daemon_options`].
pub fn record_start_with(
    store: &StateStore,
    env: &MpsEnv,
    pid: u32,
    (protocol, multiuser): (u8, bool),
) -> Result<(), String> {
    let r = store
        .update(|s| {
            if s.mps_daemons
                .get(&env.pipe_dir)
                .is_some_and(|d| d.running && process_alive(d.pid))
            {
                return Err("An instance of this daemon is already running".to_string());
            }
            s.mps_daemons.insert(
                env.pipe_dir.clone(),
                MpsDaemon {
                    pipe_dir: env.pipe_dir.clone(),
                    log_dir: env.log_dir.clone(),
                    visible_devices: env.visible_devices.clone(),
                    pid,
                    running: true,
                    default_active_thread_percentage: None,
                    default_device_pinned_mem_limits: Default::default(),
                    commands: Vec::new(),
                    protocol,
                    multiuser,
                    servers: Default::default(),
                },
            );
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    r?;
    let files = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(&env.pipe_dir)?;
        std::fs::create_dir_all(&env.log_dir)?;
        std::fs::write(Path::new(&env.pipe_dir).join("control"), b"")?;
        std::fs::write(
            Path::new(&env.pipe_dir).join("nvidia-cuda-mps-control.pid"),
            format!("{pid}\n"),
        )?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&env.log_dir).join("control.log"))?;
        writeln!(log, "[fake] Startup (pid {pid})")
    })();
    files.map_err(|e| format!("creating MPS directories: {e}"))
}

/// The fault name of client command `word` (`nvidia-cuda-mps-control quit`, ...); the daemon
/// start is `nvidia-cuda-mps-control -d`.
pub fn command_fault(word: &str) -> String {
    format!("nvidia-cuda-mps-control {word}")
}

/// Consumes an injected `nvidia-cuda-mps-control -d` fault for `env`'s devices; its error
/// text if one fired (the daemon then does not start, as when the real one fails to).
pub fn take_start_fault(store: &StateStore, env: &MpsEnv) -> Option<String> {
    store
        .update(|s| s.take_fault_visible(&command_fault("-d"), env.visible_devices.as_deref()))
        .ok()
        .flatten()
        .map(|code| {
            format!("nvidia-cuda-mps-control: cannot start the MPS control daemon (error {code})")
        })
}

/// The fault name's command part of a client line: its first word, or for the MPS v3
/// module-verb commands its first two (`namespace set`, `server create`).
pub fn fault_word(line: &str) -> String {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some(m @ ("namespace" | "server")), Some(verb)) => format!("{m} {verb}"),
        (Some(first), _) => first.to_owned(),
        (None, _) => String::new(),
    }
}

/// Whether process `pid` exists and is not a zombie (`/proc/<pid>/stat`). Daemon records of
/// processes that no longer exist (killed with their process group) count as not running.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Whether the daemon for `pipe_dir` with `pid` is still recorded as running.
pub fn is_running(store: &StateStore, pipe_dir: &str, pid: u32) -> bool {
    store
        .read()
        .ok()
        .and_then(|s| {
            s.mps_daemons
                .get(pipe_dir)
                .map(|d| d.running && d.pid == pid)
        })
        .unwrap_or(false)
}

/// The foreground daemon: wait until `quit` is recorded (or the state file disappears, or
/// `max_life` passes), then remove the pipe-directory files.
pub fn daemon_loop(store: &StateStore, env: &MpsEnv, pid: u32, max_life: Duration) {
    let deadline = Instant::now() + max_life;
    while Instant::now() < deadline
        && store.path().exists()
        && is_running(store, &env.pipe_dir, pid)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = store.update(|s| {
        if let Some(d) = s
            .mps_daemons
            .get_mut(&env.pipe_dir)
            .filter(|d| d.pid == pid)
        {
            d.running = false;
        }
    });
    for f in ["control", "nvidia-cuda-mps-control.pid"] {
        let _ = std::fs::remove_file(PathBuf::from(&env.pipe_dir).join(f));
    }
}

/// Append `Cmd:<line>` to `<log dir>/control.log`, as the real daemon logs client commands
/// (best effort: the state file is the record tests assert on).
fn log_command(log_dir: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_dir.join("control.log"))
    {
        let _ = writeln!(f, "[fake Control] Cmd:{line}");
    }
}

fn valid_limit(v: &str) -> bool {
    let digits = v.strip_suffix(['K', 'M', 'G', 'k', 'm', 'g']).unwrap_or(v);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

/// Apply one client command line to daemon record `d`; returns (stdout text, error text).
pub fn apply_command(d: &mut MpsDaemon, line: &str) -> (Option<String>, Option<String>) {
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.is_empty() {
        return (None, None);
    }
    d.commands.push(words.join(" "));
    match words.as_slice() {
        ["quit"] | ["quit", "-t", _] => {
            d.running = false;
            crate::mps_v3::remove_sockets(d);
            (None, None)
        }
        v3 @ (["server", ..] | ["namespace", ..]) if d.protocol == 3 => crate::mps_v3::apply(d, v3)
            .unwrap_or_else(|| {
                (
                    None,
                    Some(format!("Error: invalid command {}", v3.join(" "))),
                )
            }),
        ["get_server_list"] => (None, None),
        ["set_default_active_thread_percentage", p] => match p.parse::<f64>() {
            Ok(v) if (0.0..=100.0).contains(&v) => {
                d.default_active_thread_percentage = Some(v);
                (Some(format!("{v:.1}")), None)
            }
            _ => (None, Some(format!("Invalid active thread percentage {p}"))),
        },
        ["get_default_active_thread_percentage"] => (
            Some(format!(
                "{:.1}",
                d.default_active_thread_percentage.unwrap_or(100.0)
            )),
            None,
        ),
        ["set_default_device_pinned_mem_limit", dev, limit] => {
            // `dev` is a CUDA device index or a GPU-/MIG- UUID, as the real tool accepts.
            if !valid_limit(limit) {
                return (
                    None,
                    Some(format!("Invalid device pinned memory limit {dev} {limit}")),
                );
            }
            d.default_device_pinned_mem_limits
                .insert((*dev).to_string(), (*limit).to_string());
            (None, None)
        }
        ["get_default_device_pinned_mem_limit", dev] => (
            Some(
                d.default_device_pinned_mem_limits
                    .get(*dev)
                    .cloned()
                    .unwrap_or_else(|| "0".to_string()),
            ),
            None,
        ),
        // Server-level and monitoring commands: recorded only (the fake runs no servers).
        [
            "ps"
            | "get_server_status"
            | "start_server"
            | "shutdown_server"
            | "terminate_client"
            | "set_active_thread_percentage"
            | "get_active_thread_percentage"
            | "set_device_pinned_mem_limit"
            | "get_device_pinned_mem_limit"
            | "lock_server"
            | "unlock_server",
            ..,
        ] => (None, None),
        _ => (None, Some(format!("Unrecognized command: {line}"))),
    }
}

/// The client: read commands from `input` and apply them to the daemon of `env.pipe_dir`.
/// Returns the exit code (1 if no daemon runs there or a command was rejected).
pub fn client(
    store: &StateStore,
    env: &MpsEnv,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let mut code = 0;
    let mut line = String::new();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                let _ = writeln!(err, "reading commands: {e}");
                return 1;
            }
        }
        let r = store.update(|s| {
            let visible = match s.mps_daemons.get_mut(&env.pipe_dir) {
                // A daemon killed without `quit` (its process gone) answers no client, as a
                // real control FIFO without a reader does not.
                Some(d) if d.running && !process_alive(d.pid) => {
                    d.running = false;
                    return None;
                }
                Some(d) if d.running => d.visible_devices.clone(),
                _ => return None,
            };
            let word = fault_word(&line);
            let fault = s.take_fault_visible(&command_fault(&word), visible.as_deref());
            let d = s.mps_daemons.get_mut(&env.pipe_dir)?;
            Some(match fault {
                // Answered as if taken (same output), but the daemon keeps its state: a
                // setting that does not take, a `quit` the daemon ignores.
                Some(NO_EFFECT) => (apply_command(&mut d.clone(), &line), None),
                // Refused as a failing daemon refuses: not applied, not recorded.
                Some(code) => ((None, Some(format!("{word}: failed (error {code})"))), None),
                None => (apply_command(d, &line), Some(d.log_dir.clone())),
            })
        });
        let r = r.map(|found| {
            found.map(|(result, log_dir)| {
                if let Some(log_dir) = log_dir {
                    log_command(Path::new(&log_dir), line.trim());
                }
                result
            })
        });
        match r {
            Ok(Some((o, e))) => {
                if let Some(o) = o {
                    let _ = writeln!(out, "{o}");
                }
                if let Some(e) = e {
                    let _ = writeln!(err, "{e}");
                    code = 1;
                }
            }
            Ok(None) => {
                let _ = writeln!(err, "Cannot find MPS control daemon process");
                return 1;
            }
            Err(e) => {
                let _ = writeln!(err, "{e}");
                return 1;
            }
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(dir: &Path) -> MpsEnv {
        MpsEnv {
            pipe_dir: dir.join("pipe").to_string_lossy().into_owned(),
            log_dir: dir.join("log").to_string_lossy().into_owned(),
            visible_devices: Some("GPU-x".into()),
        }
    }

    #[test]
    fn client_records_limits_for_its_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("s.json"), None);
        let e = env(dir.path());
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut input: &[u8] = b"get_default_active_thread_percentage\n";
        assert_eq!(client(&store, &e, &mut input, &mut out, &mut err), 1);
        assert!(String::from_utf8_lossy(&err).contains("Cannot find MPS control daemon"));

        record_start(&store, &e, std::process::id()).unwrap();
        assert!(Path::new(&e.pipe_dir).join("control").exists());
        assert!(record_start(&store, &e, 1).is_err());
        let mut out = Vec::new();
        let mut input: &[u8] = b"set_default_active_thread_percentage 40\nset_default_device_pinned_mem_limit 0 18G\nset_default_device_pinned_mem_limit MIG-abc 8192M\nget_default_active_thread_percentage\nget_server_list\n";
        assert_eq!(client(&store, &e, &mut input, &mut out, &mut err), 0);
        assert_eq!(String::from_utf8(out).unwrap(), "40.0\n40.0\n");
        let d = store.read().unwrap().mps_daemons[&e.pipe_dir].clone();
        assert_eq!(d.default_active_thread_percentage, Some(40.0));
        assert_eq!(d.default_device_pinned_mem_limits["0"], "18G");
        assert_eq!(d.default_device_pinned_mem_limits["MIG-abc"], "8192M");
        assert_eq!(d.visible_devices.as_deref(), Some("GPU-x"));
        assert_eq!(d.commands.len(), 5);
        let log = std::fs::read_to_string(Path::new(&e.log_dir).join("control.log")).unwrap();
        assert!(
            log.contains("Cmd:set_default_device_pinned_mem_limit 0 18G"),
            "{log}"
        );

        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut input: &[u8] = b"set_default_active_thread_percentage 140\nquit\n";
        assert_eq!(client(&store, &e, &mut input, &mut out, &mut err), 1);
        assert!(!is_running(&store, &e.pipe_dir, std::process::id()));
        daemon_loop(&store, &e, std::process::id(), Duration::from_secs(1));
        assert!(!Path::new(&e.pipe_dir).join("control").exists());
    }

    #[test]
    fn injected_faults_refuse_one_command_and_one_start() {
        use crate::state::{Fault, Times};
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("s.json"), None);
        let e = env(dir.path());
        let fault = |function: &str, gpu: Option<&str>| Fault {
            function: function.into(),
            gpu_uuid: gpu.map(Into::into),
            error: 999,
            times: Times::Once,
        };
        store
            .update(|s| {
                s.faults
                    .push(fault("nvidia-cuda-mps-control -d", Some("GPU-other")));
                s.faults
                    .push(fault("nvidia-cuda-mps-control -d", Some("GPU-x")));
                s.faults.push(fault("nvidia-cuda-mps-control quit", None));
            })
            .unwrap();
        assert!(take_start_fault(&store, &e).is_some());
        assert!(take_start_fault(&store, &e).is_none(), "one-shot");
        record_start(&store, &e, std::process::id()).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut input: &[u8] = b"quit\n";
        assert_eq!(client(&store, &e, &mut input, &mut out, &mut err), 1);
        assert!(
            is_running(&store, &e.pipe_dir, std::process::id()),
            "a refused quit leaves the daemon"
        );
        let s = store.read().unwrap();
        assert!(s.mps_daemons[&e.pipe_dir].commands.is_empty());
        assert_eq!(s.faults.len(), 1, "the other GPU's fault stays");
        let mut input: &[u8] = b"quit\n";
        assert_eq!(client(&store, &e, &mut input, &mut out, &mut err), 0);
        assert!(!is_running(&store, &e.pipe_dir, std::process::id()));
    }

    #[test]
    fn no_effect_faults_answer_as_taken_and_change_nothing() {
        use crate::state::{Fault, Times};
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("s.json"), None);
        let e = env(dir.path());
        record_start(&store, &e, std::process::id()).unwrap();
        store
            .update(|s| {
                for word in ["set_default_active_thread_percentage", "quit"] {
                    s.faults.push(Fault {
                        function: command_fault(word),
                        gpu_uuid: None,
                        error: NO_EFFECT,
                        times: Times::Once,
                    });
                }
            })
            .unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut input: &[u8] =
            b"set_default_active_thread_percentage 40\nget_default_active_thread_percentage\nquit\n";
        assert_eq!(client(&store, &e, &mut input, &mut out, &mut err), 0);
        assert_eq!(String::from_utf8(out).unwrap(), "40.0\n100.0\n");
        assert!(
            is_running(&store, &e.pipe_dir, std::process::id()),
            "an ignored quit leaves the daemon"
        );
        let d = store.read().unwrap().mps_daemons[&e.pipe_dir].clone();
        assert_eq!(d.default_active_thread_percentage, None);
    }
}
