//! XID code -> device health verdict (pure).
//!
//! Owns which NVIDIA XID critical errors make a GPU (and every MIG device on it)
//! unhealthy, and the message the kubelet shows for them. It must not do I/O. Codes and
//! meanings follow NVIDIA's XID catalogue (GPU deployment and management
//! documentation, "XID Errors"); application-level XIDs (a faulting or killed CUDA
//! program) leave the device healthy, as NVIDIA's device plugin does. Codes not listed
//! here are logged by the watcher but do not change health: a false "unhealthy" takes a
//! working GPU away from every workload on the node.

/// Longest message the kubelet accepts in `DeviceHealth.message` (KEP-4680, 1.36+).
pub const MAX_MESSAGE_LEN: usize = 1024;

/// XIDs caused by an application (illegal address, MMU fault, reset channel, preemptive
/// cleanup, ...): the GPU itself is fine.
pub const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// What one XID means for the health of the GPU that raised it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XidVerdict {
    /// Application-level error: health unchanged.
    Application,
    /// Not in our catalogue: health unchanged, worth a log line.
    Unlisted,
    /// The GPU and its MIG devices are unhealthy; the message names the XID and what to do
    /// (at most [`MAX_MESSAGE_LEN`] characters).
    Unhealthy(String),
}

/// Classifies XID `xid`. Pure; the same code always gives the same verdict.
pub fn classify(xid: u64) -> XidVerdict {
    if APPLICATION_XIDS.contains(&xid) {
        return XidVerdict::Application;
    }
    let (what, action) = match xid {
        48 => (
            "double-bit ECC error",
            "drain the node and reset the GPU; replace it if the error repeats",
        ),
        61 | 62 => (
            "internal micro-controller error",
            "drain the node and reset the GPU",
        ),
        63 => (
            "ECC page retirement or row remapping event",
            "drain the node and reset the GPU so the remapping takes effect",
        ),
        64 => (
            "ECC page retirement or row remapping failure",
            "drain the node and have the GPU inspected; it likely needs replacing",
        ),
        74 => (
            "NVLink error",
            "drain the node, reset the GPUs and check the NVLink/NVSwitch fabric",
        ),
        79 => (
            "GPU has fallen off the bus",
            "drain the node and reboot it; check PCIe seating, power and cooling",
        ),
        92 => (
            "high single-bit ECC error rate",
            "drain the node and reset the GPU; replace it if the rate stays high",
        ),
        94 => (
            "contained ECC error",
            "the affected application was stopped; drain the node and reset the GPU",
        ),
        95 => (
            "uncontained ECC error",
            "all applications on the GPU are affected; drain the node and reset the GPU",
        ),
        119 => (
            "GSP RPC timeout",
            "drain the node and reset the GPU or reboot the node",
        ),
        120 => (
            "GSP firmware error",
            "drain the node and reset the GPU or reboot the node",
        ),
        140 => ("unrecovered ECC error", "drain the node and reset the GPU"),
        _ => return XidVerdict::Unlisted,
    };
    XidVerdict::Unhealthy(truncate(format!("XID {xid} ({what}): {action}")))
}

/// `message` cut to at most [`MAX_MESSAGE_LEN`] characters (on a character boundary).
pub fn truncate(message: String) -> String {
    if message.chars().count() <= MAX_MESSAGE_LEN {
        return message;
    }
    message.chars().take(MAX_MESSAGE_LEN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_xids_make_the_gpu_unhealthy() {
        for xid in [48, 63, 64, 74, 79, 92, 94, 95, 119, 120] {
            match classify(xid) {
                XidVerdict::Unhealthy(message) => {
                    assert!(message.starts_with(&format!("XID {xid} (")), "{message}");
                    assert!(message.contains("drain the node"), "{message}");
                    assert!(message.chars().count() <= MAX_MESSAGE_LEN);
                }
                other => panic!("XID {xid}: {other:?}"),
            }
        }
    }

    #[test]
    fn application_xids_leave_health_alone() {
        for xid in [13, 31, 43, 45] {
            assert_eq!(classify(xid), XidVerdict::Application, "XID {xid}");
        }
        assert_eq!(classify(1), XidVerdict::Unlisted);
        assert_eq!(classify(u64::MAX), XidVerdict::Unlisted);
    }

    #[test]
    fn fallen_off_the_bus_message() {
        assert_eq!(
            classify(79),
            XidVerdict::Unhealthy(
                "XID 79 (GPU has fallen off the bus): drain the node and reboot it; check PCIe seating, power and cooling".into()
            )
        );
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        let long = "é".repeat(MAX_MESSAGE_LEN + 10);
        let cut = truncate(long);
        assert_eq!(cut.chars().count(), MAX_MESSAGE_LEN);
        assert_eq!(truncate("short".into()), "short");
    }
}
