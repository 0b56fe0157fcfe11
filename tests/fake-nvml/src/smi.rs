//! The fake `nvidia-smi`: the subset of the real tool's command line the driver and tests
//! use, over the same state as the library.
//!
//! Owns argument parsing and output text only; every change goes through
//! [`crate::engine`] (so faults injected for `nvmlDeviceSetComputeMode` /
//! `nvmlDeviceSetMigMode` hit `-c` / `-mig` too, and `nvidia-smi compute-policy` faults hit
//! `--set-timeslice`). Exit codes follow the real tool's documented RETURN VALUE list,
//! which mirrors `nvmlReturn_t` (2 invalid argument, 3 not supported, 6 not found, 9 driver
//! not loaded, 255 other). Unknown options print the real tool's hint on stderr and exit 2.
//!
//! Supported: `-L`, `-q [-i ID]`, `[-i ID] -c MODE` (0/DEFAULT, 2/PROHIBITED,
//! 3/EXCLUSIVE_PROCESS), `[-i ID] -mig 0|1`, `compute-policy [-i ID] --set-timeslice N`
//! (0 default, 1 short, 2 medium, 3 long), `compute-policy [-i ID] -l|--list`,
//! `mig [-i ID] -lgi|-lci|-lgip|-lgipp`. `ID` is an index, a GPU UUID or a PCI bus id.

use std::io::Write;

use crate::engine::{self, Code, Engine};
use crate::machine::Machine;
use crate::presets;
use crate::state::{ComputeMode, NO_EFFECT};
use crate::topology::normalize_bus_id;

const HINT: &str = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.";

/// Time-slice names as `compute-policy` prints them, by value.
pub const TIMESLICE_NAMES: [&str; 4] = ["Default", "Short", "Medium", "Long"];

fn exit_code(code: Code) -> i32 {
    match code {
        0..=30 => code as i32,
        _ => 255,
    }
}

fn err_text(code: Code) -> String {
    engine::error_string(code).to_string_lossy().into_owned()
}

/// Options after splitting `--opt=value`.
fn split_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for a in args {
        match a.split_once('=') {
            Some((k, v)) if a.starts_with("--") => {
                out.push(k.to_string());
                out.push(v.to_string());
            }
            _ => out.push(a.clone()),
        }
    }
    out
}

struct Io<'a> {
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
}

impl Io<'_> {
    fn fail(&mut self, code: i32, msg: &str) -> i32 {
        let _ = writeln!(self.err, "{msg}");
        code
    }
}

/// Run the tool with `args` (without argv\[0\]) against `machine`. Returns the exit code.
pub fn run(
    args: &[String],
    machine: Result<Machine, crate::machine::MachineError>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let mut io = Io { out, err };
    let args = split_args(args);
    let machine = match machine {
        Ok(m) => m,
        Err(e) => {
            return io.fail(
                9,
                &format!("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. ({e})"),
            );
        }
    };
    match args.first().map(String::as_str) {
        Some("compute-policy") => compute_policy(&machine, &args[1..], &mut io),
        Some("mig") => mig(&machine, &args[1..], &mut io),
        _ => top(&machine, &args, &mut io),
    }
}

/// Resolve `-i` to GPU indices (all when absent).
fn select(machine: &Machine, id: Option<&str>) -> Result<Vec<u32>, String> {
    let Some(id) = id else {
        return Ok(machine.topo.gpus.iter().map(|g| g.index).collect());
    };
    let mut out = Vec::new();
    for one in id.split(',') {
        let one = one.trim();
        let found = machine.topo.gpus.iter().find(|g| {
            one.parse::<u32>().ok() == Some(g.index)
                || g.uuid.eq_ignore_ascii_case(one)
                || normalize_bus_id(one).as_deref() == Some(g.pci_bus_id.as_str())
        });
        match found {
            Some(g) => out.push(g.index),
            None => return Err(format!("No devices were found matching {one:?}")),
        }
    }
    Ok(out)
}

fn take_value(args: &[String], i: &mut usize, io: &mut Io<'_>) -> Result<String, i32> {
    *i += 1;
    args.get(*i).cloned().ok_or_else(|| io.fail(2, HINT))
}

