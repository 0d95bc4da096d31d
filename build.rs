//! Links `mvm-shard` as a position-dependent executable on Linux with glibc.
//!
//! Every shard starts the binary afresh as its agent. As a position-independent
//! executable (the default) the dynamic loader first applied ~60,000
//! relocations to it and copied the ~1 MB of data they touch, a few
//! milliseconds of CPU per shard and private memory per agent. Linked at a
//! fixed address, those pages stay clean and shared between all agents. What
//! is given up is the address randomisation of the binary's own code (the
//! libraries, stack and heap stay randomised).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
