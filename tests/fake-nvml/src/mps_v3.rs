//! The MPS v3 half of the fake `nvidia-cuda-mps-control`: the protocol-3 daemon options
//! and its module-verb commands for named servers and namespaces, recorded in the shared
//! state so tests read each namespace's limits as "what the GPU recorded".
//!
//! Owns which driver versions have MPS v3, the `server` / `namespace` command language and
//! the namespace sockets under the pipe directory. Follows NVIDIA's MPS documentation
//! (release 615 and later: "MPS v3 Interface", "MPS v3 Namespaces", "MPS v3 Configuration
//! File"; see tests/fake-nvml/README.md): `-p 3` selects protocol 3 and `-m` multi-user
//! mode; a server is created by name with its `allowed_devices`; a namespace of a server
//! holds `active_thread_percentage` and `pinned_memory_limit`; a client is routed to a
//! namespace by the socket it connects to, `<pipe dir>/<server>/<namespace>/control`
//! (`<pipe dir>/<server>/control` and `<server>/default/control`: the default namespace).
//!
//! Command forms (one per line, as the control client reads them): `server create <name>
//! [allowed_devices <uuids>]`, `server delete <name>`, `server list`, `namespace create
//! <server> <ns>`, `namespace delete <server> <ns>`, `namespace list <server>`, `namespace
//! set <server> <ns> active_thread_percentage <0..100>`, `namespace set <server> <ns>
//! pinned_memory_limit <N>[K|M|G]`, `namespace get <server> <ns> <key>`. Failures as a
//! daemon refuses them (exit 1, one line on stderr): unknown server or namespace, a name
//! that exists already, `default` created or deleted, a value out of range.

use std::path::{Path, PathBuf};

use crate::state::{MpsDaemon, MpsNamespace, MpsServer};

/// First NVIDIA driver branch whose control daemon has protocol 3 (MPS v3): the MPS
/// documentation introduces MPS v3 with release 615 (the r575 edition has none).
pub const FIRST_V3_DRIVER_MAJOR: u32 = 615;

/// Whether the driver `version` (`615.71.09`) has MPS v3.
pub fn driver_has_v3(version: &str) -> bool {
    version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .is_some_and(|m| m >= FIRST_V3_DRIVER_MAJOR)
}

/// The driver version of the machine in the environment (`FAKE_NVML_TOPOLOGY`); the
/// fake's default when there is none.
pub fn driver_version_from_env() -> String {
    std::env::var_os(crate::machine::TOPOLOGY_ENV)
        .and_then(|t| crate::topology::Topology::load(Path::new(&t)).ok())
        .map(|t| t.driver_version)
        .unwrap_or_else(|| crate::topology::DEFAULT_DRIVER_VERSION.to_owned())
}

/// Daemon options besides `-d` / `-f`: (protocol, multi-user). Errors with the tool's
/// words for an unknown option, a protocol other than 2 or 3, or protocol 3 on a driver
/// without MPS v3 (whose tool has no `-p`).
pub fn daemon_options(args: &[String], driver_version: &str) -> Result<(u8, bool), String> {
    let (mut protocol, mut multiuser) = (2, false);
    if let Ok(v) = std::env::var("CUDA_MPS_PROTOCOL_VERSION") {
        protocol = v
            .trim()
            .parse()
            .map_err(|_| format!("Invalid protocol {v}"))?;
    }
    let v3 = driver_has_v3(driver_version);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-p" | "--protocol" if v3 => {
                let value = it.next().ok_or("Option -p needs a value: 2 or 3")?;
                // The environment variable takes precedence over the flag.
                if std::env::var_os("CUDA_MPS_PROTOCOL_VERSION").is_none() {
                    protocol = value
                        .parse()
                        .map_err(|_| format!("Invalid protocol {value}"))?;
                }
            }
            "-m" | "--multiuser" if v3 => multiuser = true,
            other => return Err(format!("Invalid option: {other}")),
        }
    }
    match protocol {
        2 => Ok((2, multiuser)),
        3 if v3 => Ok((3, multiuser)),
        3 => Err(format!(
            "MPS protocol 3 is not supported by driver {driver_version}"
        )),
        p => Err(format!("Invalid protocol {p}: 2 or 3")),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

fn socket(pipe: &str, parts: &[&str]) -> PathBuf {
    let mut p = PathBuf::from(pipe);
    for part in parts {
        p.push(part);
    }
    p.join("control")
}

fn make_socket(path: &Path) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(path, b"");
}

