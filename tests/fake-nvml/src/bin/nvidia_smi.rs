//! Fake `nvidia-smi` over the fake NVML state (see `nvidia_ml::smi`).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let machine = nvidia_ml::machine::Machine::from_env();
    let code = nvidia_ml::smi::run(
        &args,
        machine,
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}
