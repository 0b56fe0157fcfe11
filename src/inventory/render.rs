//! Printouts for the `inventory` subcommand: a text table, the placements of dynamic MIG
//! GPUs ([`super::placements`]), the inventory as YAML, and ResourceSlices as
//! multi-document YAML (exactly what the plugin would apply).
//!
//! Pure string building; the caller writes to stdout. It must not discover or publish.

use std::fmt::Write as _;

use k8s_openapi::api::resource::v1::ResourceSlice;

use super::model::Inventory;
use super::placements::{Creator, KnownInstance, PlacementUse, placement_rows};

/// Errors of YAML rendering.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// serde_yaml refused a value.
    #[error("serialising {what} as YAML")]
    Yaml {
        /// What was being serialised (`inventory`, `ResourceSlice <name>`).
        what: String,
        /// serde_yaml's error.
        #[source]
        source: serde_yaml::Error,
    },
}

/// Human-readable table of the inventory: one line per GPU, one indented line per MIG
/// device, then the MIG profiles of MIG-enabled GPUs.
pub fn render_inventory(inv: &Inventory) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Driver {}  CUDA {}  GPUs {}",
        inv.driver_version,
        inv.cuda_driver_version,
        inv.gpus.len()
    );
    let _ = writeln!(
        out,
        "{:<24} {:<5} {:<42} {:<26} {:<12} {:>10}  {:<8} UUID",
        "DEVICE", "INDEX", "PRODUCT", "ARCH / CC", "PCI", "MEMORY", "MIG"
    );
    for gpu in &inv.gpus {
        let mig = match (gpu.mig.capable, gpu.mig.enabled, gpu.mig.pending) {
            (false, _, _) => "n/a".to_string(),
            (true, cur, pend) if cur == pend => on_off(cur).to_string(),
            (true, cur, pend) => format!("{}->{}", on_off(cur), on_off(pend)),
        };
        let _ = writeln!(
            out,
            "{:<24} {:<5} {:<42} {:<26} {:<12} {:>10}  {:<8} {}",
            gpu.device_name(),
            gpu.index,
            gpu.name,
            format!("{} {}", gpu.architecture, gpu.cuda_compute_capability),
            short_bus_id(&gpu.pci_bus_id),
            mib(gpu.memory_bytes),
            mig,
            gpu.uuid
        );
        for m in &gpu.mig_devices {
            let _ = writeln!(
                out,
                "  {:<34} {:<10} gi {:<3} ci {:<3} slices {}+{:<3} {:>10}  SM {:<4} {}",
                m.device_name(),
                m.profile,
                m.gi_id,
                m.ci_id,
                m.placement.start,
                m.placement.size,
                mib(m.memory_bytes),
                m.multiprocessors,
                m.uuid
            );
        }
    }
    let mut printed_profiles = Vec::new();
    for gpu in inv.gpus.iter().filter(|g| !g.mig_profiles.is_empty()) {
        if printed_profiles.contains(&gpu.name) {
            continue;
        }
        printed_profiles.push(gpu.name.clone());
        let _ = writeln!(out, "\nMIG profiles of {}:", gpu.name);
        let _ = writeln!(
            out,
            "  {:<12} {:>3} {:>5} {:>10} {:>4} {:>3} {:>4} {:>4} {:>4} {:>4}  PLACEMENTS",
            "PROFILE", "ID", "INST", "MEMORY", "SM", "CE", "DEC", "ENC", "JPEG", "OFA"
        );
        for p in &gpu.mig_profiles {
            let placements: Vec<String> = p
                .placements
                .iter()
                .map(|pl| format!("{}+{}", pl.start, pl.size))
                .collect();
            let _ = writeln!(
                out,
                "  {:<12} {:>3} {:>5} {:>10} {:>4} {:>3} {:>4} {:>4} {:>4} {:>4}  {}",
                p.name,
                p.gi_profile_id,
                p.instance_count,
                mib(p.memory_bytes),
                p.multiprocessors,
                p.copy_engines,
                p.decoders,
                p.encoders,
                p.jpeg_engines,
                p.ofa_engines,
                placements.join(" ")
            );
        }
    }
    out
}

