//! Event sets delivering injected XID critical errors.

use super::*;

/// `nvmlDeviceGetSupportedEventTypes`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    types: *mut c_ulonglong,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let o = out(types)?;
        *o = run("nvmlDeviceGetSupportedEventTypes", Some(g), |e| {
            e.spec(g)?;
            Ok(engine::SUPPORTED_EVENTS)
        })?;
        Ok(())
    })
}

/// `nvmlEventSetCreate`: only XIDs injected after creation are delivered.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    guard(|| {
        let o = out(set)?;
        let cursor = run("nvmlEventSetCreate", None, |e| {
            Ok(e.state.xid_events.last().map_or(0, |x| x.seq))
        })?;
        let mut g = ctx();
        let c = g.as_mut().ok_or(engine::UNINITIALIZED)?;
        let id = c.next_set;
        c.next_set += 1;
        c.event_sets.insert(
            id,
            EventSet {
                regs: BTreeMap::new(),
                cursor,
            },
        );
        *o = to_ptr(Handle::EventSet { id });
        Ok(())
    })
}

fn set_id(set: nvmlEventSet_t) -> Result<u32, Code> {
    match handle(set)? {
        Handle::EventSet { id } => Ok(id),
        _ => Err(engine::INVALID_ARGUMENT),
    }
}

/// `nvmlDeviceRegisterEvents`: types must be a subset of the supported ones.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let id = set_id(set)?;
        run("nvmlDeviceRegisterEvents", Some(g), |e| {
            e.spec(g)?;
            if types & !engine::SUPPORTED_EVENTS != 0 {
                return Err(engine::NOT_SUPPORTED);
            }
            Ok(())
        })?;
        let mut guard = ctx();
        let c = guard.as_mut().ok_or(engine::UNINITIALIZED)?;
        let s = c.event_sets.get_mut(&id).ok_or(engine::INVALID_ARGUMENT)?;
        *s.regs.entry(g).or_insert(0) |= types;
        Ok(())
    })
}

fn wait(
    function: &str,
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let id = set_id(set)?;
        let o = out(data)?;
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        loop {
            let (regs, cursor) = {
                let g = ctx();
                let c = g.as_ref().ok_or(engine::UNINITIALIZED)?;
                let s = c.event_sets.get(&id).ok_or(engine::INVALID_ARGUMENT)?;
                (s.regs.clone(), s.cursor)
            };
            let found = run(function, None, |e| Ok(e.next_xid(cursor, &regs)))?;
            if let Some((gpu, ev)) = found {
                let mut g = ctx();
                if let Some(s) = g.as_mut().and_then(|c| c.event_sets.get_mut(&id)) {
                    s.cursor = ev.seq;
                }
                *o = nvmlEventData_t {
                    device: to_ptr(Handle::Device { gpu }),
                    eventType: c_ulonglong::from(nvmlEventTypeXidCriticalError),
                    eventData: ev.xid,
                    gpuInstanceId: u32::MAX,
                    computeInstanceId: u32::MAX,
                };
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(engine::TIMEOUT);
            }
            // Polling the shared state file is how other processes' injections arrive.
            std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
        }
    })
}

/// `nvmlEventSetWait_v2`: next XID on a registered GPU, or `TIMEOUT`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    wait("nvmlEventSetWait_v2", set, data, timeout_ms)
}

/// `nvmlEventSetWait` (v1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    wait("nvmlEventSetWait", set, data, timeout_ms)
}

/// `nvmlEventSetFree`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    guard(|| {
        let id = set_id(set)?;
        let mut g = ctx();
        let c = g.as_mut().ok_or(engine::UNINITIALIZED)?;
        c.event_sets
            .remove(&id)
            .map(|_| ())
            .ok_or(engine::INVALID_ARGUMENT)
    })
}
