//! `llmtap-mock`: the mock LLM upstream as a process (for the Python SDK tests and the
//! benchmarks). Prints its address on the first stdout line, then serves until killed.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "llmtap-mock", about = "Mock LLM upstream for llmtap tests and benchmarks")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long, default_value_os_t = llmtap_testkit::fixtures_dir())]
    fixtures: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let mock = llmtap_testkit::MockUpstream::start(args.listen, &args.fixtures).await?;
        let mut out = std::io::stdout();
        writeln!(out, "{}", mock.addr)?;
        out.flush()?;
        std::future::pending::<()>().await;
        Ok(())
    })
}
