//! A shell-script stand-in for `nvidia-cuda-mps-control`, with the real tool's protocol.
use std::path::{Path, PathBuf};

/// How a stand-in daemon started with `-d` behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    /// No process stays: `-d` creates the control pipe and exits (the pipe is the daemon).
    PipeOnly,
    /// A real background process (`-f`) that lives while its control pipe exists; `quit`
    /// removes the pipe.
    Honest,
    /// Like [`Daemon::Honest`], but `quit` exits 0 and changes nothing. (Every daemon
    /// process also lives on while `<dir>/stay` exists, pipe or not.)
    IgnoresQuit,
    /// Ignores `quit` and SIGTERM: only SIGKILL ends it.
    IgnoresQuitAndTerm,
}

/// Writes the stand-in into `dir`; it appends what it was told to `<dir>/record`.
/// `ready_after`: a shell snippet run (in the background) before creating the pipe.
pub fn fake_mps_control(dir: &Path, ready_after: Option<&str>) -> PathBuf {
    stand_in(dir, ready_after, Daemon::PipeOnly)
}

/// A stand-in whose daemon is a process behaving as `daemon` says.
pub fn fake_mps_daemon(dir: &Path, daemon: Daemon) -> PathBuf {
    stand_in(dir, None, daemon)
}

/// Makes the stand-ins of `dir` answer the client command `word` with exit 0 without
/// applying it (a setting that does not take).
pub fn ignore_command(dir: &Path, word: &str) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ignore"))
        .unwrap();
    writeln!(f, "{word}").unwrap();
}

/// Keeps the stand-in's protocol: `set_default_*` values are kept in the pipe directory and
/// answered by `get_default_*`, as the real daemon's defaults are.
fn stand_in(dir: &Path, ready_after: Option<&str>, daemon: Daemon) -> PathBuf {
    let record = dir.join("record");
    let ignore = dir.join("ignore");
    let make_pipe = match (daemon, ready_after) {
        (Daemon::PipeOnly, None) => r#": > "$P/control""#.to_owned(),
        (Daemon::PipeOnly, Some(wait)) => format!(r#"( {wait}; : > "$P/control" ) &"#),
        _ => r#""$0" -f </dev/null >/dev/null 2>&1 &
  while [ ! -e "$P/control" ]; do sleep 0.01; done"#
            .to_owned(),
    };
    let trap = if daemon == Daemon::IgnoresQuitAndTerm {
        "trap '' TERM"
    } else {
        ""
    };
    let quit = if matches!(daemon, Daemon::IgnoresQuit | Daemon::IgnoresQuitAndTerm) {
        ":"
    } else {
        r#"rm -f "$P/control""#
    };
    let script = format!(
        r#"#!/bin/sh
rec='{record}'
ign='{ignore}'
stay='{stay}'
P="$CUDA_MPS_PIPE_DIRECTORY"
if [ "$1" = "-d" ]; then
  echo "start args=$* visible=$CUDA_VISIBLE_DEVICES pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "$rec"
  {make_pipe}
  exit 0
fi
if [ "$1" = "-f" ]; then
  {trap}
  : > "$P/control"
  while [ -e "$P/control" ] || [ -e "$stay" ]; do sleep 0.05; done
  exit 0
fi
if [ ! -e "$P/control" ]; then
  echo "Cannot find MPS control daemon process" >&2
  exit 1
fi
while read -r line; do
  echo "cmd $line" >> "$rec"
  case "$line" in *GPU-unknown*) echo "Invalid device" >&2; exit 2 ;; esac
  set -- $line
  if [ -e "$ign" ] && grep -qx "$1" "$ign"; then continue; fi
  case "$1" in
    quit) {quit} ;;
    set_default_active_thread_percentage) echo "$2" > "$P/pct"; echo "$2.0" ;;
    get_default_active_thread_percentage) if [ -e "$P/pct" ]; then echo "$(cat "$P/pct").0"; else echo 100.0; fi ;;
    set_default_device_pinned_mem_limit) echo "$3" > "$P/mem-$2" ;;
    get_default_device_pinned_mem_limit) if [ -e "$P/mem-$2" ]; then cat "$P/mem-$2"; else echo 0; fi ;;
  esac
done
"#,
        record = record.display(),
        ignore = ignore.display(),
        stay = dir.join("stay").display(),
    );
    let path = dir.join("nvidia-cuda-mps-control");
    write_script(&path, &script);
    path
}

/// Writes an executable script without ever holding a writable fd to it in this
/// process: a test thread forking at that moment would make exec fail with ETXTBSY.
pub fn write_script(path: &Path, body: &str) {
    let source = path.with_extension("src");
    std::fs::write(&source, body).unwrap();
    let status = std::process::Command::new("install")
        .arg("-m")
        .arg("755")
        .arg(&source)
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "install {}", path.display());
}

/// The recorded lines.
pub fn recorded(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("record"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}
