//! The values of the command-line flags that `vmm run` and `vmm stress` share (clap
//! `ValueEnum`s and parsers), and their conversions into the types the VM is built from.
#![deny(unsafe_code)]

use clap::ValueEnum;

use crate::memory;

/// How first touches are serviced (`--fault-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FaultMode {
    Vcpu,
    Handler,
    Kernel,
}

impl From<FaultMode> for memory::FaultMode {
    fn from(m: FaultMode) -> Self {
        match m {
            FaultMode::Vcpu => memory::FaultMode::Vcpu,
            FaultMode::Handler => memory::FaultMode::Handler,
            FaultMode::Kernel => memory::FaultMode::Kernel,
        }
    }
}

/// What backs guest RAM (`--ram-backing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RamBacking {
    /// Private anonymous memory.
    Anon,
    /// A memfd (shared memory).
    Memfd,
    /// 2 MiB huge pages (hugetlbfs memfd): needs free huge pages and 2 MiB-aligned RAM.
    Hugetlb,
}

/// How guest memory is laid onto KVM memslots (`--memslots`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Memslots {
    /// A few long-lived memslots: boot RAM's and one hot-plug window; map, unmap, split and
    /// protect change only the tree and the host mappings.
    Window,
    /// One memslot per region, installed and deleted with it.
    PerRegion,
}

/// How the VMM's companion threads (control socket, stress churn) are scheduled
/// (`--control-sched`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ControlSched {
    /// SCHED_BATCH: they never preempt a vCPU when they wake; they run at the scheduler's next
    /// pick instead.
    Batch,
    /// The normal policy: a wake-up may preempt the vCPU on that CPU.
    Normal,
    /// batch while the vCPUs exit rarely (under 4000 times a second each), normal otherwise,
    /// measured again at each operation (the default).
    Auto,
}

impl From<ControlSched> for crate::sched::ControlSched {
    fn from(c: ControlSched) -> Self {
        match c {
            ControlSched::Batch => crate::sched::ControlSched::Batch,
            ControlSched::Normal => crate::sched::ControlSched::Normal,
            ControlSched::Auto => crate::sched::ControlSched::Auto,
        }
    }
}

impl From<Memslots> for memory::MemslotMode {
    fn from(m: Memslots) -> Self {
        match m {
            Memslots::Window => memory::MemslotMode::Window,
            Memslots::PerRegion => memory::MemslotMode::PerRegion,
        }
    }
}

impl From<RamBacking> for memory::Backing {
    fn from(b: RamBacking) -> Self {
        match b {
            RamBacking::Anon => memory::Backing::Anon,
            RamBacking::Memfd => memory::Backing::Memfd,
            RamBacking::Hugetlb => memory::Backing::Hugetlb,
        }
    }
}

/// The address-space implementation (`--address-space`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AddressSpace {
    Bonsai,
    Rwlock,
    Cow,
}

impl From<AddressSpace> for memory::AddressSpaceKind {
    fn from(a: AddressSpace) -> Self {
        match a {
            AddressSpace::Bonsai => memory::AddressSpaceKind::Bonsai,
            AddressSpace::Rwlock => memory::AddressSpaceKind::Rwlock,
            AddressSpace::Cow => memory::AddressSpaceKind::Cow,
        }
    }
}

/// Parses `--fault-around` (see [`memory::FaultAround::parse`]).
pub fn parse_fault_around(s: &str) -> Result<memory::FaultAround, String> {
    memory::FaultAround::parse(s)
}

/// `--pattern`: how the `touch` workload orders its first touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Page 0, 1, 2, …
    Sequential,
    /// The last page first.
    Reverse,
    /// Every N-th page.
    Stride(u64),
    /// A random permutation.
    Random,
    /// 90 % of accesses to 10 % of the pages.
    Hotcold,
}

impl Pattern {
    /// Parses a `--pattern` value.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "sequential" => Pattern::Sequential,
            "reverse" => Pattern::Reverse,
            "random" => Pattern::Random,
            "hotcold" => Pattern::Hotcold,
            _ => match s.strip_prefix("stride:").map(str::parse::<u64>) {
                Some(Ok(n)) if (1..=1 << 20).contains(&n) => Pattern::Stride(n),
                _ => {
                    return Err(format!(
                        "{s:?}: expected sequential, reverse, stride:N (N from 1 to 1048576), \
                         random or hotcold"
                    ))
                }
            },
        })
    }

    /// The name as given on the command line.
    pub fn name(self) -> String {
        match self {
            Pattern::Sequential => "sequential".into(),
            Pattern::Reverse => "reverse".into(),
            Pattern::Stride(n) => format!("stride:{n}"),
            Pattern::Random => "random".into(),
            Pattern::Hotcold => "hotcold".into(),
        }
    }

    /// `params[3..6]` of the `touch` workload: pattern id, argument, seed.
    pub fn params(self, seed: u64) -> [u64; 3] {
        use abi::pattern as p;
        match self {
            Pattern::Sequential => [p::SEQUENTIAL, 0, seed],
            Pattern::Reverse => [p::REVERSE, 0, seed],
            Pattern::Stride(n) => [p::STRIDE, n, seed],
            Pattern::Random => [p::RANDOM, 0, seed],
            Pattern::Hotcold => [p::HOTCOLD, 0, seed],
        }
    }
}
