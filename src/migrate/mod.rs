//! `gpu-dra migrate`: turns the legacy NVIDIA device plugin's config (all named configs
//! of its ConfigMap) and the Nodes' `nvidia.com/device-plugin.config` labels into DRA
//! objects plus a report.
//!
//! Owns the whole-cluster view: which profile each node uses, one extended-resource
//! DeviceClass per resource name (KEP-5004, GA in 1.37), and the report (what maps
//! exactly, what changes meaning, the drain boundary). Pure: it must not do I/O; the
//! caller (`run::migrate`) reads the ConfigMap and Nodes and prints the result.

pub mod legacy;
pub mod objects;
pub mod profile;

use std::collections::BTreeMap;

use serde_json::Value;

use self::profile::{Policy, Profile};

/// What `migrate` reads.
#[derive(Debug, Clone)]
pub struct MigrateInput {
    /// Named configs: ConfigMap key -> config text.
    pub configs: BTreeMap<String, String>,
    /// Nodes: name -> value of `nvidia.com/device-plugin.config` (None: unlabelled).
    pub nodes: BTreeMap<String, Option<String>>,
    /// Config used by unlabelled nodes (the device plugin's / GPU operator's default).
    pub default_config: String,
    /// DRA driver name in selectors and opaque configs.
    pub driver_name: String,
    /// Namespace of the ResourceClaimTemplates.
    pub namespace: String,
}

/// What `migrate` produces.
#[derive(Debug, Clone, Default)]
pub struct Migration {
    /// Objects to apply, in order (DeviceClasses, then templates).
    pub objects: Vec<Value>,
    /// Report lines: exact mappings.
    pub exact: Vec<String>,
    /// Report lines: changes of meaning.
    pub changed: Vec<String>,
    /// Report lines: nodes per profile and the drain steps.
    pub drain: Vec<String>,
    /// One line per field that could not be mapped (`path: reason`); non-empty means failure.
    pub errors: Vec<String>,
}

impl Migration {
    /// The report as text (sections `maps exactly`, `changes meaning`, `drain boundary`,
    /// and `errors` when there are some).
    pub fn report(&self) -> String {
        let mut out = String::new();
        for (title, lines) in [
            ("maps exactly", &self.exact),
            ("changes meaning", &self.changed),
            ("drain boundary", &self.drain),
            ("errors", &self.errors),
        ] {
            if title == "errors" && lines.is_empty() {
                continue;
            }
            out.push_str(&format!("# {title}\n"));
            for line in lines {
                out.push_str(&format!("- {line}\n"));
            }
        }
        out
    }
}

fn policy_text(policy: &Policy) -> String {
    match policy {
        Policy::None => "no sharing config".into(),
        Policy::TimeSlicing => "GpuConfig TimeSlicing (interval Default)".into(),
        Policy::Mps {
            active_thread_percentage,
        } => format!("GpuConfig MPS (defaultActiveThreadPercentage {active_thread_percentage})"),
    }
}

