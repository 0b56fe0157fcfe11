//! Command line of the `gpu-dra` binary (clap derive).
//!
//! Owns flag names, environment variables (`GPU_DRA_*`), defaults and the paths derived
//! from them. Defaults match the kubelet's directories, and the kubelet paths follow
//! its plugin watcher conventions (KUBELET-PROTOCOL.md section 1). It must not do I/O:
//! `crate::run` acts on the parsed arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;

/// Default DRA driver name; `--driver-name gpu.nvidia.com` serves NVIDIA's claims.
pub const DEFAULT_DRIVER_NAME: &str = "gpu.gpu-dra.dev";

/// Kubernetes DRA driver for NVIDIA GPUs.
#[derive(Debug, Parser)]
#[command(name = "gpu-dra", version, about, long_about = None)]
pub struct Cli {
    /// Logging options (valid for every subcommand).
    #[command(flatten)]
    pub log: LogArgs,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands of `gpu-dra`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node plugin (DaemonSet on GPU nodes): publish ResourceSlices and
    /// prepare claims for the kubelet.
    KubeletPlugin(PluginArgs),
    /// Print the GPUs discovered on this machine, or with --slices the ResourceSlices
    /// the plugin would publish, as YAML.
    Inventory(InventoryArgs),
    /// Run the validating admission webhook for opaque device configs.
    Webhook(WebhookArgs),
    /// Show this node's GPUs and MIG devices: sharing policy, the claims and pods holding
    /// them, MPS daemons (checkpoint + NVML + API server; works while the plugin is down).
    Status(StatusArgs),
    /// Clear the unhealthy verdict (and device taint) of a repaired GPU on this node;
    /// run it where the plugin runs, e.g. `kubectl exec <plugin pod> -- gpu-dra clear-unhealthy --gpu gpu-0`.
    ClearUnhealthy(ClearUnhealthyArgs),
    /// Turn the legacy NVIDIA device plugin's config (ConfigMap or file, all named
    /// configs) and the Nodes' nvidia.com/device-plugin.config labels into DRA objects
    /// (YAML on stdout or --output) and a report (stderr).
    Migrate(MigrateArgs),
}

/// Output format of `gpu-dra status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusOutput {
    /// Aligned table.
    Table,
    /// JSON document.
    Json,
}

/// Flags of `gpu-dra status`.
#[derive(Clone, Debug, Args)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'o', long, env = "GPU_DRA_OUTPUT", value_enum, default_value_t = StatusOutput::Table)]
    pub output: StatusOutput,
    /// Node name shown in the report.
    #[arg(long, env = "GPU_DRA_NODE_NAME", default_value = "")]
    pub node_name: String,
    /// DRA driver name (selects the plugin directory holding the checkpoint).
    #[arg(long, env = "GPU_DRA_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME, value_parser = parse_driver_name)]
    pub driver_name: String,
    /// The kubelet's root directory; the checkpoint is `<root>/plugins/<driver>/checkpoint.json`.
    #[arg(long, env = "GPU_DRA_KUBELET_ROOT", default_value = "/var/lib/kubelet")]
    pub kubelet_root: PathBuf,
    /// Path of libnvidia-ml.so to load instead of the system's libnvidia-ml.so.1.
    #[arg(long, env = "GPU_DRA_NVML_LIB_PATH")]
    pub nvml_lib_path: Option<PathBuf>,
    /// Search libnvidia-ml.so.1 below this driver root.
    #[arg(long, env = "GPU_DRA_DRIVER_ROOT", value_parser = parse_absolute)]
    pub driver_root: Option<PathBuf>,
    /// Kubeconfig for the pod lookup; without it the in-cluster config (or $KUBECONFIG /
    /// ~/.kube/config) is used.
    #[arg(long, env = "GPU_DRA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Do not ask the API server (no pods column).
    #[arg(long, env = "GPU_DRA_NO_API")]
    pub no_api: bool,
}

/// Logging flags, shared by all subcommands.
#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Log line format on stderr.
    #[arg(long, env = "GPU_DRA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter in RUST_LOG syntax, e.g. "info" or "info,gpu_dra::plugin=debug".
    #[arg(long, env = "GPU_DRA_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
}

