//! How an MPS control daemon is started so that its life does not depend on the plugin's.
//!
//! Owns the argv wrapper around the daemon's launch command (pure). It must not start
//! anything itself (`mps` does) nor decide the daemon's environment.
//!
//! Why: a container runtime stops a container by killing its whole process group or
//! cgroup, so a daemon that is a child of the plugin (same group, session and cgroup)
//! dies with every plugin restart or upgrade, and with it every MPS client on its GPUs.
//! The daemon is re-adopted by the next plugin through its control pipe under the plugin
//! directory (a host path), so it only has to outlive the plugin process:
//!
//! - [`MpsLauncher::Session`] (default of the `kubelet-plugin` command): `setsid` (util-linux)
//!   runs the launcher in a new session and process group, so the daemon it forks is in
//!   neither the plugin's process group nor its session, and `kill -KILL -<pgid>` of the
//!   plugin leaves it running. This is enough where the plugin runs as a host process
//!   (the test box, a systemd service) but not inside a container: the daemon is still in
//!   the container's cgroup, which the runtime kills whole.
//! - [`MpsLauncher::SystemdScope`] (the chart's default, value `mps.launcher`, for the
//!   DaemonSet): `systemd-run --scope` asks the
//!   host's systemd, through its D-Bus API, to move the launcher into a transient scope
//!   unit `gpu-dra-mps-<claimUID>.scope`, a cgroup of the host's, not the container's.
//!   The daemon it forks stays in that scope, so a plugin container restart or a
//!   DaemonSet upgrade leaves it and its clients running; the scope ends when the daemon
//!   quits (`--collect` also unloads a failed one). Needs the host's PID namespace
//!   (`hostPID: true`, systemd must see the PID), `/run/systemd` and
//!   `/run/dbus/system_bus_socket` mounted from the host (read-only is enough: run as
//!   root, `systemd-run` talks to systemd's private socket `/run/systemd/private`), and
//!   `systemd-run` in the image; the chart renders all of it for that value.
//!   Chosen over a separate long-lived container in the plugin pod because a DaemonSet
//!   upgrade replaces the whole pod, sidecar included; and over talking D-Bus ourselves
//!   because `systemd-run` is systemd's own, maintained client of that API.
//! - [`MpsLauncher::Direct`]: no wrapper (the daemon is the plugin's descendant);
//!   for tests of the supervisor itself.
//!
//! Tested as a container runtime stops a container, every process of the plugin's cgroup
//! killed at once (cgroup v2 `cgroup.kill`), in tests/mps_cgroup_kill.rs: a `session`
//! daemon dies with the cgroup; a `systemd-scope` daemon, started through the real
//! `systemd-run` of a real systemd (PID 1 of its own namespaces), lives on in its scope
//! and is re-adopted. tests/mps_detached.rs covers the process-group kill.

use std::path::PathBuf;

/// Wrapper that detaches a daemon's launcher from the plugin. See the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MpsLauncher {
    /// Run the launch command as is.
    Direct,
    /// Run it under `setsid` (new session and process group).
    Session {
        /// The `setsid` binary (util-linux), e.g. `setsid` (looked up in PATH).
        setsid_path: PathBuf,
    },
    /// Run it in a transient systemd scope unit of the host.
    SystemdScope {
        /// The `systemd-run` binary, e.g. `systemd-run`.
        systemd_run_path: PathBuf,
    },
}

impl MpsLauncher {
    /// The transient unit name of `claim_uid`'s daemon: `gpu-dra-mps-<claimUID>.scope`.
    pub fn unit_name(claim_uid: &str) -> String {
        format!("gpu-dra-mps-{claim_uid}.scope")
    }

    /// `program args` wrapped for this launcher (pure). `claim_uid` must already be a
    /// valid directory name (the supervisor checks it first).
    pub fn wrap(
        &self,
        claim_uid: &str,
        program: PathBuf,
        args: Vec<String>,
    ) -> (PathBuf, Vec<String>) {
        let wrapped = |wrapper: &PathBuf, mut front: Vec<String>| {
            front.push(program.display().to_string());
            front.extend(args.iter().cloned());
            (wrapper.clone(), front)
        };
        match self {
            Self::Direct => (program.clone(), args.clone()),
            Self::Session { setsid_path } => wrapped(setsid_path, Vec::new()),
            Self::SystemdScope { systemd_run_path } => wrapped(
                systemd_run_path,
                vec![
                    "--scope".to_owned(),
                    "--quiet".to_owned(),
                    "--collect".to_owned(),
                    format!("--unit={}", Self::unit_name(claim_uid)),
                    "--description=gpu-dra MPS control daemon".to_owned(),
                    "--".to_owned(),
                ],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn wrappers_put_the_launch_command_last() {
        let program = PathBuf::from("/usr/bin/nvidia-cuda-mps-control");
        let args = vec!["-d".to_owned()];
        assert_eq!(
            MpsLauncher::Direct.wrap("u", program.clone(), args.clone()),
            (program.clone(), args.clone())
        );
        let session = MpsLauncher::Session {
            setsid_path: "setsid".into(),
        };
        assert_eq!(
            session.wrap("u", program.clone(), args.clone()),
            (
                PathBuf::from("setsid"),
                vec![
                    "/usr/bin/nvidia-cuda-mps-control".to_owned(),
                    "-d".to_owned()
                ]
            )
        );
        let scope = MpsLauncher::SystemdScope {
            systemd_run_path: "/usr/bin/systemd-run".into(),
        };
        let (wrapper, argv) = scope.wrap("0b7c", program, args);
        assert_eq!(wrapper, Path::new("/usr/bin/systemd-run"));
        assert!(argv.contains(&"--unit=gpu-dra-mps-0b7c.scope".to_owned()));
        assert_eq!(argv[0], "--scope");
        assert_eq!(
            argv[argv.len() - 3..],
            ["--", "/usr/bin/nvidia-cuda-mps-control", "-d"]
        );
    }
}
