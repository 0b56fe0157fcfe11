//! The C ABI called in-process exactly as a C caller would: pointers, struct versions,
//! buffer sizes, handles, and the rules reaching through to the state file.

use std::path::PathBuf;
use std::ptr::{null, null_mut};
use std::sync::Mutex;

use super::compute_instance::*;
use super::device::*;
use super::events::*;
use super::gpu_instance::*;
use super::system::*;
use super::*;
use crate::control::{self, Fault, Times};
use crate::engine::{
    ARGUMENT_VERSION_MISMATCH, IN_USE, INSUFFICIENT_RESOURCES, INSUFFICIENT_SIZE, INVALID_ARGUMENT,
    NOT_FOUND, NOT_SUPPORTED, SUCCESS, TIMEOUT, UNINITIALIZED,
};

/// The library has one process-wide context, as the real one; tests take turns.
static SERIAL: Mutex<()> = Mutex::new(());

struct Session {
    state: PathBuf,
    _dir: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: plain call without pointers.
        unsafe { nvmlShutdown() };
    }
}

fn session(topology: &str) -> Session {
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topo.yaml");
    std::fs::write(&path, topology).unwrap();
    assert_eq!(init_with(|| Machine::open(&path, None, None)), SUCCESS);
    Session {
        state: crate::topology::default_state_path(&path),
        _dir: dir,
        _serial: serial,
    }
}

fn device(i: u32) -> nvmlDevice_t {
    let mut d = null_mut();
    assert_eq!(unsafe { nvmlDeviceGetHandleByIndex_v2(i, &mut d) }, SUCCESS);
    d
}

fn uuid_of(d: nvmlDevice_t) -> String {
    let mut buf = [0 as c_char; 96];
    assert_eq!(
        unsafe { nvmlDeviceGetUUID(d, buf.as_mut_ptr(), 96) },
        SUCCESS
    );
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

const A100_MIG: &str = "gpus:\n  - model: A100-SXM4-40GB\n    migMode: true\n  - model: L40S\n";

#[test]
fn calls_before_init_and_bad_pointers_are_refused_without_crashing() {
    {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        assert_eq!(unsafe { nvmlDeviceGetCount_v2(&mut n) }, UNINITIALIZED);
        assert_eq!(unsafe { nvmlShutdown() }, UNINITIALIZED);
    }
    let _s = session(A100_MIG);
    assert_eq!(
        unsafe { nvmlDeviceGetCount_v2(null_mut()) },
        INVALID_ARGUMENT
    );
    let mut mode = 0;
    assert_eq!(
        unsafe { nvmlDeviceGetComputeMode(null_mut(), &mut mode) },
        INVALID_ARGUMENT
    );
    let garbage: nvmlDevice_t = std::ptr::without_provenance_mut(0x1234);
    assert_eq!(
        unsafe { nvmlDeviceGetComputeMode(garbage, &mut mode) },
        INVALID_ARGUMENT
    );
    let mut d = null_mut();
    assert_eq!(
        unsafe { nvmlDeviceGetHandleByIndex_v2(9, &mut d) },
        INVALID_ARGUMENT
    );
    assert_eq!(
        unsafe { nvmlDeviceGetHandleByUUID(null(), &mut d) },
        INVALID_ARGUMENT
    );
    assert_eq!(unsupported::nvmlDeviceGetFanSpeed(), NOT_SUPPORTED);
    let text = unsafe { CStr::from_ptr(nvmlErrorString(INSUFFICIENT_RESOURCES)) };
    assert_eq!(text.to_str().unwrap(), "Insufficient resources");
    let mut small = [0 as c_char; 4];
    assert_eq!(
        unsafe { nvmlDeviceGetName(device(0), small.as_mut_ptr(), 4) },
        INSUFFICIENT_SIZE
    );
}

#[test]
fn identity_pci_and_versioned_memory_info() {
    let _s = session("node: dgx-h100\n");
    let mut n = 0;
    assert_eq!(unsafe { nvmlDeviceGetCount_v2(&mut n) }, SUCCESS);
    assert_eq!(n, 8);
    let d = device(3);
    let mut pci: nvmlPciInfo_t = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { nvmlDeviceGetPciInfo_v3(d, &mut pci) }, SUCCESS);
    let bus = unsafe { CStr::from_ptr(pci.busId.as_ptr()) }
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        (bus.as_str(), pci.bus, pci.pciDeviceId),
        ("00000000:5D:00.0", 0x5D, 0x2330_10DE)
    );
    let mut by_bus = null_mut();
    let legacy = c"0000:5d:00.0";
    assert_eq!(
        unsafe { nvmlDeviceGetHandleByPciBusId_v2(legacy.as_ptr(), &mut by_bus) },
        SUCCESS
    );
    assert_eq!(by_bus, d);
    let uuid = std::ffi::CString::new(uuid_of(d)).unwrap();
    let mut by_uuid = null_mut();
    assert_eq!(
        unsafe { nvmlDeviceGetHandleByUUID(uuid.as_ptr(), &mut by_uuid) },
        SUCCESS
    );
    assert_eq!(by_uuid, d);

    let mut mem: nvmlMemory_v2_t = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { nvmlDeviceGetMemoryInfo_v2(d, &mut mem) },
        ARGUMENT_VERSION_MISMATCH
    );
    mem.version = struct_version::<nvmlMemory_v2_t>(2);
    assert_eq!(unsafe { nvmlDeviceGetMemoryInfo_v2(d, &mut mem) }, SUCCESS);
    assert_eq!(mem.total, 81559 * 1024 * 1024);
    let (mut major, mut minor) = (0, 0);
    assert_eq!(
        unsafe { nvmlDeviceGetCudaComputeCapability(d, &mut major, &mut minor) },
        SUCCESS
    );
    assert_eq!((major, minor), (9, 0));
    let mut v = [0 as c_char; 32];
    assert_eq!(
        unsafe { nvmlSystemGetDriverVersion(v.as_mut_ptr(), 32) },
        SUCCESS
    );
    let mut cuda = 0;
    assert_eq!(
        unsafe { nvmlSystemGetCudaDriverVersion_v2(&mut cuda) },
        SUCCESS
    );
    assert_eq!(cuda, 12080);
}

