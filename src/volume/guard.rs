//! The one operation guard. Every operation that touches a volume, a
//! snapshot or a group snapshot holds a guard on it for as long as it runs:
//! controller and node RPCs alike, and the source of a clone or snapshot.
//!
//! Three ways to hold an object:
//! - `Read`: its content is being read (the source of a clone, snapshot or
//!   restore). Any number at once; a publish may run beside them.
//! - `Node`: node work on it (stage, publish, unpublish, unstage, node
//!   expansion). One at a time, so attach/detach decisions and the
//!   single-writer check are made on a settled state; beside readers.
//! - `Write`: it is being created, deleted, resized or changed. Alone.
//!
//! A request that conflicts gets ABORTED, as the CSI spec suggests, after
//! a short wait for node work (which takes milliseconds). Nothing is ever
//! done half-guarded.
//!
//! While crash recovery of an interrupted run is under way (at start-up,
//! or when a pool becomes ready later), requests wait for it before they
//! take a guard: no request acts on a state recovery is about to change
//! (an unacknowledged expansion it will undo). Only the recovery thread
//! takes guards meanwhile.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{CoreError, CoreResult, Object};

/// How an object is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Node,
    Write,
}

/// How long node work waits for other node work on the same volume.
const NODE_WAIT: Duration = Duration::from_secs(3);

/// How long a request waits for crash recovery before it is UNAVAILABLE.
const RECOVERY_WAIT: Duration = Duration::from_secs(30);

thread_local! {
    /// Set on the thread that runs crash recovery: it takes guards while
    /// recovery is under way.
    static RECOVERING_THREAD: Cell<bool> = const { Cell::new(false) };
}

#[derive(Debug, Default)]
struct Holders {
    readers: u32,
    node: bool,
    writer: bool,
}

impl Holders {
    fn admits(&self, access: Access) -> bool {
        match access {
            Access::Read => !self.writer,
            Access::Node => !self.writer && !self.node,
            Access::Write => !self.writer && !self.node && self.readers == 0,
        }
    }

    fn take(&mut self, access: Access) {
        match access {
            Access::Read => self.readers += 1,
            Access::Node => self.node = true,
            Access::Write => self.writer = true,
        }
    }

    fn give_back(&mut self, access: Access) {
        match access {
            Access::Read => self.readers -= 1,
            Access::Node => self.node = false,
            Access::Write => self.writer = false,
        }
    }

    fn is_free(&self) -> bool {
        self.readers == 0 && !self.node && !self.writer
    }
}

type Key = (Object, String);

#[derive(Debug, Default)]
pub struct Guards {
    held: Mutex<HashMap<Key, Holders>>,
    released: Condvar,
    /// Recoveries under way.
    recoveries: Mutex<u32>,
    recovered: Condvar,
}

/// An object held; dropping it lets go.
#[must_use = "the guard protects the object only while it is held"]
pub struct Guard<'a> {
    guards: &'a Guards,
    key: Key,
    access: Access,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let mut held = self.guards.held.lock().unwrap();
        if let Some(h) = held.get_mut(&self.key) {
            h.give_back(self.access);
            if h.is_free() {
                held.remove(&self.key);
            }
        }
        drop(held);
        self.guards.released.notify_all();
    }
}

