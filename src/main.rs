//! The `kuaka` binary: parse the command line, set up logging and signals, run, map errors to
//! exit codes (0 ok, 1 differences found, 2 error, 130 interrupted).

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use kuaka::cli::{Cli, LogFormat};
use kuaka::ui::LogWriter;

/// Rows travel as many small allocations (a value per cell, on both drivers); mimalloc's
/// per-thread free lists make them cheaper than glibc's arenas (measured in bench/verify.sh
/// and bench/mysql.sh).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let writer = LogWriter::new();
    let filter =
        EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("kuaka=info,warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .with_ansi(ansi);
    match cli.log_format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kuaka: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let cancel = CancellationToken::new();
    let code = runtime.block_on(async {
        let signals = cancel.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::warn!(
                "stopping at the next checkpoint (signal received); send it again to exit at once"
            );
            signals.cancel();
            wait_for_signal().await;
            std::process::exit(130);
        });
        kuaka::commands::dispatch(cli, &writer, &cancel).await
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    ExitCode::from(code)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
