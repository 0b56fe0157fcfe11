//! `cdi-check SPEC_DIR [DEVICE_ID...]`: every `*.json` / `*.yaml` file in SPEC_DIR must pass
//! the CDI JSON schema of the `container-device-interface` crate (raw file bytes) and load
//! as a spec (its parser and validation); the crate's cache over SPEC_DIR must then resolve
//! every DEVICE_ID and inject it into an empty OCI runtime spec, which is printed as JSON
//! on stdout. Exit status 1 with the file or id named on the first failure.

use std::path::PathBuf;
use std::process::ExitCode;

use container_device_interface as cdi;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: cdi-check SPEC_DIR [DEVICE_ID...]");
        return ExitCode::from(2);
    };
    let ids: Vec<String> = args.collect();
    match check(&dir, ids) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cdi-check: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(dir: &str, ids: Vec<String>) -> Result<String, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{dir}: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| cdi::utils::is_cdi_spec(p))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{dir}: no CDI spec files"));
    }
    for file in &files {
        let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        cdi::schema::validate_builtin(&bytes)
            .map_err(|e| format!("{}: schema: {e:#}", file.display()))?;
        cdi::spec::read_spec(file, 0).map_err(|e| format!("{}: {e:#}", file.display()))?;
        eprintln!("{}: valid", file.display());
    }
    let cache = cdi::cache::new_cache(vec![
        cdi::spec_dirs::with_spec_dirs(&[dir]),
        cdi::cache::with_auto_refresh(false),
    ]);
    let mut cache = cache.lock().map_err(|_| "cache lock poisoned".to_owned())?;
    cache.refresh().map_err(|e| format!("cache refresh: {e}"))?;
    let mut oci = oci_spec::runtime::Spec::default();
    cache
        .inject_devices(Some(&mut oci), ids)
        .map_err(|e| format!("inject: {e}"))?;
    serde_json::to_string_pretty(&oci).map_err(|e| e.to_string())
}
