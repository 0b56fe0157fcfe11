//! Golden tests on the seeds' own ConfigMaps and the bad-input cases.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::legacy::named_configs;
use super::{MigrateInput, Migration, migrate};
use crate::config::validate::validate_opaque;

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/migrate/testdata")
        .join(name)
}

fn run(fixture: &str, nodes: &[(&str, Option<&str>)], default_config: &str) -> Migration {
    let text = std::fs::read_to_string(testdata(fixture)).expect("fixture");
    let configs = named_configs(&text, "default").expect("configs");
    migrate(&MigrateInput {
        configs,
        nodes: nodes
            .iter()
            .map(|(n, l)| (n.to_string(), l.map(str::to_string)))
            .collect::<BTreeMap<_, _>>(),
        default_config: default_config.into(),
        driver_name: "gpu.gpu-dra.dev".into(),
        namespace: "default".into(),
    })
}

/// Compares with testdata/<stem>.golden; GPU_DRA_UPDATE_GOLDEN=1 rewrites it.
fn golden(stem: &str, m: &Migration) {
    let actual = format!(
        "{}# --- report ---\n{}",
        super::objects::render(&m.objects).expect("render"),
        m.report()
    );
    let path = testdata(&format!("{stem}.golden"));
    if std::env::var_os("GPU_DRA_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).expect("write golden");
    }
    let expected = std::fs::read_to_string(&path).expect("golden file");
    assert_eq!(
        actual,
        expected,
        "{stem}: output differs from {}",
        path.display()
    );
}

/// Every class config we write must pass our own opaque-config validation.
fn configs_valid(m: &Migration) {
    for object in &m.objects {
        for entry in object["spec"]["config"].as_array().into_iter().flatten() {
            let params = &entry["opaque"]["parameters"];
            assert!(validate_opaque(params).is_ok(), "invalid config {params}");
        }
    }
}

fn ext_classes(m: &Migration) -> Vec<(String, String)> {
    m.objects
        .iter()
        .filter_map(|o| {
            let ext = o["spec"]["extendedResourceName"].as_str()?;
            Some((o["metadata"]["name"].as_str()?.to_string(), ext.to_string()))
        })
        .collect()
}

#[test]
fn seed000_one_time_sliced_class_for_nvidia_gpu() {
    let m = run(
        "seed000-configmap.yaml",
        &[("gpu-node-1", Some("any"))],
        "any",
    );
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    assert_eq!(
        ext_classes(&m),
        vec![("legacy-nvidia.com-gpu".into(), "nvidia.com/gpu".into())]
    );
    assert_eq!(
        m.objects[0]["spec"]["config"][0]["opaque"]["parameters"]["sharing"]["strategy"],
        "TimeSlicing"
    );
    configs_valid(&m);
    golden("seed000", &m);
}

#[test]
fn seed002_profiles_per_node_label() {
    let nodes = [
        ("dev-gpu-node", Some("dev")),
        ("prod-gpu-node", None),
        ("train-gpu-node", Some("no-sharing")),
    ];
    let m = run("seed002-configmap.yaml", &nodes, "default");
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    assert_eq!(ext_classes(&m).len(), 1);
    let names: Vec<_> = m
        .objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    for want in [
        "DeviceClass/legacy-default",
        "DeviceClass/legacy-dev",
        "DeviceClass/legacy-no-sharing",
        "ResourceClaimTemplate/legacy-no-sharing",
    ] {
        assert!(
            names.contains(&want.to_string()),
            "{want} missing from {names:?}"
        );
    }
    let no_sharing = m
        .objects
        .iter()
        .find(|o| o["metadata"]["name"] == "legacy-no-sharing")
        .expect("class");
    assert!(no_sharing["spec"].get("config").is_none());
    assert!(
        m.changed
            .iter()
            .any(|l| l.contains("failRequestsGreaterThanOne"))
    );
    configs_valid(&m);
    golden("seed002", &m);
}

#[test]
fn seed003_ten_replicas() {
    let m = run(
        "seed003-configmap.yaml",
        &[("gpu-node", Some("any"))],
        "any",
    );
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    assert!(m.changed.iter().any(|l| l.contains("replicas 10")));
    configs_valid(&m);
    golden("seed003", &m);
}

#[test]
fn bad_input_names_each_field() {
    let m = run("bad-configmap.yaml", &[("n1", Some("missing"))], "fine");
    let joined = m.errors.join("\n");
    assert_eq!(m.errors.len(), 4, "{joined}");
    assert!(
        joined.contains("typo.sharing.timeSlicing.renameByDefualt: "),
        "{joined}"
    );
    assert!(
        joined.contains("future.version: unknown version \"v2\""),
        "{joined}"
    );
    assert!(joined.contains("mig.sharing.timeSlicing.resources[0].name: cannot map resource \"nvidia.com/mig-1g.10gb\""), "{joined}");
    assert!(
        joined.contains("node n1: label nvidia.com/device-plugin.config=missing"),
        "{joined}"
    );
    // The config that maps still yields its objects (for --partial).
    assert_eq!(
        ext_classes(&m),
        vec![(
            "legacy-nvidia.com-gpu.shared".into(),
            "nvidia.com/gpu.shared".into()
        )]
    );
}

#[test]
fn bare_config_file_and_mps() {
    let text = "version: v1\nsharing:\n  mps:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n      devices: all\n";
    let configs = named_configs(text, "default").expect("configs");
    let m = migrate(&MigrateInput {
        configs,
        nodes: BTreeMap::new(),
        default_config: "default".into(),
        driver_name: "gpu.gpu-dra.dev".into(),
        namespace: "ml".into(),
    });
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let mps = &m.objects[0]["spec"]["config"][0]["opaque"]["parameters"]["sharing"];
    assert_eq!(mps["strategy"], "MPS");
    assert_eq!(mps["mpsConfig"]["defaultActiveThreadPercentage"], 25);
    configs_valid(&m);
}

#[test]
fn device_subset_cannot_be_mapped() {
    let text = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n      devices: [0, 1]\n";
    let configs = named_configs(text, "p").expect("configs");
    let m = migrate(&MigrateInput {
        configs,
        nodes: BTreeMap::new(),
        default_config: "p".into(),
        driver_name: "gpu.gpu-dra.dev".into(),
        namespace: "default".into(),
    });
    assert_eq!(m.errors.len(), 1);
    assert!(
        m.errors[0].starts_with("p.sharing.timeSlicing.resources[0].devices:"),
        "{:?}",
        m.errors
    );
}