/// Removes every server's sockets (at `quit`).
pub fn remove_sockets(d: &MpsDaemon) {
    for name in d.servers.keys() {
        let _ = std::fs::remove_dir_all(Path::new(&d.pipe_dir).join(name));
    }
}

fn limit_ok(v: &str) -> bool {
    let digits = v.strip_suffix(['K', 'M', 'G', 'k', 'm', 'g']).unwrap_or(v);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

type Answer = (Option<String>, Option<String>);

fn err(text: String) -> Option<Answer> {
    Some((None, Some(format!("Error: {text}"))))
}

/// One v3 command on a protocol-3 daemon; `None` when `words` is not a v3 command.
pub fn apply(d: &mut MpsDaemon, words: &[&str]) -> Option<Answer> {
    let pipe = d.pipe_dir.clone();
    match words {
        ["server", "create", name, rest @ ..] => {
            if !valid_name(name) {
                return err(format!("invalid server name {name}"));
            }
            if d.servers.contains_key(*name) {
                return err(format!("server {name} already exists"));
            }
            let allowed = match rest {
                [] => None,
                ["allowed_devices", uuids] => Some((*uuids).to_owned()),
                _ => return err(format!("invalid server option {}", rest.join(" "))),
            };
            d.servers.insert(
                (*name).to_owned(),
                MpsServer {
                    allowed_devices: allowed,
                    namespaces: Default::default(),
                },
            );
            make_socket(&socket(&pipe, &[name]));
            make_socket(&socket(&pipe, &[name, "default"]));
            Some((None, None))
        }
        ["server", "delete", name] => match d.servers.remove(*name) {
            Some(_) => {
                let _ = std::fs::remove_dir_all(Path::new(&pipe).join(name));
                Some((None, None))
            }
            None => err(format!("server {name} does not exist")),
        },
        ["server", "list"] => Some((
            Some(d.servers.keys().cloned().collect::<Vec<_>>().join("\n")),
            None,
        )),
        ["namespace", verb, server, rest @ ..] => {
            let Some(srv) = d.servers.get_mut(*server) else {
                return err(format!("server {server} does not exist"));
            };
            namespace(srv, &pipe, verb, server, rest)
        }
        _ => None,
    }
}

fn namespace(
    srv: &mut MpsServer,
    pipe: &str,
    verb: &str,
    server: &str,
    rest: &[&str],
) -> Option<Answer> {
    let missing = |ns: &str| err(format!("namespace {ns} does not exist on server {server}"));
    match (verb, rest) {
        ("list", []) => Some((
            Some(
                srv.namespaces
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            None,
        )),
        ("create", [ns]) => {
            if *ns == "default" || !valid_name(ns) {
                return err(format!("invalid namespace name {ns}"));
            }
            if srv.namespaces.contains_key(*ns) {
                return err(format!("namespace {ns} already exists on server {server}"));
            }
            srv.namespaces
                .insert((*ns).to_owned(), MpsNamespace::default());
            make_socket(&socket(pipe, &[server, ns]));
            Some((None, None))
        }
        ("delete", [ns]) => match srv.namespaces.remove(*ns) {
            Some(_) => {
                let _ = std::fs::remove_dir_all(Path::new(pipe).join(server).join(ns));
                Some((None, None))
            }
            None => missing(ns),
        },
        ("set", [ns, key, value]) => {
            let Some(n) = srv.namespaces.get_mut(*ns) else {
                return missing(ns);
            };
            match *key {
                "active_thread_percentage" => match value.parse::<f64>() {
                    Ok(v) if (0.0..=100.0).contains(&v) => {
                        n.active_thread_percentage = Some(v);
                        Some((None, None))
                    }
                    _ => err(format!(
                        "active_thread_percentage {value} is out of range (0-100)"
                    )),
                },
                "pinned_memory_limit" if limit_ok(value) => {
                    n.pinned_memory_limit = Some((*value).to_owned());
                    Some((None, None))
                }
                "pinned_memory_limit" => err(format!("invalid pinned_memory_limit {value}")),
                other => err(format!("unknown namespace setting {other}")),
            }
        }
        ("get", [ns, key]) => {
            let Some(n) = srv.namespaces.get(*ns) else {
                return missing(ns);
            };
            match *key {
                "active_thread_percentage" => Some((
                    Some(format!(
                        "{:.1}",
                        n.active_thread_percentage.unwrap_or(100.0)
                    )),
                    None,
                )),
                "pinned_memory_limit" => Some((
                    Some(n.pinned_memory_limit.clone().unwrap_or_else(|| "0".into())),
                    None,
                )),
                other => err(format!("unknown namespace setting {other}")),
            }
        }
        _ => err(format!(
            "invalid namespace command {verb} {}",
            rest.join(" ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon(pipe: &Path) -> MpsDaemon {
        MpsDaemon {
            pipe_dir: pipe.display().to_string(),
            log_dir: String::new(),
            visible_devices: Some("GPU-a".into()),
            pid: 1,
            running: true,
            default_active_thread_percentage: None,
            default_device_pinned_mem_limits: Default::default(),
            commands: vec![],
            protocol: 3,
            multiuser: true,
            servers: Default::default(),
        }
    }

    fn run(d: &mut MpsDaemon, line: &str) -> Answer {
        let words: Vec<&str> = line.split_whitespace().collect();
        apply(d, &words).expect("a v3 command")
    }

    #[test]
    fn protocol_three_needs_a_615_driver() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            daemon_options(&args(&["-p", "3", "-m"]), "615.71.09"),
            Ok((3, true))
        );
        assert_eq!(daemon_options(&args(&[]), "615.71.09"), Ok((2, false)));
        assert!(
            daemon_options(&args(&["-p", "3"]), "570.124.06")
                .unwrap_err()
                .contains("Invalid option: -p")
        );
        assert!(daemon_options(&args(&["-p", "4"]), "620.1").is_err());
    }

    #[test]
    fn namespaces_hold_their_limits_and_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(dir.path());
        assert_eq!(
            run(&mut d, "server create shares allowed_devices GPU-a"),
            (None, None)
        );
        assert!(dir.path().join("shares/default/control").exists());
        assert!(run(&mut d, "namespace create shares c1").1.is_none());
        assert!(dir.path().join("shares/c1/control").exists());
        assert!(
            run(&mut d, "namespace create shares c1")
                .1
                .unwrap()
                .contains("already exists")
        );
        assert!(run(&mut d, "namespace create shares default").1.is_some());
        assert!(
            run(
                &mut d,
                "namespace set shares c1 active_thread_percentage 40"
            )
            .1
            .is_none()
        );
        assert!(
            run(
                &mut d,
                "namespace set shares c1 active_thread_percentage 140"
            )
            .1
            .unwrap()
            .contains("out of range")
        );
        assert!(
            run(&mut d, "namespace set shares c1 pinned_memory_limit 18432M")
                .1
                .is_none()
        );
        assert_eq!(
            run(&mut d, "namespace get shares c1 active_thread_percentage").0,
            Some("40.0".into())
        );
        assert!(
            run(&mut d, "namespace get shares c9 active_thread_percentage")
                .1
                .unwrap()
                .contains("namespace c9 does not exist")
        );
        assert!(
            run(&mut d, "namespace list nope")
                .1
                .unwrap()
                .contains("server nope")
        );
        let ns = &d.servers["shares"].namespaces["c1"];
        assert_eq!(ns.active_thread_percentage, Some(40.0));
        assert_eq!(ns.pinned_memory_limit.as_deref(), Some("18432M"));
        assert!(run(&mut d, "namespace delete shares c1").1.is_none());
        assert!(!dir.path().join("shares/c1").exists());
        assert_eq!(run(&mut d, "namespace list shares").0, Some(String::new()));
        assert_eq!(apply(&mut d, &["get_server_list"]), None);
    }
}