/// Per dynamic MIG GPU (those `--dynamic-mig` manages), every MIG placement with the
/// device name the plugin publishes for it, its memory slices and memory, and what holds
/// it: `free`, `in use` by an existing GPU instance (the driver's, with its claim from
/// `known`, or `foreign`), or covered by one (`overlaps`; `not offered` when that one is
/// foreign). Empty when no GPU is dynamic.
pub fn render_placements(inv: &Inventory, known: &[KnownInstance]) -> String {
    let mut out = String::new();
    for gpu in &inv.gpus {
        let Some(rows) = placement_rows(gpu, known) else {
            continue;
        };
        let mut instances: Vec<(u32, bool)> = rows
            .iter()
            .filter_map(|r| match &r.usage {
                PlacementUse::InUse { gi_id, creator } => {
                    Some((*gi_id, *creator == Creator::Foreign))
                }
                _ => None,
            })
            .collect();
        instances.sort_unstable();
        instances.dedup();
        let foreign = instances.iter().filter(|(_, f)| *f).count();
        let _ = writeln!(
            out,
            "\nDynamic MIG placements of {} ({}): {} GPU instances, {} by this driver, {} foreign",
            gpu.device_name(),
            gpu.uuid,
            instances.len(),
            instances.len() - foreign,
            foreign
        );
        let _ = writeln!(
            out,
            "  {:<26} {:<12} {:>5} {:>4} {:>10}  STATE",
            "DEVICE", "PROFILE", "START", "SIZE", "MEMORY"
        );
        for r in rows {
            let _ = writeln!(
                out,
                "  {:<26} {:<12} {:>5} {:>4} {:>10}  {}",
                r.device,
                r.profile,
                r.placement.start,
                r.placement.size,
                mib(r.memory_bytes),
                usage_text(&r.usage)
            );
        }
    }
    out
}

fn usage_text(usage: &PlacementUse) -> String {
    match usage {
        PlacementUse::Free => "free".to_owned(),
        PlacementUse::InUse {
            gi_id,
            creator: Creator::Driver { claim },
        } if !claim.is_empty() => format!("in use: GPU instance {gi_id}, driver, claim {claim}"),
        PlacementUse::InUse {
            gi_id,
            creator: Creator::Driver { .. },
        } => format!("in use: GPU instance {gi_id}, driver"),
        PlacementUse::InUse {
            gi_id,
            creator: Creator::Foreign,
        } => format!("in use: GPU instance {gi_id}, foreign (not created by this driver)"),
        PlacementUse::Overlaps {
            gi_id,
            creator: Creator::Driver { .. },
        } => format!("overlaps GPU instance {gi_id} (driver)"),
        PlacementUse::Overlaps {
            gi_id,
            creator: Creator::Foreign,
        } => format!("not offered: overlaps foreign GPU instance {gi_id}"),
    }
}

/// The inventory as one YAML document (field names as in [`Inventory`]).
pub fn render_inventory_yaml(inv: &Inventory) -> Result<String, RenderError> {
    serde_yaml::to_string(inv).map_err(|source| RenderError::Yaml {
        what: "inventory".into(),
        source,
    })
}

/// ResourceSlices as YAML documents separated by `---`, in the given order.
pub fn render_slices(slices: &[ResourceSlice]) -> Result<String, RenderError> {
    let mut out = String::new();
    for s in slices {
        let doc = serde_yaml::to_string(s).map_err(|source| RenderError::Yaml {
            what: format!("ResourceSlice {}", s.metadata.name.as_deref().unwrap_or("")),
            source,
        })?;
        out.push_str("---\n");
        out.push_str(&doc);
    }
    Ok(out)
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

fn mib(bytes: u64) -> String {
    format!("{}MiB", bytes >> 20)
}

/// `00000000:1B:00.0` -> `1B:00.0` (the domain is almost always 0).
fn short_bus_id(id: &str) -> &str {
    match id.split_once(':') {
        Some((domain, rest)) if domain.trim_start_matches('0').is_empty() => rest,
        _ => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::fixtures::dgx_h100;

    #[test]
    fn table_golden() {
        let text = render_inventory(&dgx_h100());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/inventory/testdata/dgx-h100-inventory.txt");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &text).expect("write golden");
        }
        let expected =
            std::fs::read_to_string(&path).expect("golden file (UPDATE_GOLDEN=1 creates it)");
        pretty_assertions::assert_eq!(expected, text);
    }

    #[test]
    fn placements_are_listed_for_dynamic_gpus_only() {
        let mut inv = dgx_h100();
        assert_eq!(render_placements(&inv, &[]), "");
        inv.gpus[1].dynamic_mig = Some(crate::inventory::DynamicMig {
            foreign: Vec::new(),
        });
        let text = render_placements(&inv, &[]);
        assert!(text.contains("Dynamic MIG placements of gpu-1 ("), "{text}");
        assert!(!text.contains("gpu-2"), "{text}");
        let line = text
            .lines()
            .find(|l| l.contains("gpu-1-mig-3g40gb-9-0 "))
            .expect("3g.40gb at 0");
        assert!(line.contains("in use: GPU instance"), "{line}");
    }

    #[test]
    fn yaml_round_trips() {
        let inv = dgx_h100();
        let yaml = render_inventory_yaml(&inv).expect("yaml");
        let back: Inventory = serde_yaml::from_str(&yaml).expect("parse");
        assert_eq!(back, inv);
    }

    #[test]
    fn slices_are_separate_documents() {
        let slices = crate::slices::desired::desired_slices(
            &dgx_h100(),
            "gpu.gpu-dra.dev",
            "n",
            "u",
            1,
            &Default::default(),
        );
        let yaml = render_slices(&slices).expect("yaml");
        assert!(
            yaml.starts_with("---\napiVersion: resource.k8s.io/v1\nkind: ResourceSlice\n"),
            "{yaml}"
        );
    }
}