/// Flags of `gpu-dra kubelet-plugin`.
#[derive(Clone, Debug, Args)]
pub struct PluginArgs {
    /// DRA driver name: used in ResourceSlices, socket names and CDI; must match the
    /// DeviceClasses. "gpu.nvidia.com" makes claims written for NVIDIA's driver work.
    #[arg(long, env = "GPU_DRA_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME, value_parser = parse_driver_name)]
    pub driver_name: String,
    /// Name of the Kubernetes Node this plugin runs on (also the pool name); in a
    /// DaemonSet set GPU_DRA_NODE_NAME from the downward API (spec.nodeName).
    #[arg(long, env = "GPU_DRA_NODE_NAME", value_parser = parse_non_empty)]
    pub node_name: String,
    /// Kubelet root directory; sockets go to <root>/plugins_registry and
    /// <root>/plugins/<driver>. Must be the same path inside and outside the container.
    #[arg(long, env = "GPU_DRA_KUBELET_ROOT", default_value = "/var/lib/kubelet", value_parser = parse_absolute)]
    pub kubelet_root: PathBuf,
    /// Directory for the CDI spec files the container runtime reads.
    #[arg(long, env = "GPU_DRA_CDI_ROOT", default_value = "/var/run/cdi", value_parser = parse_absolute)]
    pub cdi_root: PathBuf,
    /// Kubeconfig file; without it the in-cluster config (or $KUBECONFIG / ~/.kube/config) is used.
    #[arg(long, env = "GPU_DRA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Root of the NVIDIA driver installation as seen by the plugin: "/" for a driver
    /// installed on the host, the mount of /run/nvidia/driver with the GPU operator.
    /// libnvidia-ml.so.1, nvidia-smi and nvidia-cuda-mps-control are searched below it
    /// (usr/lib/<multiarch>, usr/lib64, ... and usr/bin, ...) unless given by path.
    #[arg(long, env = "GPU_DRA_DRIVER_ROOT", default_value = "/", value_parser = parse_absolute)]
    pub driver_root: PathBuf,
    /// Path of libnvidia-ml.so to load instead of searching the driver root.
    #[arg(long, env = "GPU_DRA_NVML_LIB_PATH")]
    pub nvml_lib_path: Option<PathBuf>,
    /// nvidia-smi executable (sets the time slice via `compute-policy`) instead of
    /// searching the driver root; looked up in PATH if bare.
    #[arg(long, env = "GPU_DRA_NVIDIA_SMI_PATH")]
    pub nvidia_smi_path: Option<PathBuf>,
    /// MPS control daemon executable instead of searching the driver root; looked up in
    /// PATH if bare.
    #[arg(long, env = "GPU_DRA_MPS_CONTROL_PATH")]
    pub mps_control_path: Option<PathBuf>,
    /// Address of the HTTP server for the kubelet's probes (/healthz, /readyz).
    #[arg(long, env = "GPU_DRA_HTTP_ADDRESS", default_value = "0.0.0.0:8080")]
    pub http_address: std::net::SocketAddr,
    /// How MPS control daemons are detached from the plugin so that they outlive it:
    /// `session` (own session and process group, via `setsid`; a plugin run as a host
    /// process), `systemd-scope` (a transient scope unit of the host's systemd, via
    /// `systemd-run --scope`; a plugin in a container, needs hostPID and the host's
    /// /run/systemd and D-Bus socket), or `direct` (a child of the plugin).
    #[arg(long, env = "GPU_DRA_MPS_LAUNCHER", value_enum, default_value_t = MpsLauncherKind::Session)]
    pub mps_launcher: MpsLauncherKind,
    /// Give each MPS daemon and its claim's containers a private `/dev/shm` (the claim's
    /// `shm` dir; needs CAP_SYS_ADMIN and `unshare`). Without it, daemon and clients
    /// must already share `/dev/shm` (the host's, e.g. with `hostIPC`).
    #[arg(long, env = "GPU_DRA_MPS_PRIVATE_SHM")]
    pub mps_private_shm: bool,
    /// Which GPUs in MIG mode the driver manages dynamically (partitionable devices: every
    /// MIG placement is published and its instance created at prepare): `auto` (those
    /// without instances other than the driver's own), `off`, or a comma-separated list of
    /// GPU minors / UUIDs. The others keep static MIG (their existing instances).
    #[arg(long, env = "GPU_DRA_DYNAMIC_MIG", default_value = "auto", value_parser = crate::prepare::mig_select::parse_mode)]
    pub dynamic_mig: crate::prepare::mig_select::DynamicMigMode,
    /// Host /proc as seen by the plugin: device major numbers (`devices`) and MIG
    /// capability minors (`driver/nvidia/capabilities`) for the CDI device nodes.
    #[arg(long, env = "GPU_DRA_PROC_ROOT", default_value = "/proc", value_parser = parse_absolute)]
    pub proc_root: PathBuf,
    /// UID of this plugin's pod; in a DaemonSet set GPU_DRA_POD_UID from the downward
    /// API (fieldRef metadata.uid). Enables rolling updates (kubelet 1.33+): the sockets
    /// get per-pod names, a new pod registers while the old one still serves, forwards
    /// calls to it and takes over once it has stopped. Without it the socket names are
    /// fixed and a second instance on the node refuses to start.
    #[arg(long, env = "GPU_DRA_POD_UID", value_parser = parse_pod_uid)]
    pub pod_uid: Option<String>,
    /// Effect of the device taint on the devices of a GPU made unhealthy by a critical
    /// XID: NoSchedule (no new claims) or NoExecute (also evict the pods using it).
    #[arg(long, env = "GPU_DRA_UNHEALTHY_TAINT_EFFECT", value_enum, default_value_t = crate::slices::taints::TaintEffect::NoSchedule)]
    pub unhealthy_taint_effect: crate::slices::taints::TaintEffect,
    /// Seconds ResourceSlice publishing must keep failing before a Warning Event
    /// `ResourceSlicePublishFailing` on the Node (one per outage; `...Recovered` follows).
    #[arg(long, env = "GPU_DRA_SLICE_FAILURE_EVENT_AFTER", default_value_t = 60)]
    pub slice_failure_event_after: u64,
    /// Publish this node's full GPUs as consumable shares (KEP-5075, needs the
    /// DRAConsumableCapacity gate, on by default since 1.36): `disabled` (exclusive GPUs),
    /// `memory` (claims ask for `memory` bytes and `compute` percent; an amount left out
    /// means the whole GPU) or a share count N (an amount left out means 1/N of the GPU;
    /// serves `nvidia.com/gpu.shared`). MIG devices stay exclusive.
    #[arg(long, env = "GPU_DRA_CONSUMABLE_SHARES", default_value = "disabled")]
    pub consumable_shares: crate::slices::shares::ConsumableShares,
    /// The host's cgroup v2 root (`/sys/fs/cgroup`) as the plugin sees it: the GPU memory
    /// limit of a share is set on the cgroup of the pod its claim is reserved for, found
    /// here (`kubepods/...` or `kubepods.slice/...`).
    #[arg(long, env = "GPU_DRA_CGROUP_ROOT", default_value = "/sys/fs/cgroup", value_parser = parse_absolute)]
    pub cgroup_root: PathBuf,
    /// Prepare GPU shares whose memory limit this node cannot enforce (driver before
    /// r615, cgroup v1, MIG, a claim shared by several pods) without a limit, saying so in
    /// the claim's device status, instead of failing them.
    #[arg(long, env = "GPU_DRA_ALLOW_SCHEDULING_ONLY_SHARES")]
    pub allow_scheduling_only_shares: bool,
}