#[test]
fn possible_placements_raw_symbol_follows_the_size_protocol() {
    let _s = session(A100_MIG);
    let d = device(0);
    let mut count = 0;
    let f = nvmlDeviceGetGpuInstancePossiblePlacements_v2;
    assert_eq!(unsafe { f(d, 15, null_mut(), &mut count) }, SUCCESS);
    assert_eq!(count, 4);
    let mut buf = [nvmlGpuInstancePlacement_t { start: 0, size: 0 }; 8];
    count = 2;
    assert_eq!(
        unsafe { f(d, 15, buf.as_mut_ptr(), &mut count) },
        INSUFFICIENT_SIZE
    );
    assert_eq!(count, 4);
    count = 8;
    assert_eq!(unsafe { f(d, 9, buf.as_mut_ptr(), &mut count) }, SUCCESS);
    assert_eq!(count, 2);
    assert_eq!(
        (buf[0].start, buf[0].size, buf[1].start, buf[1].size),
        (0, 4, 4, 4)
    );
    assert_eq!(
        unsafe { f(d, 7, buf.as_mut_ptr(), &mut count) },
        INVALID_ARGUMENT
    );
    assert_eq!(
        unsafe { f(device(1), 9, buf.as_mut_ptr(), &mut count) },
        NOT_SUPPORTED
    );
}

