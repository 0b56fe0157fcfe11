//! ResourceSlice publishing: the desired slices (pure) and the reconciler that alone
//! writes slices of this driver and node to the API server.
//!
//! Follows KEP-4381 (structured parameters, resource.k8s.io/v1) for the slice shape and
//! the pool generation rules; names and attributes follow design/COMPAT.md.

pub mod desired;
pub mod partitionable;
pub mod plan;
pub mod reconcile;
#[cfg(test)]
mod reconcile_tests;
pub mod shares;
pub mod start;
pub mod taints;

/// Compares `actual` with the golden file `src/slices/testdata/<name>`; with
/// `UPDATE_GOLDEN` set it writes the file first.
#[cfg(test)]
pub(crate) fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/slices/testdata")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden");
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
            path.display()
        )
    });
    pretty_assertions::assert_eq!(expected, actual);
}
