//! What the loop must look at when it wakes: the entries that may have a
//! run to queue, the earliest instant an entry changes by itself, and
//! whether any failed write waits for its retry.
//!
//! The loop wakes after every batch of runs that came back: hundreds of
//! times in a thousand bundles' start. Working these out by a pass over
//! every entry at each wake-up made the start quadratic (three passes of
//! a thousand entries, several hundred times). The loop instead notes
//! here which entry it marked and how an entry's next change moved, and
//! each wake-up costs what changed (ARCHITECTURE.md, "The event loop").
//! Debug builds check every answer against a pass over every entry, so
//! every daemon test checks it.

use std::collections::BTreeMap;

use tokio::time::Instant;

use super::{Dirty, Entry, Kind};

#[derive(Debug, Default)]
pub(super) struct Agenda {
    /// Entries marked dirty or given their target back since the last
    /// dispatch (an id may appear twice).
    marked: Vec<u64>,
    /// Every entry may be due: a change that touched them all.
    everyone: bool,
    /// The earliest `next_change` of all entries: `None` when it must be
    /// worked out again (the earliest one moved later, or entries went).
    expiry: Option<Option<i64>>,
    /// Some entry may hold a retry (cleared by a pass that finds none).
    retries: bool,
}

impl Agenda {
    /// Entry `id` was marked dirty, or its target came back.
    pub fn mark(&mut self, id: u64) {
        self.marked.push(id);
    }

    /// Every entry may be due, and every entry's times may have moved (a
    /// new configuration, a rescan).
    pub fn mark_everyone(&mut self) {
        self.everyone = true;
        self.marked.clear();
        self.expiry = None;
        self.retries = true;
    }

    /// The entries to queue, bundles first (a key pair may chain to a
    /// bundle about to change), each once: those with their target at
    /// home and something to read.
    pub fn due(&mut self, entries: &BTreeMap<u64, Entry>) -> Vec<u64> {
        let ready = |(id, e): (&u64, &Entry)| {
            (e.target.is_some() && e.dirty != Dirty::Clean).then_some((e.kind, *id))
        };
        let mut due: Vec<(Kind, u64)> = if std::mem::take(&mut self.everyone) {
            self.marked.clear();
            entries.iter().filter_map(ready).collect()
        } else {
            self.marked
                .drain(..)
                .filter_map(|id| entries.get_key_value(&id).and_then(ready))
                .collect()
        };
        due.sort_unstable();
        due.dedup();
        #[cfg(debug_assertions)]
        {
            let mut all: Vec<(Kind, u64)> = entries.iter().filter_map(ready).collect();
            all.sort_unstable();
            assert_eq!(due, all, "an entry was marked dirty without being noted");
        }
        due.into_iter().map(|(_, id)| id).collect()
    }

    /// Sets an entry's next change (`slot`) to `new`, noting how it moved.
    pub fn set_next_change(&mut self, slot: &mut Option<i64>, new: Option<i64>) {
        let old = std::mem::replace(slot, new);
        let Some(earliest) = self.expiry else {
            return;
        };
        if old.is_some() && old == earliest && new != old {
            // The earliest one moved: later, or gone, needs a pass.
            self.expiry = new.filter(|n| old.is_some_and(|o| *n < o)).map(Some);
        } else if let Some(n) = new
            && earliest.is_none_or(|e| n < e)
        {
            self.expiry = Some(Some(n));
        }
    }

    /// The earliest instant (unix seconds) an entry changes by itself.
    pub fn expiry_at(&mut self, entries: &BTreeMap<u64, Entry>) -> Option<i64> {
        let scan = || entries.values().filter_map(|e| e.next_change).min();
        let earliest = *self.expiry.get_or_insert_with(scan);
        debug_assert_eq!(earliest, scan(), "a next change moved without being noted");
        earliest
    }

    /// A failed write was given a retry.
    pub fn retry_set(&mut self) {
        self.retries = true;
    }

    /// When the next retry is due. Only an idle, clean entry waits for its
    /// retry: once marked or running, the retry is under way.
    pub fn retry_at(&mut self, entries: &BTreeMap<u64, Entry>) -> Option<Instant> {
        if !self.retries {
            debug_assert!(entries.values().all(|e| e.retry.is_none()));
            return None;
        }
        self.retries = entries.values().any(|e| e.retry.is_some());
        entries
            .values()
            .filter(|e| e.target.is_some() && e.dirty == Dirty::Clean)
            .filter_map(|e| e.retry.map(|(at, _)| at))
            .min()
    }
}