fn apply<R>(
    machine: &Machine,
    f: impl FnOnce(&mut Engine<'_>) -> Result<R, Code>,
) -> Result<R, Code> {
    machine.with(f).unwrap_or(Err(engine::UNKNOWN))
}

fn top(machine: &Machine, args: &[String], io: &mut Io<'_>) -> i32 {
    let (mut list, mut query, mut reset, mut id, mut mode, mut mig_mode) =
        (false, false, false, None, None, None);
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-L" | "--list-gpus" => list = true,
            "-q" | "--query" => query = true,
            "-r" | "--gpu-reset" => reset = true,
            "-i" | "--id" => match take_value(args, &mut i, io) {
                Ok(v) => id = Some(v),
                Err(c) => return c,
            },
            "-c" | "--compute-mode" => match take_value(args, &mut i, io) {
                Ok(v) => mode = Some(v),
                Err(c) => return c,
            },
            "-mig" | "--multi-instance-gpu" => match take_value(args, &mut i, io) {
                Ok(v) => mig_mode = Some(v),
                Err(c) => return c,
            },
            _ => return io.fail(2, HINT),
        }
        i += 1;
    }
    let gpus = match select(machine, id.as_deref()) {
        Ok(g) => g,
        Err(m) => return io.fail(6, &m),
    };
    if let Some(mode) = mode {
        let (value, name) = match mode.to_ascii_uppercase().as_str() {
            "0" | "DEFAULT" => (ComputeMode::Default, "DEFAULT"),
            "2" | "PROHIBITED" => (ComputeMode::Prohibited, "PROHIBITED"),
            "3" | "EXCLUSIVE_PROCESS" => (ComputeMode::ExclusiveProcess, "EXCLUSIVE_PROCESS"),
            _ => return io.fail(2, HINT),
        };
        for g in &gpus {
            let bus = &machine.topo.gpus[*g as usize].pci_bus_id;
            let r = apply(machine, |e| {
                e.fault("nvmlDeviceSetComputeMode", Some(*g))?;
                e.set_compute_mode(*g, value.nvml())
            });
            if let Err(c) = r
                && c != NO_EFFECT
            {
                return io.fail(
                    exit_code(c),
                    &format!(
                        "Unable to set the compute mode for GPU {bus}: {}",
                        err_text(c)
                    ),
                );
            }
            let _ = writeln!(io.out, "Set compute mode to {name} for GPU {bus}.");
        }
        let _ = writeln!(io.out, "All done.");
        return 0;
    }
    if reset {
        if id.is_none() {
            return io.fail(2, "GPU reset requires -i");
        }
        for g in &gpus {
            let bus = &machine.topo.gpus[*g as usize].pci_bus_id;
            if let Err(c) = apply(machine, |e| e.reset_gpu(*g)) {
                return io.fail(
                    exit_code(c),
                    &format!("Unable to reset GPU {bus}: {}", err_text(c)),
                );
            }
            let _ = writeln!(io.out, "GPU {bus} was successfully reset.");
        }
        let _ = writeln!(io.out, "All done.");
        return 0;
    }
    if let Some(m) = mig_mode {
        let value = match m.as_str() {
            "0" | "DISABLED" => 0,
            "1" | "ENABLED" => 1,
            _ => return io.fail(2, HINT),
        };
        for g in &gpus {
            let bus = &machine.topo.gpus[*g as usize].pci_bus_id;
            let r = apply(machine, |e| {
                e.fault("nvmlDeviceSetMigMode", Some(*g))?;
                e.set_mig_mode(*g, value)
            });
            let word = if value == 1 { "enable" } else { "disable" };
            match r {
                Err(c) => {
                    return io.fail(
                        exit_code(c),
                        &format!("Unable to {word} MIG Mode for GPU {bus}: {}", err_text(c)),
                    );
                }
                Ok(engine::SUCCESS) => {}
                Ok(status) => {
                    let _ = writeln!(
                        io.out,
                        "Warning: MIG mode is in pending {word} state for GPU {bus}:{}",
                        err_text(status)
                    );
                }
            }
            let _ = writeln!(
                io.out,
                "{}d MIG Mode for GPU {bus}",
                if value == 1 { "Enable" } else { "Disable" }
            );
        }
        let _ = writeln!(io.out, "All done.");
        return 0;
    }
    let state = match machine.snapshot() {
        Ok(s) => s,
        Err(e) => return io.fail(255, &e.to_string()),
    };
    if list || !query {
        for g in &gpus {
            let spec = &machine.topo.gpus[*g as usize];
            let _ = writeln!(
                io.out,
                "GPU {}: {} (UUID: {})",
                spec.index, spec.model.name, spec.uuid
            );
            let Some(gs) = state.gpus.get(&spec.uuid) else {
                continue;
            };
            if !gs.mig_current {
                continue;
            }
            let mut n = 0;
            for gi in gs.gpu_instances.values() {
                let Some(p) = spec.model.gi_profile_by_id(gi.profile_id) else {
                    continue;
                };
                let cps = presets::ci_profiles(spec.model, p);
                for ci in gi.compute_instances.values() {
                    let name = cps
                        .iter()
                        .find(|c| c.id == ci.profile_id)
                        .map_or_else(|| p.name.to_string(), |c| c.name(p));
                    let _ = writeln!(
                        io.out,
                        "  MIG {name:<14} Device {n:>2}: (UUID: {})",
                        ci.uuid
                    );
                    n += 1;
                }
            }
        }
        return 0;
    }
    let _ = writeln!(io.out, "\n==============NVSMI LOG==============\n");
    let _ = writeln!(
        io.out,
        "Driver Version                            : {}",
        machine.topo.driver_version
    );
    let cuda = machine.topo.cuda_driver_version;
    let _ = writeln!(
        io.out,
        "CUDA Version                              : {}.{}\n",
        cuda / 1000,
        cuda % 1000 / 10
    );
    let _ = writeln!(
        io.out,
        "Attached GPUs                             : {}",
        machine.topo.gpus.len()
    );
    for g in &gpus {
        let spec = &machine.topo.gpus[*g as usize];
        let Some(gs) = state.gpus.get(&spec.uuid) else {
            continue;
        };
        let en = |b: bool| if b { "Enabled" } else { "Disabled" };
        let mig = if spec.model.mig_capable() {
            format!(
                "        Current                           : {}\n        Pending                           : {}",
                en(gs.mig_current),
                en(gs.mig_pending)
            )
        } else {
            "        Current                           : N/A\n        Pending                           : N/A".to_string()
        };
        let _ = writeln!(
            io.out,
            "GPU {}\n    Product Name                          : {}\n    MIG Mode\n{mig}\n    GPU UUID                              : {}\n    Minor Number                          : {}\n    Compute Mode                          : {}\n    Compute Policy\n        Timeslice                         : {}\n    FB Memory Usage\n        Total                             : {} MiB",
            spec.pci_bus_id,
            spec.model.name,
            spec.uuid,
            spec.minor,
            gs.compute_mode.smi_name(),
            TIMESLICE_NAMES
                .get(gs.timeslice as usize)
                .unwrap_or(&"Unknown"),
            spec.model.memory_mib,
        );
        if gs.mig_current {
            let _ = writeln!(io.out, "    MIG Devices");
            for gi in gs.gpu_instances.values() {
                for ci in gi.compute_instances.values() {
                    let profile = spec
                        .model
                        .gi_profile_by_id(gi.profile_id)
                        .map_or("?", |p| p.name);
                    let _ = writeln!(
                        io.out,
                        "        MIG Device\n            GPU Instance ID               : {}\n            Compute Instance ID           : {}\n            GPU Instance Profile          : {profile}\n            UUID                          : {}",
                        gi.id, ci.id, ci.uuid
                    );
                }
            }
        }
        let _ = writeln!(io.out);
    }
    0
}

