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
        let parts: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|part| {
                part.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_the_order_of_a_large_batch() {
        let items: Vec<u32> = (0..10_000).collect();
        let doubled = super::map(&items, |i| i * 2);
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
    }
}