/// Values of `--mps-launcher` (see `sharing::launcher`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MpsLauncherKind {
    /// A child of the plugin.
    Direct,
    /// Own session and process group (`setsid`).
    Session,
    /// A transient systemd scope unit of the host (`systemd-run --scope`).
    SystemdScope,
}

impl PluginArgs {
    /// Registration socket: `<kubelet-root>/plugins_registry/<driver>-reg.sock`; with
    /// `--pod-uid`, `<driver>-<pod UID>-reg.sock` (hashed when the path is too long, see
    /// [`crate::plugin::registration_socket_path`]).
    pub fn registration_socket(&self) -> PathBuf {
        crate::plugin::registration_socket_path(
            &self.kubelet_root.join("plugins_registry"),
            &self.driver_name,
            self.pod_uid.as_deref(),
        )
    }

    /// Plugin data directory (checkpoint, MPS dirs): `<kubelet-root>/plugins/<driver>`.
    pub fn plugin_data_dir(&self) -> PathBuf {
        self.kubelet_root.join("plugins").join(&self.driver_name)
    }

    /// DRA service socket: `<kubelet-root>/plugins/<driver>/dra.sock`; with `--pod-uid`,
    /// `dra-<pod UID>.sock` (hashed when too long).
    pub fn dra_socket(&self) -> PathBuf {
        crate::plugin::dra_socket_path(&self.plugin_data_dir(), self.pod_uid.as_deref())
    }