#[test]
fn gpu_and_compute_instance_lifecycle_through_the_abi() {
    let s = session(A100_MIG);
    let d = device(0);
    let mut info: nvmlGpuInstanceProfileInfo_v2_t = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe {
            nvmlDeviceGetGpuInstanceProfileInfoV(d, NVML_GPU_INSTANCE_PROFILE_3_SLICE, &mut info)
        },
        ARGUMENT_VERSION_MISMATCH
    );
    info.version = struct_version::<nvmlGpuInstanceProfileInfo_v2_t>(2);
    assert_eq!(
        unsafe {
            nvmlDeviceGetGpuInstanceProfileInfoV(d, NVML_GPU_INSTANCE_PROFILE_3_SLICE, &mut info)
        },
        SUCCESS
    );
    let name = unsafe { CStr::from_ptr(info.name.as_ptr()) }
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        (info.id, info.sliceCount, info.memorySizeMB, name.as_str()),
        (9, 3, 19968, "MIG 3g.20gb")
    );

    let mut gi = null_mut();
    let bad = nvmlGpuInstancePlacement_t { start: 4, size: 2 };
    assert_eq!(
        unsafe { nvmlDeviceCreateGpuInstanceWithPlacement(d, 9, &bad, &mut gi) },
        INVALID_ARGUMENT
    );
    let at4 = nvmlGpuInstancePlacement_t { start: 4, size: 4 };
    assert_eq!(
        unsafe { nvmlDeviceCreateGpuInstanceWithPlacement(d, 9, &at4, &mut gi) },
        SUCCESS
    );
    let mut other = null_mut();
    assert_eq!(
        unsafe { nvmlDeviceCreateGpuInstanceWithPlacement(d, 5, &at4, &mut other) },
        INVALID_ARGUMENT
    );
    let at0 = nvmlGpuInstancePlacement_t { start: 0, size: 4 };
    assert_eq!(
        unsafe { nvmlDeviceCreateGpuInstanceWithPlacement(d, 14, &at0, &mut other) },
        INVALID_ARGUMENT
    );
    assert_eq!(
        unsafe { nvmlDeviceCreateGpuInstance(d, 0, &mut other) },
        INSUFFICIENT_RESOURCES
    );
    assert_eq!(
        unsafe { nvmlDeviceCreateGpuInstance(d, 123, &mut other) },
        INVALID_ARGUMENT
    );
    let mut remaining = 0;
    assert_eq!(
        unsafe { nvmlDeviceGetGpuInstanceRemainingCapacity(d, 19, &mut remaining) },
        SUCCESS
    );
    assert_eq!(remaining, 4);

    let mut gis = [null_mut(); 2];
    let mut n = 0;
    assert_eq!(
        unsafe { nvmlDeviceGetGpuInstances(d, 9, gis.as_mut_ptr(), &mut n) },
        SUCCESS
    );
    assert_eq!((n, gis[0]), (1, gi));
    let mut gi_info: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { nvmlGpuInstanceGetInfo(gi, &mut gi_info) }, SUCCESS);
    assert_eq!(
        (
            gi_info.id,
            gi_info.profileId,
            gi_info.placement.start,
            gi_info.device
        ),
        (1, 9, 4, d)
    );
    let mut by_id = null_mut();
    assert_eq!(
        unsafe { nvmlDeviceGetGpuInstanceById(d, 1, &mut by_id) },
        SUCCESS
    );
    assert_eq!(by_id, gi);
    assert_eq!(
        unsafe { nvmlDeviceGetGpuInstanceById(d, 2, &mut by_id) },
        NOT_FOUND
    );

    let mut ci_info: nvmlComputeInstanceProfileInfo_v2_t = unsafe { std::mem::zeroed() };
    ci_info.version = struct_version::<nvmlComputeInstanceProfileInfo_v2_t>(2);
    let full = NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE;
    let shared = NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED;
    assert_eq!(
        unsafe { nvmlGpuInstanceGetComputeInstanceProfileInfoV(gi, full, shared, &mut ci_info) },
        SUCCESS
    );
    assert_eq!(
        (ci_info.id, ci_info.sliceCount, ci_info.multiprocessorCount),
        (full, 3, 42)
    );
    let mut ci = null_mut();
    assert_eq!(
        unsafe { nvmlGpuInstanceCreateComputeInstance(gi, full, &mut ci) },
        SUCCESS
    );
    assert_eq!(unsafe { nvmlGpuInstanceDestroy(gi) }, IN_USE);
    let mut cinfo: nvmlComputeInstanceInfo_t = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { nvmlComputeInstanceGetInfo_v2(ci, &mut cinfo) },
        SUCCESS
    );
    assert_eq!(
        (cinfo.gpuInstance, cinfo.id, cinfo.profileId),
        (gi, 0, full)
    );

    let mut max = 0;
    assert_eq!(
        unsafe { nvmlDeviceGetMaxMigDeviceCount(d, &mut max) },
        SUCCESS
    );
    assert_eq!(max, 7);
    let mut mig = null_mut();
    assert_eq!(
        unsafe { nvmlDeviceGetMigDeviceHandleByIndex(d, 0, &mut mig) },
        SUCCESS
    );
    let mut none = null_mut();
    assert_eq!(
        unsafe { nvmlDeviceGetMigDeviceHandleByIndex(d, 1, &mut none) },
        NOT_FOUND
    );
    let (mut is_mig, mut gid, mut cid) = (0, 9, 9);
    assert_eq!(
        unsafe { nvmlDeviceIsMigDeviceHandle(mig, &mut is_mig) },
        SUCCESS
    );
    assert_eq!(
        unsafe { nvmlDeviceGetGpuInstanceId(mig, &mut gid) },
        SUCCESS
    );
    assert_eq!(
        unsafe { nvmlDeviceGetComputeInstanceId(mig, &mut cid) },
        SUCCESS
    );
    assert_eq!((is_mig, gid, cid), (1, 1, 0));
    let mut parent = null_mut();
    assert_eq!(
        unsafe { nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig, &mut parent) },
        SUCCESS
    );
    assert_eq!(parent, d);
    let mig_uuid = uuid_of(mig);
    assert!(mig_uuid.starts_with("MIG-"));
    let c = std::ffi::CString::new(mig_uuid.clone()).unwrap();
    let mut again = null_mut();
    assert_eq!(
        unsafe { nvmlDeviceGetHandleByUUID(c.as_ptr(), &mut again) },
        SUCCESS
    );
    assert_eq!(again, mig);

    // Another process (here: the control API) sees what the ABI did.
    let st = control::read_state(&s.state).unwrap();
    let gpu = st.gpus.values().find(|g| g.index == 0).unwrap();
    assert_eq!(gpu.gpu_instances[&1].compute_instances[&0].uuid, mig_uuid);

    assert_eq!(unsafe { nvmlComputeInstanceDestroy(ci) }, SUCCESS);
    assert_eq!(unsafe { nvmlGpuInstanceDestroy(gi) }, SUCCESS);
    let mut is = 0;
    assert_eq!(
        unsafe { nvmlDeviceIsMigDeviceHandle(mig, &mut is) },
        INVALID_ARGUMENT
    );
    let (mut cur, mut pend) = (9, 9);
    let mut status = 9;
    assert_eq!(unsafe { nvmlDeviceSetMigMode(d, 0, &mut status) }, SUCCESS);
    assert_eq!(
        unsafe { nvmlDeviceGetMigMode(d, &mut cur, &mut pend) },
        SUCCESS
    );
    assert_eq!((cur, pend, status), (0, 0, SUCCESS));
    assert_eq!(
        unsafe { nvmlDeviceCreateGpuInstance(d, 19, &mut gi) },
        NOT_SUPPORTED
    );
}

