//! `vmm`: a KVM virtual machine monitor whose guest memory lives in an RCU balanced tree, as a
//! library. The `vmm` binary (`main.rs`) is the command line on top of it; tests and embedders
//! build and run VMs through [`vm::Vm`] (build, start, wait) or [`vm::run`].
//!
//! | module | what |
//! |---|---|
//! | [`vm`] | building one VM, starting its threads, waiting for the run to end, tearing down |
//! | [`vcpu`] | one thread per vCPU: `KVM_RUN` and exit handling |
//! | [`memory`] | the address space (regions in an RCU tree), host memory, memslots, faults |
//! | [`efault`] | locating faults KVM reports without an address |
//! | [`devices`] | the UART, the hot-plug mailbox, the exit port |
//! | [`boot`] | the guest image, page tables, boot info, initial registers |
//! | [`kvm`] | the KVM device, memslots, vCPU state, kicks |
//! | [`control`] | the control socket: server, protocol, `vmm ctl` |
//! | [`snapshot`] | snapshots on disk and loading one for a restore |
//! | [`stress`] | `vmm stress`: fault storms under region churn |
//! | [`summarize`] | `vmm summarize`: Markdown tables from saved benchmark rows |
//! | [`cli`] | flag values shared by `vmm run` and `vmm stress` |
//! | [`inject`], [`size`], [`summary`] | fault injection, byte counts, run summaries |
//! | [`sched`] | the scheduling policy of the companion threads (`--control-sched`) |
#![deny(unsafe_code)]

pub mod boot;
pub mod cli;
pub mod control;
pub mod devices;
pub mod efault;
pub mod inject;
#[allow(unsafe_code)]
pub mod kvm;
pub mod memory;
pub mod sched;
pub mod size;
pub mod snapshot;
pub mod stress;
pub mod summarize;
pub mod summary;
pub mod vcpu;
pub mod vm;
