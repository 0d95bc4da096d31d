//! What the environment a shard runs in has, for the run's cost estimate:
//! Lambda bills functions by configured memory × time, MicroVMs by vCPU and
//! memory over time.

use crate::protocol::runtime_api::{EMULATED_ENVIRONMENT, FUNCTION_MEMORY_SIZE};
use crate::protocol::{Platform, Resources};

/// The resources of this environment: the function's configured memory when
/// Lambda (or the emulator) says it, else the machine's total memory (a
/// microVM's size), and the CPUs this process may use.
pub fn of_this_environment() -> Resources {
    let function_memory = std::env::var(FUNCTION_MEMORY_SIZE)
        .ok()
        .and_then(|v| v.parse().ok());
    let platform = match function_memory {
        Some(_) => Platform::LambdaFunction,
        None => Platform::Microvm,
    };
    Resources {
        platform,
        emulated: std::env::var_os(EMULATED_ENVIRONMENT).is_some(),
        memory_mb: function_memory.unwrap_or_else(total_memory_mb),
        vcpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        arch: std::env::consts::ARCH.to_string(),
    }
}

/// `MemTotal` of /proc/meminfo, in MB (0 when unreadable).
fn total_memory_mb() -> u32 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            u32::try_from(kib / 1024).ok()
        })
        .unwrap_or(0)
}
