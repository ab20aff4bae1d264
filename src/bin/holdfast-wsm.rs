//! `holdfast-wsm`: the reference WSM. Echoes every message; answers the
//! text `whoami` with the stream's identity as JSON.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "holdfast-wsm", version, about = "Reference WSM for holdfast: echo and whoami")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Name sent in link hellos.
    #[arg(long, default_value = "holdfast-wsm")]
    node: String,
    #[arg(long, default_value = "info", env = "HOLDFAST_LOG")]
    log: String,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    holdfast::init_log(&cli.log);
    let server = match holdfast::wsm::Server::bind(cli.listen, Arc::new(holdfast::wsm::echo::Echo::default()), cli.node) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("holdfast-wsm: cannot listen on {}: {e}", cli.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    match server.local_addr() {
        Ok(a) => println!("holdfast-wsm listening on {a}"),
        Err(e) => eprintln!("holdfast-wsm: {e}"),
    }
    match server.serve() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfast-wsm: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