fn compute_policy(machine: &Machine, args: &[String], io: &mut Io<'_>) -> i32 {
    let (mut id, mut set, mut list) = (None, None, false);
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-i" | "--id" => match take_value(args, &mut i, io) {
                Ok(v) => id = Some(v),
                Err(c) => return c,
            },
            "--set-timeslice" => match take_value(args, &mut i, io) {
                Ok(v) => set = Some(v),
                Err(c) => return c,
            },
            "-l" | "--list" => list = true,
            _ => return io.fail(2, HINT),
        }
        i += 1;
    }
    let gpus = match select(machine, id.as_deref()) {
        Ok(g) => g,
        Err(m) => return io.fail(6, &m),
    };
    if let Some(v) = set {
        let Some(value) = v.parse::<u32>().ok().filter(|v| *v <= 3) else {
            return io.fail(2, "Invalid timeslice value. Valid values are 0 (default), 1 (short), 2 (medium), 3 (long).");
        };
        for g in &gpus {
            let bus = &machine.topo.gpus[*g as usize].pci_bus_id;
            let r = apply(machine, |e| {
                e.fault("nvidia-smi compute-policy", Some(*g))?;
                e.set_timeslice(*g, value)
            });
            if let Err(c) = r
                && c != NO_EFFECT
            {
                return io.fail(
                    exit_code(c),
                    &format!("Failed to set timeslice for GPU {bus}: {}", err_text(c)),
                );
            }
            let _ = writeln!(
                io.out,
                "Set timeslice to {value} ({}) for GPU {bus}.",
                TIMESLICE_NAMES[value as usize]
            );
        }
        return 0;
    }
    if !list {
        return io.fail(2, HINT);
    }
    for g in &gpus {
        if let Err(c) = apply(machine, |e| {
            e.fault("nvidia-smi compute-policy -l", Some(*g))
        }) {
            return io.fail(
                exit_code(c),
                &format!("Failed to list compute policies: {}", err_text(c)),
            );
        }
    }
    let state = match machine.snapshot() {
        Ok(s) => s,
        Err(e) => return io.fail(255, &e.to_string()),
    };
    let _ = writeln!(
        io.out,
        "+-----------------------------------------------+\n| GPU compute policies:                         |\n| GPU     Policy              Value             |\n|===============================================|"
    );
    for g in &gpus {
        let spec = &machine.topo.gpus[*g as usize];
        let value = state.gpus.get(&spec.uuid).map_or(0, |s| s.timeslice);
        let name = TIMESLICE_NAMES.get(value as usize).unwrap_or(&"Unknown");
        let _ = writeln!(
            io.out,
            "| {:<7} {:<19} {:<17} |",
            spec.index, "Timeslice", name
        );
    }
    let _ = writeln!(io.out, "+-----------------------------------------------+");
    0
}

