//! The MPS v3 control commands of the shared per-GPU daemon, and the judging of their
//! answers (pure: no I/O).
//!
//! Owns the command lines for the daemon's named server and for one namespace per claim
//! (create, set and read back `active_thread_percentage` / `pinned_memory_limit`, delete,
//! list) and the container path of a namespace's socket. Must not talk to a daemon (the
//! share-daemon module sends these through [`super::MpsSupervisor::command`]).
//!
//! Follows NVIDIA's MPS documentation, release 615 and later: "MPS v3 Interface" (protocol
//! 3 chosen with `-p 3`, multi-user mode with `-m`, a module-verb command syntax for named
//! servers and namespaces), "MPS v3 Namespaces" (a namespace subdivides a server's pinned
//! memory limit, active thread percentage and client priority for a group of clients; a
//! client is routed to a namespace by the socket it connects to,
//! `<CUDA_MPS_PIPE_DIRECTORY>/<server>/<namespace>/control`) and "MPS v3 Configuration
//! File" (the setting names `allowed_devices`, `pinned_memory_limit` such as `5G`,
//! `active_thread_percentage`). The exact argument order of each verb is kept in this one
//! module so that it can follow the tool should it differ.

use super::limits::parse_mem_limit_mib;

/// Daemon options after `-d`: protocol 3 (MPS v3) and multi-user mode, so clients of pods
/// running as different users share the GPU's one server.
pub const DAEMON_ARGS: [&str; 3] = ["-p", "3", "-m"];
/// The named server every share claim of a GPU joins.
pub const SERVER: &str = "shares";
/// A query every v3 daemon answers (liveness probe at adoption).
pub const PROBE: &str = "server list";

/// `server create <server> allowed_devices <gpu>`.
pub fn server_create(gpu_uuid: &str) -> String {
    format!("server create {SERVER} allowed_devices {gpu_uuid}")
}

/// `namespace list <server>`.
pub fn namespace_list() -> String {
    format!("namespace list {SERVER}")
}

/// `namespace create <server> <namespace>`.
pub fn namespace_create(namespace: &str) -> String {
    format!("namespace create {SERVER} {namespace}")
}

/// `namespace delete <server> <namespace>`.
pub fn namespace_delete(namespace: &str) -> String {
    format!("namespace delete {SERVER} {namespace}")
}

/// One namespace limit: the `set` line, its `get` query and the value the query must show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceLimit {
    /// `namespace set <server> <ns> <key> <value>`.
    pub set: String,
    /// `namespace get <server> <ns> <key>`.
    pub query: String,
    /// The setting's name (`active_thread_percentage`, `pinned_memory_limit`).
    pub key: &'static str,
    /// The value as written (`40`, `18432M`).
    pub value: String,
}

impl NamespaceLimit {
    /// Whether `answer` (the query's stdout) shows the value; `None` when it is not a
    /// value of this setting.
    pub fn holds(&self, answer: &str) -> Option<bool> {
        match self.key {
            "active_thread_percentage" => {
                let read: f64 = answer.trim().parse().ok()?;
                let wanted: f64 = self.value.parse().ok()?;
                Some((read - wanted).abs() < 0.05)
            }
            _ => Some(parse_mem_limit_mib(answer)? == parse_mem_limit_mib(&self.value)?),
        }
    }
}

/// The limits of namespace `namespace`: the active thread percentage (0..=100), then the
/// pinned memory limit in whole MiB when given (pure).
pub fn namespace_limits(
    namespace: &str,
    active_thread_percentage: u8,
    pinned_memory_mib: Option<u64>,
) -> Vec<NamespaceLimit> {
    let limit = |key: &'static str, value: String| NamespaceLimit {
        set: format!("namespace set {SERVER} {namespace} {key} {value}"),
        query: format!("namespace get {SERVER} {namespace} {key}"),
        key,
        value,
    };
    let mut out = vec![limit(
        "active_thread_percentage",
        active_thread_percentage.to_string(),
    )];
    if let Some(mib) = pinned_memory_mib {
        out.push(limit("pinned_memory_limit", format!("{mib}M")));
    }
    out
}

/// The namespaces a `namespace list` answer names (one per line; blank lines skipped).
pub fn parse_namespace_list(answer: &str) -> Vec<String> {
    answer
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "default")
        .map(str::to_owned)
        .collect()
}

/// Whether the daemon's error text says the namespace or server does not exist.
pub fn says_missing(output: &str) -> bool {
    output.contains("does not exist") || output.contains("not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_commands_name_the_server_and_namespace() {
        assert_eq!(
            server_create("GPU-a"),
            "server create shares allowed_devices GPU-a"
        );
        assert_eq!(namespace_create("c1"), "namespace create shares c1");
        let limits = namespace_limits("c1", 40, Some(18432));
        assert_eq!(
            limits[0].set,
            "namespace set shares c1 active_thread_percentage 40"
        );
        assert_eq!(
            limits[1].query,
            "namespace get shares c1 pinned_memory_limit"
        );
        assert_eq!(limits[0].holds("40.0"), Some(true));
        assert_eq!(limits[0].holds("100.0"), Some(false));
        assert_eq!(limits[1].holds("18G"), Some(true));
        assert_eq!(limits[1].holds("0"), Some(false));
        assert_eq!(limits[1].holds("Error"), None);
        assert_eq!(namespace_limits("c", 100, None).len(), 1);
        assert_eq!(parse_namespace_list("a\n\nb\ndefault\n"), ["a", "b"]);
        assert!(says_missing(
            "Error: namespace x does not exist on server shares"
        ));
    }
}
