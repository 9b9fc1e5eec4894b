//! Userspace read-copy-update of the QSBR flavour, with the RCU rules checked by the compiler.
//!
//! - A [`Domain`] holds the grace-period state; [`Domain::global`] is the process-wide one.
//! - A thread [`register`](Domain::register)s and gets a [`Reader`] (`!Send`). Its
//!   [`read`](Reader::read) returns a [`ReadGuard`] that costs nothing to take or drop;
//!   references loaded under it live no longer than it. [`Reader::quiescent_state`],
//!   [`Reader::offline_while`] and [`Reader::synchronize`] take the reader mutably (and
//!   [`Reader::offline`] by value), so no reference survives them: that misuse is a compile
//!   error, not a use-after-free.
//! - [`RcuCell`] is a published pointer: loads need a guard, stores retire the old value.
//! - Writers call [`Domain::synchronize`] to wait for a grace period, or retire objects with
//!   [`Domain::defer_drop`] / [`Domain::defer`] for batched reclamation after a grace period
//!   (on a background thread, or on whichever thread drains the queue first), with
//!   back-pressure past [`Config::max_backlog`]; [`Domain::barrier`] waits for it all.
//! - A grace period held up for longer than [`Config::stall_timeout`] by readers that stay
//!   online without announcing quiescent states issues a stall warning naming their threads
//!   ([`StallReport`], [`Domain::set_stall_hook`]).
//!
//! ```
//! use rcu::{Domain, RcuCell};
//! use std::sync::Arc;
//!
//! let domain = Domain::new();
//! let current = Arc::new(RcuCell::new(&domain, 0u64));
//! let reader_thread = {
//!     let (domain, current) = (domain.clone(), current.clone());
//!     std::thread::spawn(move || {
//!         let mut reader = domain.register();
//!         for _ in 0..1000 {
//!             let guard = reader.read();
//!             let v = *current.load(&guard).unwrap();
//!             assert!(v < 100);
//!             drop(guard);
//!             reader.quiescent_state();
//!         }
//!     })
//! };
//! for v in 1..100 {
//!     current.store(Some(v));
//! }
//! reader_thread.join().unwrap();
//! domain.barrier();
//! assert_eq!(domain.stats().backlog, 0);
//! ```
#![deny(missing_docs)]

#[cfg(feature = "baselines")]
pub mod baselines;
pub mod bonsai;
mod cell;
mod chunks;
mod domain;
pub mod range_map;
mod reader;
mod reclaim;
mod stall;
mod stats;
mod sync;

pub use bonsai::BonsaiTree;
pub use cell::RcuCell;
pub use domain::{Config, Domain};
pub use range_map::{ConcurrentRangeMap, RangeError, RangeMap, RangeValue};
pub use reader::{OfflineReader, ReadGuard, Reader};
pub use stall::{StallReport, StalledReader};
pub use stats::{LatencyHistogram, Stats};
