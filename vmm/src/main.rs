//! `vmm`: a KVM virtual machine monitor.
use clap::Parser;

/// A KVM virtual machine monitor whose guest memory lives in an RCU balanced tree.
#[derive(Parser)]
#[command(version)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