    /// Checkpoint file: `<kubelet-root>/plugins/<driver>/checkpoint.json`.
    pub fn checkpoint_file(&self) -> PathBuf {
        self.plugin_data_dir().join("checkpoint.json")
    }
}

/// Flags of `gpu-dra inventory`.
#[derive(Clone, Debug, Args)]
pub struct InventoryArgs {
    /// Print the ResourceSlices the plugin would publish (YAML) instead of the devices.
    #[arg(long, env = "GPU_DRA_SLICES", requires = "node_name")]
    pub slices: bool,
    /// With --slices: publish full GPUs as consumable shares, as `kubelet-plugin
    /// --consumable-shares` does (`disabled`, `memory` or a share count).
    #[arg(long, env = "GPU_DRA_CONSUMABLE_SHARES", default_value = "disabled")]
    pub consumable_shares: crate::slices::shares::ConsumableShares,
    /// Node name used as pool name and in the slices; required with --slices.
    #[arg(long, env = "GPU_DRA_NODE_NAME", value_parser = parse_non_empty)]
    pub node_name: Option<String>,
    /// DRA driver name written into the slices.
    #[arg(long, env = "GPU_DRA_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME, value_parser = parse_driver_name)]
    pub driver_name: String,
    /// The kubelet's root directory: the plugin's checkpoint there (read only, if any)
    /// says which MIG devices are in use, as the plugin weighs them at start.
    #[arg(long, env = "GPU_DRA_KUBELET_ROOT", default_value = "/var/lib/kubelet")]
    pub kubelet_root: PathBuf,
    /// Which GPUs in MIG mode to show as dynamic MIG, as `kubelet-plugin --dynamic-mig`
    /// chooses them (`auto`, `off`, or GPU minors / UUIDs); their placements are listed
    /// with what holds each, and `--slices` prints their partitionable devices.
    #[arg(long, env = "GPU_DRA_DYNAMIC_MIG", default_value = "auto", value_parser = crate::prepare::mig_select::parse_mode)]
    pub dynamic_mig: crate::prepare::mig_select::DynamicMigMode,
    /// Path of libnvidia-ml.so to load instead of the system's libnvidia-ml.so.1.
    #[arg(long, env = "GPU_DRA_NVML_LIB_PATH")]
    pub nvml_lib_path: Option<PathBuf>,
    /// Search libnvidia-ml.so.1 below this driver root (as `kubelet-plugin` does, so
    /// `gpu-dra inventory` works inside the plugin's pod); without it the dynamic
    /// loader's search path is used.
    #[arg(long, env = "GPU_DRA_DRIVER_ROOT", value_parser = parse_absolute)]
    pub driver_root: Option<PathBuf>,
}