fn mig(machine: &Machine, args: &[String], io: &mut Io<'_>) -> i32 {
    let (mut id, mut what) = (None, None);
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-i" | "--id" => match take_value(args, &mut i, io) {
                Ok(v) => id = Some(v),
                Err(c) => return c,
            },
            "-lgi" | "--list-gpu-instances" => what = Some("lgi"),
            "-lci" | "--list-compute-instances" => what = Some("lci"),
            "-lgip" | "--list-gpu-instance-profiles" => what = Some("lgip"),
            "-lgipp" | "--list-gpu-instance-possible-placements" => what = Some("lgipp"),
            _ => return io.fail(2, HINT),
        }
        i += 1;
    }
    let Some(what) = what else {
        return io.fail(2, HINT);
    };
    let gpus = match select(machine, id.as_deref()) {
        Ok(g) => g,
        Err(m) => return io.fail(6, &m),
    };
    let state = match machine.snapshot() {
        Ok(s) => s,
        Err(e) => return io.fail(255, &e.to_string()),
    };
    let mut lines = Vec::new();
    for g in &gpus {
        let spec = &machine.topo.gpus[*g as usize];
        let Some(gs) = state.gpus.get(&spec.uuid) else {
            continue;
        };
        if !spec.model.mig_capable() || !gs.mig_current {
            if gpus.len() == 1 {
                return io.fail(
                    3,
                    &format!(
                        "Unable to list MIG information for GPU {}: Not Supported",
                        spec.index
                    ),
                );
            }
            continue;
        }
        match what {
            "lgip" | "lgipp" => {
                for p in spec.model.mig_profiles {
                    if what == "lgip" {
                        let used = gs
                            .gpu_instances
                            .values()
                            .filter(|x| x.profile_id == p.id)
                            .count() as u32;
                        lines.push(format!(
                            "| {:>3}  MIG {:<14} {:>3}   {}/{}   {:>8.2}   No   {:>3}  {:>3}  {:>3}  | CE {} JPEG {} OFA {}",
                            spec.index, p.name, p.id, p.instance_count.saturating_sub(used), p.instance_count,
                            p.memory_mib as f64 / 1024.0, p.sm, p.dec, p.enc, p.ce, p.jpeg, p.ofa
                        ));
                    } else {
                        let starts: Vec<String> =
                            p.placement_starts.iter().map(u32::to_string).collect();
                        lines.push(format!(
                            "GPU {:>2} Profile ID {:>2} Placements: {{{}}}:{}",
                            spec.index,
                            p.id,
                            starts.join(","),
                            p.placement_size
                        ));
                    }
                }
            }
            "lgi" => {
                for gi in gs.gpu_instances.values() {
                    let name = spec
                        .model
                        .gi_profile_by_id(gi.profile_id)
                        .map_or("?", |p| p.name);
                    lines.push(format!(
                        "| {:>3}  MIG {:<14} {:>5} {:>9} {:>9}:{:<3}|",
                        spec.index,
                        name,
                        gi.profile_id,
                        gi.id,
                        gi.placement_start,
                        gi.placement_size
                    ));
                }
            }
            _ => {
                for gi in gs.gpu_instances.values() {
                    let Some(p) = spec.model.gi_profile_by_id(gi.profile_id) else {
                        continue;
                    };
                    let cps = presets::ci_profiles(spec.model, p);
                    for ci in gi.compute_instances.values() {
                        let name = cps
                            .iter()
                            .find(|c| c.id == ci.profile_id)
                            .map_or_else(|| p.name.to_string(), |c| c.name(p));
                        lines.push(format!(
                            "| {:>3} {:>6}   MIG {:<16} {:>5} {:>9} {:>9}:{:<3}|",
                            spec.index,
                            gi.id,
                            name,
                            ci.profile_id,
                            ci.id,
                            ci.placement_start,
                            ci.placement_size
                        ));
                    }
                }
            }
        }
    }
    let (title, header) = match what {
        "lgi" => (
            "GPU instances:",
            "| GPU   Name               Profile  Instance   Placement  |\n|                              ID       ID     Start:Size |",
        ),
        "lci" => (
            "Compute instances:",
            "| GPU  GPU      Name                 Profile  Instance   Placement  |\n|      Instance                         ID       ID     Start:Size |",
        ),
        "lgip" => (
            "GPU instance profiles:",
            "| GPU   Name               ID  Free/Total  Memory GiB  P2P  SM  DEC  ENC  |",
        ),
        _ => ("", ""),
    };
    if lines.is_empty() && (what == "lgi" || what == "lci") {
        let noun = if what == "lgi" { "GPU" } else { "compute" };
        return io.fail(6, &format!("No {noun} instances found: Not Found"));
    }
    if !title.is_empty() {
        let _ = writeln!(
            io.out,
            "+{}+\n| {title:<width$}|\n{header}\n|{}|",
            "-".repeat(60),
            "=".repeat(60),
            width = 59
        );
    }
    for l in lines {
        let _ = writeln!(io.out, "{l}");
    }
    if !title.is_empty() {
        let _ = writeln!(io.out, "+{}+", "-".repeat(60));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(dir: &std::path::Path, text: &str) -> Machine {
        let topo = dir.join("topo.yaml");
        std::fs::write(&topo, text).unwrap();
        Machine::open(&topo, None, None).unwrap()
    }

    fn smi(m: &Machine, args: &[&str]) -> (i32, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let code = run(&args, Ok(m.clone()), &mut out, &mut err);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn compute_mode_and_timeslice_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = machine(dir.path(), "node: l40s-single\n");
        let uuid = m.topo.gpus[0].uuid.clone();
        let (code, out, _) = smi(&m, &["-i", &uuid, "-c", "EXCLUSIVE_PROCESS"]);
        assert_eq!(code, 0);
        assert!(
            out.contains("Set compute mode to EXCLUSIVE_PROCESS for GPU 00000000:30:00.0."),
            "{out}"
        );
        let (code, _, _) = smi(&m, &["compute-policy", "-i", &uuid, "--set-timeslice=2"]);
        assert_eq!(code, 0);
        let (_, out, _) = smi(&m, &["-q"]);
        assert!(
            out.contains("Compute Mode                          : Exclusive_Process"),
            "{out}"
        );
        assert!(
            out.contains("Timeslice                         : Medium"),
            "{out}"
        );
        let (_, out, _) = smi(&m, &["compute-policy", "--list"]);
        assert!(out.contains("Timeslice") && out.contains("Medium"), "{out}");
        let (code, _, err) = smi(&m, &["compute-policy", "--set-timeslice", "7"]);
        assert_eq!(code, 2);
        assert!(err.contains("Invalid timeslice"), "{err}");
    }

    #[test]
    fn a_setting_that_does_not_take_exits_0_and_changes_nothing() {
        use crate::control::{self, Fault, Times};
        let dir = tempfile::tempdir().unwrap();
        let m = machine(dir.path(), "node: l40s-single\n");
        let uuid = m.topo.gpus[0].uuid.clone();
        let state = control::state_path(&dir.path().join("topo.yaml"));
        for function in ["nvidia-smi compute-policy", "nvmlDeviceSetComputeMode"] {
            control::inject_fault(
                &state,
                Fault {
                    function: function.into(),
                    gpu_uuid: Some(uuid.clone()),
                    error: NO_EFFECT,
                    times: Times::Once,
                },
            )
            .unwrap();
        }
        let (code, out, _) = smi(&m, &["compute-policy", "-i", &uuid, "--set-timeslice", "3"]);
        assert_eq!(code, 0);
        assert!(out.contains("Set timeslice to 3 (Long)"), "{out}");
        let (code, out, _) = smi(&m, &["-i", &uuid, "-c", "3"]);
        assert_eq!(code, 0);
        assert!(
            out.contains("Set compute mode to EXCLUSIVE_PROCESS"),
            "{out}"
        );
        let s = control::read_state(&state).unwrap();
        assert_eq!(s.gpus[&uuid].timeslice, 0, "the time slice did not take");
        assert_eq!(s.gpus[&uuid].compute_mode, ComputeMode::Default);
        assert!(s.faults.is_empty(), "each fired once");
        // The next call takes.
        assert_eq!(
            smi(&m, &["compute-policy", "-i", &uuid, "--set-timeslice", "3"]).0,
            0
        );
        assert_eq!(
            control::read_state(&state).unwrap().gpus[&uuid].timeslice,
            3
        );
    }

    #[test]
    fn unknown_options_fail_like_the_real_tool() {
        let dir = tempfile::tempdir().unwrap();
        let m = machine(dir.path(), "gpus: [{model: T4}]\n");
        let (code, out, err) = smi(&m, &["--frobnicate"]);
        assert_eq!((code, out.as_str()), (2, ""));
        assert!(err.contains("Please run 'nvidia-smi -h'"));
        assert_eq!(smi(&m, &["-i", "5", "-q"]).0, 6);
        let (code, _, err) = smi(&m, &["compute-policy", "--set-timeslice", "1"]);
        assert_eq!(code, 3, "{err}");
        assert_eq!(smi(&m, &["mig", "-lgi"]).0, 3);
        assert_eq!(smi(&m, &["-c", "1"]).0, 2);
    }

    #[test]
    fn mig_listings_show_static_instances() {
        let dir = tempfile::tempdir().unwrap();
        let m = machine(
            dir.path(),
            "gpus:\n  - model: A100-SXM4-40GB\n    migMode: true\n    gpuInstances: [{profile: 3g.20gb, placement: 4}, {profile: 1g.5gb}]\n",
        );
        let (code, out, _) = smi(&m, &["mig", "-lgi"]);
        assert_eq!(code, 0);
        assert!(out.contains("MIG 3g.20gb") && out.contains("4:4"), "{out}");
        assert!(out.contains("MIG 1g.5gb") && out.contains("0:1"), "{out}");
        let (_, out, _) = smi(&m, &["mig", "-lci", "-i", "0"]);
        assert_eq!(out.matches("MIG ").count(), 2, "{out}");
        let (_, out, _) = smi(&m, &["-L"]);
        assert!(
            out.contains("  MIG 3g.20gb") && out.contains("(UUID: MIG-"),
            "{out}"
        );
        let (_, out, _) = smi(&m, &["mig", "-lgipp"]);
        assert!(out.contains("Profile ID  9 Placements: {0,4}:4"), "{out}");
    }
}
