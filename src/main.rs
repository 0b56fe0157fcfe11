//! The `gpu-dra` binary: a thin entry point over the library's subcommands.

fn main() {
    println!("gpu-dra");
}
