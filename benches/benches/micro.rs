//! criterion micro-benchmarks for Tessera's pure parts; the operations and
//! inputs are defined once in `tessera_benches::catalog` (shared with the
//! callgrind driver `icount`).
//!
//! ```sh
//! cargo bench -p tessera-benches --bench micro                 # ~1.5 min
//! cargo bench -p tessera-benches --bench micro -- --quick      # quick
//! cargo bench -p tessera-benches --bench micro -- svid/        # one group
//! cargo run --release -q -p tessera-benches --bin icount -- criterion-table   # medians
//! ```
//!
//! The SVID operations use the real wall clock (`SystemClock`), as the agent
//! does; `icount` uses a fixed one.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tessera_agent::clock::SystemClock;
use tessera_benches::catalog;

fn benches(c: &mut Criterion) {
    let ops = catalog();
    let mut groups: Vec<&'static str> = Vec::new();
    for op in &ops {
        if !groups.contains(&op.group) {
            groups.push(op.group);
        }
    }
    for group_name in groups {
        let mut group = c.benchmark_group(group_name);
        for op in ops.iter().filter(|op| op.group == group_name) {
            let mut prepared = op.prepare(Arc::new(SystemClock));
            if let Some(bytes) = prepared.bytes {
                group.throughput(Throughput::Bytes(bytes));
            }
            group.bench_function(op.param.as_str(), |b| b.iter(&mut prepared.run));
        }
        group.finish();
    }
}

criterion_group! {
    name = micro;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(micro);
