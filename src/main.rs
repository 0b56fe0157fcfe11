//! The `gpu-dra` binary: parse flags, set up logging, run the chosen subcommand.

use std::process::ExitCode;

use clap::Parser;
use gpu_dra::cli::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = gpu_dra::logging::init(cli.log.log_format, &cli.log.log_level) {
        eprintln!("gpu-dra: {error}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::KubeletPlugin(args) => gpu_dra::run::kubelet_plugin(args).await,
        Command::Inventory(args) => gpu_dra::run::inventory(args).await,
        Command::Webhook(args) => gpu_dra::run::webhook(args).await,
        Command::Status(args) => gpu_dra::run::status(args).await,
        Command::ClearUnhealthy(args) => gpu_dra::run::clear_unhealthy(args).await,
        Command::Migrate(args) => gpu_dra::run::migrate(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "gpu-dra failed");
            ExitCode::FAILURE
        }
    }
}