impl Guards {
    /// Holds `kind` `id` with `access`, or says it is busy.
    pub fn acquire(&self, kind: Object, id: &str, access: Access) -> CoreResult<Guard<'_>> {
        if !RECOVERING_THREAD.with(Cell::get) {
            self.wait_for_recovery()?;
        }
        let key = (kind, id.to_owned());
        let deadline = Instant::now()
            + if access == Access::Node {
                NODE_WAIT
            } else {
                Duration::ZERO
            };
        let mut held = self.held.lock().unwrap();
        loop {
            let h = held.entry(key.clone()).or_default();
            if h.admits(access) {
                h.take(access);
                return Ok(Guard {
                    guards: self,
                    key,
                    access,
                });
            }
            // Only node work waits, and only for other node work.
            let waiting_helps = access == Access::Node && !h.writer;
            let now = Instant::now();
            if !waiting_helps || now >= deadline {
                if h.is_free() {
                    held.remove(&key);
                }
                return Err(CoreError::Busy {
                    kind,
                    id: id.to_owned(),
                });
            }
            held = self.released.wait_timeout(held, deadline - now).unwrap().0;
        }
    }

    /// Marks a recovery as under way. Call it before the recovery thread
    /// starts, so no request slips in; `recovery_ended` once it is done.
    pub fn recovery_began(&self) {
        *self.recoveries.lock().unwrap() += 1;
    }

    pub fn recovery_ended(&self) {
        let mut n = self.recoveries.lock().unwrap();
        *n = n.saturating_sub(1);
        self.recovered.notify_all();
    }

    /// Runs `f` as the recovery thread: its guards do not wait for recovery.
    pub fn as_recovery<R>(f: impl FnOnce() -> R) -> R {
        RECOVERING_THREAD.with(|r| r.set(true));
        let out = f();
        RECOVERING_THREAD.with(|r| r.set(false));
        out
    }

    fn wait_for_recovery(&self) -> CoreResult<()> {
        let n = self.recoveries.lock().unwrap();
        let (n, timeout) = self
            .recovered
            .wait_timeout_while(n, RECOVERY_WAIT, |n| *n > 0)
            .unwrap();
        if timeout.timed_out() && *n > 0 {
            return Err(CoreError::Recovering);
        }
        Ok(())
    }

    /// Holds every object of `ids` (deduplicated, in a fixed order, so two
    /// multi-object operations never deadlock), or none.
    pub fn acquire_all<'a>(
        &'a self,
        kind: Object,
        ids: &[String],
        access: Access,
    ) -> CoreResult<Vec<Guard<'a>>> {
        let mut sorted: Vec<&String> = ids.iter().collect();
        sorted.sort();
        sorted.dedup();
        sorted
            .into_iter()
            .map(|id| self.acquire(kind, id, access))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_wait_for_recovery_and_the_recovery_thread_does_not() {
        let g = std::sync::Arc::new(Guards::default());
        g.recovery_began();
        Guards::as_recovery(|| {
            let _held = g.acquire(Object::Volume, "r", Access::Write).unwrap();
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let g = g.clone();
            std::thread::spawn(move || {
                let ok = g.acquire(Object::Volume, "v", Access::Write).is_ok();
                tx.send(ok).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a request went ahead of recovery"
        );
        g.recovery_ended();
        assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
        waiter.join().unwrap();
    }

    #[test]
    fn readers_share_writers_exclude_node_work_serialises() {
        let g = Guards::default();
        let r1 = g.acquire(Object::Volume, "v", Access::Read).unwrap();
        let _r2 = g.acquire(Object::Volume, "v", Access::Read).unwrap();
        assert!(matches!(
            g.acquire(Object::Volume, "v", Access::Write),
            Err(CoreError::Busy { .. })
        ));
        let n = g.acquire(Object::Volume, "v", Access::Node).unwrap();
        drop(r1);
        drop(_r2);
        assert!(g.acquire(Object::Volume, "v", Access::Write).is_err());
        drop(n);
        let w = g.acquire(Object::Volume, "v", Access::Write).unwrap();
        assert!(g.acquire(Object::Volume, "v", Access::Read).is_err());
        assert!(
            g.acquire(Object::Snapshot, "v", Access::Write).is_ok(),
            "kinds are separate"
        );
        drop(w);
        assert!(
            g.held.lock().unwrap().is_empty(),
            "released entries are forgotten"
        );
    }

    #[test]
    fn node_work_waits_for_node_work() {
        let g = std::sync::Arc::new(Guards::default());
        let first = g.acquire(Object::Volume, "v", Access::Node).unwrap();
        let g2 = g.clone();
        let waiter = std::thread::spawn(move || {
            g2.acquire(Object::Volume, "v", Access::Node)
                .map(drop)
                .is_ok()
        });
        std::thread::sleep(Duration::from_millis(50));
        drop(first);
        assert!(waiter.join().unwrap());
    }
}
