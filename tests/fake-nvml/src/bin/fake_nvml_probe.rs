//! `fake-nvml-probe <libnvidia-ml.so> [--wait-xid <timeout ms>]`: load an NVML library
//! through nvml-wrapper (the driver's code path) and print, as JSON, what it reports for
//! every device and MIG device. With `--wait-xid` it instead registers every GPU for XID
//! events, prints `ready`, waits for one event and prints it as JSON (`{"uuid","xid"}`).
//! Used by the fake's own tests (run as a child so `FAKE_NVML_TOPOLOGY` is per process)
//! and handy to eyeball a topology.

use std::ffi::OsStr;

use nvml_wrapper::Nvml;
use serde_json::{Value, json};

fn main() {
    let Some(lib) = std::env::args_os().nth(1) else {
        eprintln!("usage: fake-nvml-probe <path to libnvidia-ml.so>");
        std::process::exit(2);
    };
    let args: Vec<String> = std::env::args().skip(2).collect();
    let result = match args.as_slice() {
        [] => probe(&lib),
        [flag, ms] if flag == "--wait-xid" => match ms.parse() {
            Ok(ms) => wait_xid(&lib, ms),
            Err(_) => {
                eprintln!("--wait-xid needs a timeout in milliseconds");
                std::process::exit(2);
            }
        },
        _ => {
            eprintln!("usage: fake-nvml-probe <path to libnvidia-ml.so> [--wait-xid <ms>]");
            std::process::exit(2);
        }
    };
    match result {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(e) => {
            eprintln!("fake-nvml-probe: {e}");
            std::process::exit(1);
        }
    }
}

fn probe(lib: &OsStr) -> Result<Value, nvml_wrapper::error::NvmlError> {
    let nvml = Nvml::builder().lib_path(lib).init()?;
    let mut gpus = Vec::new();
    for i in 0..nvml.device_count()? {
        let d = nvml.device_by_index(i)?;
        let cc = d.cuda_compute_capability()?;
        let mem = d.memory_info()?;
        let pci = d.pci_info()?;
        let (mig_current, mig_pending, mig_devices, wrapper_placements) = match d.mig_mode() {
            Ok(m) => {
                let mut devs = Vec::new();
                for n in 0..d.mig_device_count()? {
                    let Ok(m) = d.mig_device_by_index(n) else {
                        continue;
                    };
                    devs.push(json!({
                        "uuid": m.uuid()?,
                        "name": m.name()?,
                        "memoryTotal": m.memory_info()?.total,
                        "isMig": m.mig_is_mig_device_handle()?,
                        "parentUuid": m.mig_parent_device()?.uuid()?,
                    }));
                }
                // Kept to show nvml-wrapper 0.13's empty result (see README).
                let wrapper_placements = d.possible_placements(9).map(|p| p.len()).ok();
                (Some(m.current), Some(m.pending), devs, wrapper_placements)
            }
            Err(_) => (None, None, Vec::new(), None),
        };
        gpus.push(json!({
            "index": d.index()?,
            "name": d.name()?,
            "uuid": d.uuid()?,
            "minor": d.minor_number()?,
            "brand": format!("{:?}", d.brand()?),
            "architecture": format!("{:?}", d.architecture()?),
            "computeCapability": [cc.major, cc.minor],
            "memoryTotal": mem.total,
            "memoryFree": mem.free,
            "pciBusId": pci.bus_id,
            "pciDeviceId": pci.pci_device_id,
            "computeMode": format!("{:?}", d.compute_mode()?),
            "migCurrent": mig_current,
            "migPending": mig_pending,
            "migDevices": mig_devices,
            "wrapperPossiblePlacements3g": wrapper_placements,
        }));
    }
    Ok(json!({
        "driverVersion": nvml.sys_driver_version()?,
        "cudaDriverVersion": nvml.sys_cuda_driver_version()?,
        "gpus": gpus,
    }))
}

fn wait_xid(lib: &OsStr, timeout_ms: u32) -> Result<Value, nvml_wrapper::error::NvmlError> {
    use nvml_wrapper::bitmasks::event::EventTypes;
    use std::io::Write;
    let nvml = Nvml::builder().lib_path(lib).init()?;
    let mut set = nvml.create_event_set()?;
    for i in 0..nvml.device_count()? {
        set = nvml
            .device_by_index(i)?
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .map_err(|e| e.error)?;
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let ev = set.wait(timeout_ms)?;
    let xid = match ev.event_data {
        Some(nvml_wrapper::enums::event::XidError::Value(v)) => Some(v),
        _ => None,
    };
    Ok(json!({ "uuid": ev.device.uuid()?, "xid": xid }))
}