/// Maps every named config and node. Objects are produced for the configs that map;
/// `errors` lists the rest (the caller decides whether partial output is wanted).
pub fn migrate(input: &MigrateInput) -> Migration {
    let mut m = Migration::default();
    let mut profiles: Vec<Profile> = Vec::new();
    for (name, text) in &input.configs {
        let config = match legacy::parse_config(name, text) {
            Ok(c) => c,
            Err(e) => {
                m.errors.push(e.to_string());
                continue;
            }
        };
        match profile::map_profile(name, &config) {
            Ok(p) => profiles.push(p),
            Err(errors) => m.errors.extend(errors.iter().map(|e| e.to_string())),
        }
    }
    if input.configs.is_empty() {
        m.errors.push("<input>: no named config found".into());
    }
    let mut nodes_of: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (node, label) in &input.nodes {
        let profile = label.as_deref().unwrap_or(&input.default_config);
        if !input.configs.contains_key(profile) {
            m.errors.push(format!(
                "node {node}: label {}={profile} names no config in the input; label it with one of: {}",
                legacy::NODE_CONFIG_LABEL,
                input.configs.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
            continue;
        }
        nodes_of.entry(profile).or_default().push(node);
    }
    let driver = &input.driver_name;
    // One class per extended resource name: the scheduler serves a name through one class.
    let mut by_ext: BTreeMap<&str, Vec<&Profile>> = BTreeMap::new();
    for p in &profiles {
        by_ext.entry(&p.extended_resource_name).or_default().push(p);
    }
    for (ext, users) in &by_ext {
        let chosen = users
            .iter()
            .find(|p| p.name == input.default_config)
            .unwrap_or(&users[0]);
        let class = objects::object_name(ext);
        m.objects.push(objects::device_class(
            &class,
            driver,
            &chosen.policy,
            Some(ext),
        ));
        m.exact.push(format!(
            "pods asking {ext} are served by DeviceClass {class} (extendedResourceName {ext}) with {} from config {:?}",
            policy_text(&chosen.policy),
            chosen.name
        ));
        for other in users.iter().filter(|p| p.policy != chosen.policy) {
            m.changed.push(format!(
                "config {:?} ({}) shares {ext} with config {:?}: its nodes' GPUs get the class policy of {:?} for pods asking {ext}; new workloads keep the profile's own policy through DeviceClass {}",
                other.name,
                policy_text(&other.policy),
                chosen.name,
                chosen.name,
                objects::object_name(&other.name)
            ));
        }
    }
    for p in &profiles {
        let class = objects::object_name(&p.name);
        m.objects
            .push(objects::device_class(&class, driver, &p.policy, None));
        m.exact.push(format!(
            "config {:?}: DeviceClass {class} with {}, ResourceClaimTemplate {}/{class} for new workloads (schedule them with nodeSelector {}={})",
            p.name,
            policy_text(&p.policy),
            input.namespace,
            legacy::NODE_CONFIG_LABEL,
            p.name
        ));
        if p.replicas > 1 {
            m.changed.push(format!(
                "config {:?}: replicas {} made each GPU count {} times; a DRA extended-resource request allocates a whole GPU per pod, so unchanged pods asking {} fit {} per GPU fewer: to put up to {} pods on one GPU, create one ResourceClaim from DeviceClass {class} and list it in all of their pod specs (a time-sliced shared claim)",
                p.name, p.replicas, p.replicas, p.extended_resource_name, p.replicas - 1, p.replicas
            ));
        }
        if let Policy::Mps { .. } = p.policy {
            m.changed.push(format!(
                "config {:?}: MPS replicas became defaultActiveThreadPercentage; the per-client pinned memory limit (memory / replicas) is not set, add defaultPinnedDeviceMemoryLimit to DeviceClass {class} if wanted",
                p.name
            ));
        }
        if p.fail_requests_greater_than_one {
            m.changed.push(format!(
                "config {:?}: failRequestsGreaterThanOne refused containers asking more than one {}; DRA gives such a pod that many whole GPUs instead of refusing it",
                p.name, p.extended_resource_name
            ));
        } else if p.replicas > 1 {
            m.changed.push(format!(
                "config {:?}: a request for several {} could be served by replicas of one GPU; DRA gives distinct GPUs",
                p.name, p.extended_resource_name
            ));
        }
        for d in &p.dropped {
            m.changed
                .push(format!("config {:?}: not carried over: {d}", p.name));
        }
    }
    for p in &profiles {
        m.objects.push(objects::claim_template(p, &input.namespace));
    }
    m.drain.push("the device plugin and the DRA driver keep separate ledgers of who holds a GPU; a node must not run both, so move it when it is drained".into());
    for (profile, nodes) in &nodes_of {
        m.drain
            .push(format!("config {profile:?}: nodes {}", nodes.join(", ")));
    }
    m.drain.push("per node: kubectl drain <node> --ignore-daemonsets; stop the device plugin there (e.g. a nodeSelector or label on its DaemonSet); start gpu-dra kubelet-plugin there; kubectl uncordon <node>".into());
    m
}

#[cfg(test)]
mod tests;
