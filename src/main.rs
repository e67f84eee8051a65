use std::process::ExitCode;

// glibc's allocator showed up as a fifth of the CPU of webhook delivery (many small, short-lived
// allocations across threads); mimalloc handles that pattern far better.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sautikit::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::prelude::*;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SAUTIKIT_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    // Colour codes only for a person at a terminal, not in a log file or a collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let layer = match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    };
    // sqlx warns once per slow connection acquire: one line in ten seconds is enough.
    let gate = sautikit::db::SlowAcquireGate::new(std::time::Duration::from_secs(10));
    tracing_subscriber::registry()
        .with(layer.with_filter(filter.and(gate)))
        .init();
}

fn main() -> ExitCode {
    // Transparent huge pages make resident memory follow the kernel, not the heap: a fault in an
    // untouched 2 MiB range of mimalloc's arena makes all of it resident, and each purge of part
    // of it splits it again, so RSS wanders by megabytes while the heap stays flat (and a fault
    // may stall on compaction). Without them, RSS is the pages the heap has touched.
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("sautikit: transparent huge pages left on: {e}");
    }
    let cli = Cli::parse_or_exit();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => {
            eprintln!("sautikit: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => {
            init_tracing(args.log_format);
            match sautikit::server::serve(*args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sautikit: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate(db) => {
            init_tracing(LogFormat::Text);
            let result = async {
                let db = sautikit::db::Db::connect(&db.url()).await?;
                db.migrate().await?;
                db.close().await;
                Ok::<_, sautikit::db::DbError>(())
            }
            .await;
            match result {
                Ok(()) => {
                    println!("{{\"migrated\":true}}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sautikit: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Phone(command) => match sautikit::phone::run(command).await {
            Ok(sautikit::phone::Outcome::Completed) => ExitCode::SUCCESS,
            Ok(sautikit::phone::Outcome::NotConnected) => ExitCode::FAILURE,
            Err(e @ sautikit::phone::PhoneError::Invalid(_)) => {
                eprintln!("sautikit: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("sautikit: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Loadtest(scenario) => match sautikit::loadtest::run(scenario).await {
            Ok(sautikit::loadtest::Verdict::Pass) => ExitCode::SUCCESS,
            Ok(sautikit::loadtest::Verdict::Fail) => ExitCode::FAILURE,
            Err(e @ sautikit::loadtest::LoadError::Invalid(_)) => {
                eprintln!("sautikit: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("sautikit: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Admin { db, command } => match sautikit::admin::run(&db.url(), command).await {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(sautikit::admin::AdminError::Invalid(m)) => {
                eprintln!("sautikit: {m}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("sautikit: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