/// Flags of `gpu-dra webhook`.
#[derive(Clone, Debug, Args)]
pub struct WebhookArgs {
    /// DRA driver name whose opaque config is validated; config entries of other
    /// drivers are let through untouched.
    #[arg(long, env = "GPU_DRA_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME, value_parser = parse_driver_name)]
    pub driver_name: String,
    /// Address and port the HTTPS server listens on.
    #[arg(long, env = "GPU_DRA_BIND_ADDRESS", default_value = "0.0.0.0:8443")]
    pub bind_address: std::net::SocketAddr,
    /// PEM certificate chain served to the API server.
    #[arg(long, env = "GPU_DRA_TLS_CERT_FILE")]
    pub tls_cert_file: PathBuf,
    /// PEM private key of the certificate.
    #[arg(long, env = "GPU_DRA_TLS_KEY_FILE")]
    pub tls_key_file: PathBuf,
}

/// Flags of `gpu-dra clear-unhealthy`.
#[derive(Clone, Debug, Args)]
pub struct ClearUnhealthyArgs {
    /// The GPU to clear: its UUID (GPU-...), its device name gpu-<minor>, or all.
    #[arg(long, env = "GPU_DRA_GPU")]
    pub gpu: String,
    /// DRA driver name of the plugin (locates its directory).
    #[arg(long, env = "GPU_DRA_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME, value_parser = parse_driver_name)]
    pub driver_name: String,
    /// Kubelet root directory of the plugin; its directory is <root>/plugins/<driver>.
    #[arg(long, env = "GPU_DRA_KUBELET_ROOT", default_value = "/var/lib/kubelet", value_parser = parse_absolute)]
    pub kubelet_root: PathBuf,
    /// Seconds to wait for the running plugin to act on the request.
    #[arg(long, env = "GPU_DRA_TIMEOUT_SECONDS", default_value_t = 30)]
    pub timeout_seconds: u64,
}

impl ClearUnhealthyArgs {
    /// Plugin data directory: `<kubelet-root>/plugins/<driver>`.
    pub fn plugin_data_dir(&self) -> PathBuf {
        self.kubelet_root.join("plugins").join(&self.driver_name)
    }
}

/// Accepts a DRA driver name: a lowercase DNS subdomain of at most 63 characters.
pub fn parse_driver_name(name: &str) -> Result<String, String> {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.len() > 63 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{name:?} is not a valid driver name: use a lowercase DNS subdomain of at most 63 characters, e.g. {DEFAULT_DRIVER_NAME}"
        ));
    }
    Ok(name.to_owned())
}

fn parse_non_empty(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(value.to_owned())
}

/// Accepts a pod UID: letters, digits and `-`, at most 64 characters (it becomes part of
/// socket file names).
fn parse_pod_uid(value: &str) -> Result<String, String> {
    if value.is_empty()
        || value.len() > 64
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(format!(
            "{value:?} is not a pod UID: set GPU_DRA_POD_UID from the downward API (fieldRef metadata.uid)"
        ));
    }
    Ok(value.to_owned())
}

