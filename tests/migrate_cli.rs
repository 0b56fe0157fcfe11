//! `gpu-dra migrate` as a command: objects on stdout, report on stderr, exit status.

use std::process::Command;

fn migrate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpu-dra"))
        .arg("migrate")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run gpu-dra migrate")
}

#[test]
fn seed_configmap_gives_objects_and_success() {
    let out = migrate(&[
        "--from-file",
        "src/migrate/testdata/seed000-configmap.yaml",
        "--default-config",
        "any",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml document"))
        .collect();
    assert_eq!(docs.len(), 3, "extended class, profile class, template");
    assert_eq!(
        docs[0]["spec"]["extendedResourceName"].as_str(),
        Some("nvidia.com/gpu")
    );
}

#[test]
fn bad_config_fails_without_output_unless_partial() {
    let bad = "src/migrate/testdata/bad-configmap.yaml";
    let out = migrate(&["--from-file", bad, "--default-config", "fine"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no partial output by default");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for field in [
        "typo.sharing.timeSlicing.renameByDefualt",
        "future.version",
        "mig.sharing.timeSlicing.resources[0].name",
    ] {
        assert!(stderr.contains(field), "{field} not named in: {stderr}");
    }
    let partial = migrate(&["--from-file", bad, "--default-config", "fine", "--partial"]);
    assert!(!partial.status.success());
    assert!(
        String::from_utf8_lossy(&partial.stdout)
            .contains("extendedResourceName: nvidia.com/gpu.shared")
    );
}
