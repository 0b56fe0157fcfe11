//! Process-wide tracing subscriber: text or JSON lines on stderr.
//!
//! Owns the log format and the filter syntax (`RUST_LOG` style, e.g.
//! `info,gpu_dra::plugin=debug`). Logs go to stderr so commands that print data
//! (`gpu-dra inventory --slices`) keep stdout clean. Span fields (`claim.uid`, ...)
//! appear on every event inside the span: text shows the span chain, JSON the
//! current span. It must not be initialised twice; call it only from main.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::ParseError;

/// Output format of log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The filter string is not valid `RUST_LOG` syntax.
    #[error("invalid log level filter {filter:?}")]
    Filter {
        /// The filter as given.
        filter: String,
        /// Parser error.
        #[source]
        source: ParseError,
    },
    /// A global subscriber was already installed.
    #[error("logging was already initialised")]
    AlreadyInitialised(#[source] tracing_subscriber::util::TryInitError),
}

/// Parses a `RUST_LOG`-style filter such as `info` or `warn,gpu_dra=debug`.
pub fn filter(filter: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::try_new(filter).map_err(|source| LoggingError::Filter {
        filter: filter.to_owned(),
        source,
    })
}

/// Installs the global subscriber writing `format` lines to stderr at `level`.
pub fn init(format: LogFormat, level: &str) -> Result<(), LoggingError> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = filter(level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.finish().try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .finish()
            .try_init(),
    }
    .map_err(LoggingError::AlreadyInitialised)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_reject() {
        assert!(filter("info").is_ok());
        assert!(filter("warn,gpu_dra::plugin=debug").is_ok());
        let err = filter("gpu_dra=loud").unwrap_err();
        assert!(err.to_string().contains("gpu_dra=loud"));
    }
}
