//! Shared by the benchmarks: the median time of one call.

use std::time::Instant;

/// Runs `call` in `batches` timed batches of `batch` calls (after one
/// untimed warm-up batch) and returns the median batch time divided by
/// `batch`, in seconds. Medians, because this machine is shared and noisy.
pub fn median_per_call(batch: usize, batches: usize, mut call: impl FnMut()) -> f64 {
    for _ in 0..batch {
        call();
    }
    let mut times: Vec<f64> = (0..batches)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..batch {
                call();
            }
            started.elapsed().as_secs_f64() / batch as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[batches / 2]
}
