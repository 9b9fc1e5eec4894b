//! Event delivery to the clients that subscribed (`subscribe`).
//!
//! Whoever makes an event (the client thread that ran a map, unmap or protect, under the
//! ops lock; the acceptor when the run ends) calls [`Hub::publish`], which serialises the
//! line once and pushes it onto the queue of every subscriber that wants its kind. Pushing
//! never blocks on a socket: each subscriber's queue holds at most [`QUEUE_LINES`] lines, and
//! events that find it full are dropped and counted. The subscriber's own client thread,
//! woken through a socket pair, writes the queued lines between replies (so an event line is
//! never interleaved inside another line), followed by one `events_dropped` line with the
//! count if any were dropped. A subscriber that stops reading therefore only ever blocks its
//! own thread, and is disconnected by the usual write timeout.
#![deny(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::protocol::{Event, EventKind};

/// Event lines a subscriber's queue holds; more are dropped (and counted) until its client
/// thread has written some.
pub const QUEUE_LINES: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The set of subscribers and the event counter.
#[derive(Debug, Default)]
pub struct Hub {
    subscribers: Mutex<Vec<Weak<Subscriber>>>,
    /// The last event number given.
    seq: AtomicU64,
    /// Events dropped across subscribers (queues full).
    dropped: AtomicU64,
}

/// One subscribed connection's queue.
#[derive(Debug)]
pub struct Subscriber {
    /// Bits of the [`EventKind`]s wanted.
    kinds: AtomicU32,
    queue: Mutex<Queue>,
    /// Written (one byte, non-blocking) when a line is queued.
    wake_tx: UnixStream,
    /// Polled by the client thread beside its socket.
    wake_rx: UnixStream,
}

#[derive(Debug, Default)]
struct Queue {
    lines: VecDeque<String>,
    dropped: u64,
}

/// The bit set of `kinds` (all kinds when `None`).
pub fn kind_bits(kinds: Option<&[EventKind]>) -> u32 {
    kinds.map_or_else(
        || EventKind::ALL.iter().map(|k| k.bit()).sum(),
        |ks| ks.iter().fold(0, |b, k| b | k.bit()),
    )
}

/// The kinds in a bit set, in the documented order.
pub fn kinds_of(bits: u32) -> Vec<EventKind> {
    EventKind::ALL
        .into_iter()
        .filter(|k| bits & k.bit() != 0)
        .collect()
}

impl Hub {
    /// A new subscriber for the kinds in `bits`.
    pub fn subscribe(&self, bits: u32) -> io::Result<Arc<Subscriber>> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let s = Arc::new(Subscriber {
            kinds: AtomicU32::new(bits),
            queue: Mutex::new(Queue::default()),
            wake_tx,
            wake_rx,
        });
        let mut subs = lock(&self.subscribers);
        subs.retain(|w| w.strong_count() > 0);
        subs.push(Arc::downgrade(&s));
        Ok(s)
    }

    /// Subscribers connected now.
    pub fn subscribers(&self) -> usize {
        lock(&self.subscribers)
            .iter()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    /// Events dropped so far because a subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Numbers the event `make` builds and queues it for every subscriber that wants `kind`.
    /// Never blocks on a client.
    pub fn publish(&self, kind: EventKind, make: impl FnOnce(u64) -> Event) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let mut subs = lock(&self.subscribers);
        subs.retain(|w| w.strong_count() > 0);
        let wanting: Vec<Arc<Subscriber>> = subs
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|s| s.kinds.load(Ordering::Relaxed) & kind.bit() != 0)
            .collect();
        drop(subs);
        if wanting.is_empty() {
            return;
        }
        let line = make(seq).line();
        for s in wanting {
            if !s.push(&line) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Subscriber {
    /// Replaces the kinds wanted.
    pub fn set_kinds(&self, bits: u32) {
        self.kinds.store(bits, Ordering::Relaxed);
    }

    /// The socket the client thread polls to learn that lines are queued.
    pub fn wake(&self) -> &UnixStream {
        &self.wake_rx
    }

    /// Queues `line`; false (and counted) if the queue is full.
    fn push(&self, line: &str) -> bool {
        let mut q = lock(&self.queue);
        let queued = q.lines.len() < QUEUE_LINES;
        if queued {
            q.lines.push_back(line.to_owned());
        } else {
            q.dropped += 1;
        }
        drop(q);
        // Full: a wake byte is already pending, which is all that is needed.
        let _ = (&self.wake_tx).write(&[1]);
        queued
    }

    /// Takes every queued line, and a final `events_dropped` line if any were dropped.
    pub fn take(&self) -> Vec<String> {
        let mut buf = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
        let mut q = lock(&self.queue);
        let mut out: Vec<String> = q.lines.drain(..).collect();
        if q.dropped > 0 {
            out.push(Event::EventsDropped { count: q.dropped }.line());
            q.dropped = 0;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::Event;

    fn ev(seq: u64) -> Event {
        Event::GuestExited {
            seq,
            guest: Default::default(),
        }
    }

    #[test]
    fn subscribers_get_the_kinds_they_asked_for_in_order_and_overflow_is_counted() {
        let hub = Hub::default();
        let all = hub.subscribe(kind_bits(None)).unwrap();
        let mapped = hub
            .subscribe(kind_bits(Some(&[EventKind::Mapped])))
            .unwrap();
        for _ in 0..3 {
            hub.publish(EventKind::GuestExited, ev);
        }
        let got = all.take();
        assert_eq!(got.len(), 3);
        for (i, l) in got.iter().enumerate() {
            assert_eq!(serde_json::from_str::<Event>(l).unwrap(), ev(i as u64 + 1));
        }
        assert!(mapped.take().is_empty());
        assert!(all.take().is_empty(), "taken once");
        // Overflow: the queue keeps the oldest lines and counts the rest.
        for _ in 0..QUEUE_LINES + 5 {
            hub.publish(EventKind::GuestExited, ev);
        }
        let got = all.take();
        assert_eq!(got.len(), QUEUE_LINES + 1);
        assert_eq!(
            got.last().unwrap(),
            r#"{"event":"events_dropped","count":5}"#
        );
        assert_eq!(hub.dropped(), 5);
        assert_eq!(hub.subscribers(), 2);
        drop(mapped);
        assert_eq!(hub.subscribers(), 1);
        all.set_kinds(0);
        hub.publish(EventKind::GuestExited, ev);
        assert!(all.take().is_empty());
        assert_eq!(kinds_of(kind_bits(None)), EventKind::ALL.to_vec());
    }
}