fn parse_absolute(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err(format!("{value:?} must be an absolute path"));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_an_env_var_and_help() {
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                if arg.get_id() == "help" || arg.get_id() == "version" {
                    continue;
                }
                assert!(
                    arg.get_env().is_some(),
                    "{} --{} has no env var",
                    sub.get_name(),
                    arg.get_id()
                );
                assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
            }
        }
    }

    #[test]
    fn plugin_defaults_and_paths() {
        let cli =
            Cli::try_parse_from(["gpu-dra", "kubelet-plugin", "--node-name", "node-1"]).unwrap();
        let Command::KubeletPlugin(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(args.driver_name, "gpu.gpu-dra.dev");
        assert_eq!(
            args.registration_socket(),
            PathBuf::from("/var/lib/kubelet/plugins_registry/gpu.gpu-dra.dev-reg.sock")
        );
        assert_eq!(
            args.dra_socket(),
            PathBuf::from("/var/lib/kubelet/plugins/gpu.gpu-dra.dev/dra.sock")
        );
        assert_eq!(
            args.checkpoint_file(),
            PathBuf::from("/var/lib/kubelet/plugins/gpu.gpu-dra.dev/checkpoint.json")
        );
        assert_eq!(args.cdi_root, PathBuf::from("/var/run/cdi"));
        assert_eq!(args.driver_root, PathBuf::from("/"));
        assert_eq!(args.nvidia_smi_path, None);
        assert_eq!(args.http_address, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(args.pod_uid, None);
        assert_eq!(cli.log.log_format, LogFormat::Text);
    }

    #[test]
    fn pod_uid_gives_per_instance_socket_names() {
        let uid = "0e5f6b8a-3c1d-4f2e-9a7b-1c2d3e4f5a6b";
        let cli = Cli::try_parse_from([
            "gpu-dra",
            "kubelet-plugin",
            "--node-name",
            "node-1",
            "--pod-uid",
            uid,
        ])
        .unwrap();
        let Command::KubeletPlugin(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(
            args.registration_socket(),
            PathBuf::from(format!(
                "/var/lib/kubelet/plugins_registry/gpu.gpu-dra.dev-{uid}-reg.sock"
            ))
        );
        assert_eq!(
            args.dra_socket(),
            PathBuf::from(format!(
                "/var/lib/kubelet/plugins/gpu.gpu-dra.dev/dra-{uid}.sock"
            ))
        );
        // The checkpoint stays shared: both instances of a rolling update use it.
        assert_eq!(
            args.checkpoint_file(),
            PathBuf::from("/var/lib/kubelet/plugins/gpu.gpu-dra.dev/checkpoint.json")
        );
        for bad in ["../x", "a/b", "a b"] {
            assert!(parse_pod_uid(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_values_are_rejected() {
        for argv in [
            &["gpu-dra", "kubelet-plugin"][..],
            &[
                "gpu-dra",
                "kubelet-plugin",
                "--node-name",
                "n",
                "--driver-name",
                "GPU.x",
            ],
            &[
                "gpu-dra",
                "kubelet-plugin",
                "--node-name",
                "n",
                "--kubelet-root",
                "rel",
            ],
            &["gpu-dra", "inventory", "--slices"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
        assert!(parse_driver_name("gpu.nvidia.com").is_ok());
    }
}

/// Flags of `gpu-dra migrate`.
#[derive(Clone, Debug, Args)]
pub struct MigrateArgs {
    /// A device plugin config file, or a ConfigMap YAML holding named configs.
    #[arg(
        long,
        env = "GPU_DRA_MIGRATE_FROM_FILE",
        conflicts_with = "configmap",
        required_unless_present = "configmap"
    )]
    pub from_file: Option<PathBuf>,
    /// The device plugin's ConfigMap in the cluster, as NAMESPACE/NAME.
    #[arg(long, env = "GPU_DRA_MIGRATE_CONFIGMAP")]
    pub configmap: Option<String>,
    /// Nodes as YAML (`kubectl get nodes -o yaml`); without it the Nodes are listed from
    /// the cluster when --configmap is given, and none are read with --from-file.
    #[arg(long, env = "GPU_DRA_MIGRATE_NODES_FILE")]
    pub nodes_file: Option<PathBuf>,
    /// Kubeconfig file for --configmap.
    #[arg(long, env = "GPU_DRA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Config used by nodes without the label (the device plugin's default config name);
    /// also the name of a bare config file's single config.
    #[arg(
        long,
        default_value = "default",
        env = "GPU_DRA_MIGRATE_DEFAULT_CONFIG"
    )]
    pub default_config: String,
    /// DRA driver name used in the DeviceClass selectors and configs.
    #[arg(long, env = "GPU_DRA_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME, value_parser = parse_driver_name)]
    pub driver_name: String,
    /// Namespace of the ResourceClaimTemplates written.
    #[arg(long, default_value = "default", env = "GPU_DRA_MIGRATE_NAMESPACE")]
    pub namespace: String,
    /// Write the objects of the configs that map even when others do not (still exits non-zero).
    #[arg(long, env = "GPU_DRA_MIGRATE_PARTIAL")]
    pub partial: bool,
    /// Write the objects to this file instead of stdout.
    #[arg(long, short = 'o', env = "GPU_DRA_MIGRATE_OUTPUT")]
    pub output: Option<PathBuf>,
}
