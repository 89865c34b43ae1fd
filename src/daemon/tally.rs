//! What the status line counts, kept as entries change.
//!
//! The status (`/readyz`, systemd's `STATUS=`) is refreshed after every
//! batch of runs. Counting all entries each time made a start of a
//! thousand bundles quadratic: a thousand runs, each batch a pass over a
//! thousand entries. The loop instead tells the tally how an entry stood
//! before and after each change (ARCHITECTURE.md, "The event loop").

use std::collections::BTreeSet;

/// Where a bundle stands, as the status line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Rendered,
    Refused,
    /// Not rendered yet.
    Pending,
}

/// An entry's part in the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Standing {
    /// Its first run has not finished.
    pub first_run: bool,
    /// A bundle: its state, and whether it was ever rendered. `None` for a
    /// key pair.
    pub bundle: Option<(State, bool)>,
}

/// The counts behind the status line.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Tally {
    first_runs: usize,
    bundles: usize,
    never_rendered: usize,
    refused: usize,
    pending: usize,
    /// The bundles refused or not rendered, by entry id (configuration
    /// order): the first few are named.
    unsettled: BTreeSet<u64>,
}

impl Tally {
    /// Entry `id` stood as `before` (`None`: it was not there) and stands
    /// as `after` now (`None`: it is gone).
    pub fn change(&mut self, id: u64, before: Option<Standing>, after: Option<Standing>) {
        if before == after {
            return;
        }
        if let Some(standing) = before {
            self.count(id, standing, false);
        }
        if let Some(standing) = after {
            self.count(id, standing, true);
        }
    }

    fn count(&mut self, id: u64, standing: Standing, add: bool) {
        let step = |n: &mut usize| {
            if add {
                *n += 1;
            } else {
                *n -= 1;
            }
        };
        if standing.first_run {
            step(&mut self.first_runs);
        }
        let Some((state, ever_rendered)) = standing.bundle else {
            return;
        };
        step(&mut self.bundles);
        if !ever_rendered {
            step(&mut self.never_rendered);
        }
        match state {
            State::Rendered => return,
            State::Refused => step(&mut self.refused),
            State::Pending => step(&mut self.pending),
        }
        if add {
            self.unsettled.insert(id);
        } else {
            self.unsettled.remove(&id);
        }
    }

    /// Every entry's first run has finished.
    pub fn started(&self) -> bool {
        self.first_runs == 0
    }

    /// Every bundle was rendered at least once.
    pub fn ready(&self) -> bool {
        self.never_rendered == 0
    }

    pub fn bundles(&self) -> usize {
        self.bundles
    }

    /// Rendered, refused, not rendered.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.bundles - self.refused - self.pending,
            self.refused,
            self.pending,
        )
    }

    /// The bundles refused or not rendered, in configuration order.
    pub fn unsettled(&self) -> impl Iterator<Item = u64> + '_ {
        self.unsettled.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PENDING: Standing = Standing {
        first_run: true,
        bundle: Some((State::Pending, false)),
    };
    const RENDERED: Standing = Standing {
        first_run: false,
        bundle: Some((State::Rendered, true)),
    };
    const REFUSED_AFTER_RENDER: Standing = Standing {
        first_run: false,
        bundle: Some((State::Refused, true)),
    };
    const KEY_PAIR: Standing = Standing {
        first_run: true,
        bundle: None,
    };

    #[test]
    fn counts_follow_each_entry_from_start_to_removal() {
        let mut tally = Tally::default();
        for id in 0..3 {
            tally.change(id, None, Some(PENDING));
        }
        tally.change(3, None, Some(KEY_PAIR));
        assert!(!tally.started() && !tally.ready());
        assert_eq!(tally.counts(), (0, 0, 3));
        assert_eq!(tally.unsettled().collect::<Vec<_>>(), [0, 1, 2]);

        tally.change(1, Some(PENDING), Some(RENDERED));
        tally.change(0, Some(PENDING), Some(RENDERED));
        tally.change(
            3,
            Some(KEY_PAIR),
            Some(Standing {
                first_run: false,
                bundle: None,
            }),
        );
        assert_eq!(tally.counts(), (2, 0, 1));
        assert_eq!(tally.unsettled().collect::<Vec<_>>(), [2]);
        assert!(!tally.started(), "bundle 2 has not run");

        tally.change(2, Some(PENDING), Some(RENDERED));
        assert!(tally.started() && tally.ready());

        // Refused after a render: still ready (it was rendered once), named.
        tally.change(1, Some(RENDERED), Some(REFUSED_AFTER_RENDER));
        assert!(tally.ready());
        assert_eq!(tally.counts(), (2, 1, 0));
        assert_eq!(tally.unsettled().collect::<Vec<_>>(), [1]);

        // Removed (SIGHUP): gone from every count.
        tally.change(1, Some(REFUSED_AFTER_RENDER), None);
        assert_eq!(tally.bundles(), 2);
        assert_eq!(tally.counts(), (2, 0, 0));
        assert_eq!(tally.unsettled().count(), 0);

        // A bundle added later holds readiness back again.
        tally.change(9, None, Some(PENDING));
        assert!(!tally.ready() && !tally.started());
    }
}
