use std::process::ExitCode;

// glibc's allocator showed up as a fifth of the CPU of webhook delivery (many small, short-lived
// allocations across threads); mimalloc handles that pattern far better.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use sautikit::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SAUTIKIT_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
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
