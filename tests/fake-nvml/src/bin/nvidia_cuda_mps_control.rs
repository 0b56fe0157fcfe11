//! Fake `nvidia-cuda-mps-control` recording daemons and client commands in the fake NVML
//! state (see `nvidia_ml::mps`). `-d` re-executes itself with `-f` in the background and
//! returns once the daemon is recorded, like the real tool's fork.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nvidia_ml::mps::{self, MpsEnv};

/// A forgotten daemon of a finished test must not live forever.
const MAX_LIFE: Duration = Duration::from_secs(6 * 3600);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let store = match nvidia_ml::machine::store_from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nvidia-cuda-mps-control: {e}");
            std::process::exit(1);
        }
    };
    let env = MpsEnv::from_env();
    let code = match args.first().map(String::as_str) {
        None => mps::client(
            &store,
            &env,
            &mut std::io::stdin().lock(),
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        ),
        Some("-f") => {
            let pid = std::process::id();
            let options = match nvidia_ml::mps_v3::daemon_options(
                &args[1..],
                &nvidia_ml::mps_v3::driver_version_from_env(),
            ) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            };
            match mps::record_start_with(&store, &env, pid, options) {
                Ok(()) => {
                    mps::daemon_loop(&store, &env, pid, MAX_LIFE);
                    0
                }
                Err(e) => {
                    eprintln!("{e}");
                    1
                }
            }
        }
        Some("-d") => start_background(&store, &env, &args[1..]),
        Some("-h") | Some("--help") => {
            println!("Usage: nvidia-cuda-mps-control [-d | -f] [-p 2|3] [-m]");
            0
        }
        Some(other) => {
            eprintln!("Invalid option: {other}\nUsage: nvidia-cuda-mps-control [-d | -f]");
            1
        }
    };
    std::process::exit(code);
}

fn start_background(store: &nvidia_ml::store::StateStore, env: &MpsEnv, options: &[String]) -> i32 {
    // Options are checked before forking, as the real tool does.
    if let Err(e) =
        nvidia_ml::mps_v3::daemon_options(options, &nvidia_ml::mps_v3::driver_version_from_env())
    {
        eprintln!("{e}");
        return 1;
    }
    if let Some(message) = mps::take_start_fault(store, env) {
        eprintln!("{message}");
        return 1;
    }
    if let Ok(s) = store.read()
        && s.mps_daemons
            .get(&env.pipe_dir)
            .is_some_and(|d| d.running && mps::process_alive(d.pid))
    {
        eprintln!("An instance of this daemon is already running");
        return 1;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("nvidia-cuda-mps-control: {e}");
            return 1;
        }
    };
    let child = Command::new(exe)
        .arg("-f")
        .args(options)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nvidia-cuda-mps-control: starting daemon: {e}");
            return 1;
        }
    };
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if mps::is_running(store, &env.pipe_dir, pid)
            && std::path::Path::new(&env.pipe_dir).join("control").exists()
        {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("nvidia-cuda-mps-control: daemon did not start");
    1
}
