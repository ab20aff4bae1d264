//! `hf-bench`: the benchmark suite. `run` a scenario against holdfast and the
//! peers; `report` writes bench/RESULTS.md tables and charts; `soak` runs
//! holdfast for an hour of an operator's day; `swarm` and `echo` are the
//! processes `run` and `soak` start.
#![allow(clippy::disallowed_methods)]

mod churn;
mod departures;
mod echo;
mod peers;
mod render;
mod report;
mod result;
mod run;
mod soak;
mod soak_chart;
mod swarm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "hf-bench", about = "holdfast vs HAProxy and nginx on the same mTLS WebSocket job")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario against each proxy; writes bench/results/*.json.
    Run(result::RunArgs),
    /// Render bench/results/*.json into tables and charts (prints Markdown).
    Report {
        /// Folder of result JSON files.
        #[arg(long, default_value = "bench/results")]
        results: PathBuf,
    },
    /// holdfast under an hour of churn, live upgrades, WSM kills and reloads;
    /// writes bench/results/soak/<label>.json and .svg, prints the summary.
    Soak(soak::SoakArgs),
    /// One swarm process of devices (started by `run` and `soak`).
    Swarm(swarm::SwarmArgs),
    /// Plain WebSocket echo upstream for the peers (started by `run`).
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Append `<unix ms> new -` for each upgrade (as the reference WSM's --open-log).
        #[arg(long)]
        open_log: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Report { results } => render::load(&results).and_then(|rs| render::render(&rs, &results)).map(|md| print!("{md}")),
        Cmd::Soak(a) => soak::run(&a).and_then(|r| soak_chart::write(&r)),
        Cmd::Swarm(a) if a.mode == "soak" => churn::run(a),
        Cmd::Swarm(a) => swarm::run(a),
        Cmd::Echo { listen, open_log } => echo::run(listen, open_log),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hf-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_flag_has_help() {
        holdfast::cli_help::assert_all_documented(&<super::Cli as clap::CommandFactory>::command());
    }
}