#[test]
fn injected_faults_fire_on_the_named_function_and_gpu() {
    let s = session(A100_MIG);
    let d0 = device(0);
    control::inject_fault(
        &s.state,
        Fault {
            function: "nvmlDeviceSetComputeMode".into(),
            gpu_uuid: Some(uuid_of(d0)),
            error: 999,
            times: Times::Once,
        },
    )
    .unwrap();
    assert_eq!(unsafe { nvmlDeviceSetComputeMode(device(1), 3) }, SUCCESS);
    assert_eq!(unsafe { nvmlDeviceSetComputeMode(d0, 3) }, 999);
    assert_eq!(unsafe { nvmlDeviceSetComputeMode(d0, 3) }, SUCCESS);
    let mut mode = 0;
    assert_eq!(unsafe { nvmlDeviceGetComputeMode(d0, &mut mode) }, SUCCESS);
    assert_eq!(mode, 3);
}

#[test]
fn xid_events_reach_registered_event_sets() {
    let s = session(A100_MIG);
    let d1 = device(1);
    let mut set = null_mut();
    assert_eq!(unsafe { nvmlEventSetCreate(&mut set) }, SUCCESS);
    let mut types = 0;
    assert_eq!(
        unsafe { nvmlDeviceGetSupportedEventTypes(d1, &mut types) },
        SUCCESS
    );
    let xid = c_ulonglong::from(nvmlEventTypeXidCriticalError);
    assert_ne!(types & xid, 0);
    assert_eq!(unsafe { nvmlDeviceRegisterEvents(d1, xid, set) }, SUCCESS);
    let mut data: nvmlEventData_t = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { nvmlEventSetWait_v2(set, &mut data, 0) }, TIMEOUT);
    control::inject_xid(&s.state, &uuid_of(device(0)), 31).unwrap();
    control::inject_xid(&s.state, &uuid_of(d1), 79).unwrap();
    assert_eq!(
        unsafe { nvmlEventSetWait_v2(set, &mut data, 5000) },
        SUCCESS
    );
    assert_eq!((data.device, data.eventType, data.eventData), (d1, xid, 79));
    assert_eq!(unsafe { nvmlEventSetWait_v2(set, &mut data, 0) }, TIMEOUT);
    assert_eq!(unsafe { nvmlEventSetFree(set) }, SUCCESS);
    assert_eq!(unsafe { nvmlEventSetFree(set) }, INVALID_ARGUMENT);
}
