//! The health verdicts `gpu-dra status` shows: read, never written or moved, from the
//! plugin's `<plugin dir>/health.json` (owned by `health::verdicts`).
//!
//! A file of another boot holds no verdict (the reboot reset the GPUs), as for the plugin;
//! a missing file means every GPU is healthy. An unreadable or undecodable file is an
//! error the report prints; the plugin moves such a file aside, this reader does not.

use std::path::Path;

use serde::Deserialize;

use crate::health::UnhealthyGpus;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerdictFile {
    boot_id: String,
    gpus: UnhealthyGpus,
}

/// The unhealthy GPUs (by UUID) of boot `boot_id` recorded in `path`.
///
/// Errors: the file cannot be read or decoded (the message names the path).
pub fn read_verdicts(path: &Path, boot_id: &str) -> Result<UnhealthyGpus, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(UnhealthyGpus::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let file: VerdictFile =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(if file.boot_id == boot_id {
        file.gpus
    } else {
        UnhealthyGpus::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_of_this_boot_only_and_missing_file_is_healthy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("health.json");
        assert!(read_verdicts(&path, "b1").unwrap().is_empty());
        // Written by the plugin's own store.
        let gpus = UnhealthyGpus::from([(
            "GPU-1".to_owned(),
            crate::health::UnhealthyGpu {
                xid: 79,
                since: 5,
                message: "fell off the bus".into(),
                gone: false,
            },
        )]);
        crate::health::VerdictStore::new(dir.path(), "b1")
            .save(&gpus)
            .unwrap();
        assert_eq!(
            path,
            crate::health::VerdictStore::new(dir.path(), "b1").path()
        );
        let gpus = read_verdicts(&path, "b1").unwrap();
        assert_eq!(gpus["GPU-1"].xid, 79);
        assert!(
            read_verdicts(&path, "b2").unwrap().is_empty(),
            "previous boot"
        );
        std::fs::write(&path, "{").unwrap();
        let err = read_verdicts(&path, "b1").unwrap_err();
        assert!(err.contains("health.json"), "{err}");
        assert!(path.exists(), "left where it is");
    }
}
