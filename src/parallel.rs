//! Splitting a large batch (thousands of files or certificates) across the
//! machine's cores with scoped threads. Small batches (every ordinary
//! bundle) stay on the calling thread: a thread costs more than they do.

use std::num::NonZeroUsize;

/// Below this many items, one thread does it all.
const MIN_BATCH: usize = 512;
/// Trust stores do not need more.
const MAX_THREADS: usize = 4;

/// The cores this process may use, worked out once: the standard library
/// reads the cgroup's CPU quota from files on each call.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get))
}

fn threads_for(items: usize) -> usize {
    if items < MIN_BATCH {
        return 1;
    }
    cores().min(MAX_THREADS)
}

/// `items.iter().map(f).collect()`, in order, on up to four threads.
pub fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads_for(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        // A part that gets no thread (a process at its limit of threads, a
        // container at its limit of pids) is done here, in its turn: the
        // batch is slower, never lost, and a render does not panic.
        let parts: Vec<Part<'_, '_, T, R>> = items
            .chunks(chunk)
            .map(
                |part| match spawn(scope, move || part.iter().map(f).collect()) {
                    Ok(thread) => Part::Thread(thread),
                    Err(_) => Part::Here(part),
                },
            )
            .collect();
        parts
            .into_iter()
            .flat_map(|part| match part {
                Part::Thread(thread) => thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Part::Here(part) => part.iter().map(f).collect(),
            })
            .collect()
    })
}

/// One part of a batch: on a thread of its own, or left for the caller.
enum Part<'scope, 'a, T, R> {
    Thread(std::thread::ScopedJoinHandle<'scope, Vec<R>>),
    Here(&'a [T]),
}

fn spawn<'scope, R: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    work: impl FnOnce() -> Vec<R> + Send + 'scope,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, Vec<R>>> {
    #[cfg(test)]
    if tests::REFUSED.with(std::cell::Cell::get) {
        return Err(std::io::Error::other("no thread (test)"));
    }
    std::thread::Builder::new().spawn_scoped(scope, work)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    thread_local! {
        /// Set by a test: every thread asked for is refused.
        pub(super) static REFUSED: Cell<bool> = const { Cell::new(false) };
    }

    #[test]
    fn keeps_the_order_of_a_large_batch() {
        let items: Vec<u32> = (0..10_000).collect();
        let doubled = super::map(&items, |i| i * 2);
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn a_batch_without_threads_is_done_by_the_caller() {
        let items: Vec<u32> = (0..10_000).collect();
        REFUSED.with(|r| r.set(true));
        let caller = std::thread::current().id();
        let done = super::map(&items, |i| (i * 2, std::thread::current().id()));
        REFUSED.with(|r| r.set(false));
        assert_eq!(
            done.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            items.iter().map(|i| i * 2).collect::<Vec<_>>()
        );
        assert!(done.iter().all(|(_, id)| *id == caller));
    }
}
