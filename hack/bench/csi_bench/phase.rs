//! A timed phase: latencies, error codes, and the report every workload prints.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tonic::{Code, Status};

/// Latencies and error codes of one phase.
#[derive(Default)]
pub struct Phase {
    pub name: String,
    pub latencies: Vec<Duration>,
    pub errors: BTreeMap<String, usize>,
    pub wall: Duration,
    /// Codes a correct driver may answer in this phase (e.g. ABORTED for
    /// an operation already pending on the same volume); any other fails the run.
    pub expected: Vec<Code>,
    /// The first message seen for each code, to say why a run failed.
    first_error: BTreeMap<String, String>,
}

impl Phase {
    pub fn new(name: &str) -> Phase {
        Phase {
            name: name.to_owned(),
            ..Default::default()
        }
    }

    /// Counts one failed call.
    pub fn record_error(&mut self, status: &Status) {
        let code = format!("{:?}", status.code());
        *self.errors.entry(code.clone()).or_default() += 1;
        self.first_error
            .entry(code)
            .or_insert_with(|| status.message().to_owned());
    }

    /// Folds another part of the same phase (another task's calls) in.
    pub fn absorb(&mut self, other: Phase) {
        self.latencies.extend(other.latencies);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.first_error {
            self.first_error.entry(k).or_insert(v);
        }
    }

    /// Errors no correct driver should have answered here, one line each.
    pub fn unexpected(&self) -> Vec<String> {
        self.first_error
            .iter()
            .filter(|(code, _)| !self.expected.iter().any(|c| format!("{c:?}") == **code))
            .map(|(code, msg)| {
                format!(
                    "phase {}: {} x {code} (first: {msg})",
                    self.name, self.errors[code]
                )
            })
            .collect()
    }

    pub fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let mut v = self.latencies.clone();
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i].as_secs_f64() * 1000.0
    }

    pub fn ops_per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "phase": self.name,
            "ops": self.latencies.len(),
            "ops_per_sec": (self.ops_per_sec() * 10.0).round() / 10.0,
            "p50_ms": self.percentile(0.50),
            "p99_ms": self.percentile(0.99),
            "max_ms": self.percentile(1.0),
            "errors": self.errors,
        })
    }

    pub fn row(&self) -> String {
        format!(
            "{:<18} {:>7} {:>11.1} {:>9.3} {:>9.3} {:>9.3}  {:?}",
            self.name,
            self.latencies.len(),
            self.ops_per_sec(),
            self.percentile(0.5),
            self.percentile(0.99),
            self.percentile(1.0),
            self.errors
        )
    }
}

/// Runs `op(i)` for i in 0..n with `concurrency` tasks, timing each call;
/// returns the phase and each call's output (None where it failed).
pub async fn run_phase<T, F, Fut>(
    name: &str,
    n: usize,
    concurrency: usize,
    op: F,
) -> (Phase, Vec<Option<T>>)
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, Status>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut part = Phase::default();
            let mut outputs = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                let r = op(i).await;
                part.latencies.push(t.elapsed());
                match r {
                    Ok(v) => outputs.push((i, v)),
                    Err(s) => part.record_error(&s),
                }
            }
            (part, outputs)
        }));
    }
    let mut phase = Phase::new(name);
    let mut outputs: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for t in tasks {
        let (part, outs) = t.await.expect("bench task");
        phase.absorb(part);
        for (i, v) in outs {
            outputs[i] = Some(v);
        }
    }
    phase.wall = started.elapsed();
    (phase, outputs)
}

/// Prints one JSON line on stdout and a human table on stderr.
pub fn report(workload: &str, phases: &[Phase], extra: serde_json::Value) {
    let line = json!({
        "workload": workload,
        "phases": phases.iter().map(Phase::json).collect::<Vec<_>>(),
        "extra": extra,
    });
    println!("{line}");
    eprintln!(
        "{:<18} {:>7} {:>11} {:>9} {:>9} {:>9}  errors",
        "phase", "ops", "ops/s", "p50 ms", "p99 ms", "max ms"
    );
    for p in phases {
        eprintln!("{}", p.row());
    }
    // The driver's own phases (not the baselines) used the measured CPU.
    let driver_ops: usize = phases
        .iter()
        .filter(|p| !p.name.starts_with("baseline"))
        .map(|p| p.latencies.len())
        .sum();
    let per_op = |key: &str| {
        extra[key].as_f64().map(|s| {
            format!(
                "{s:.2} s ({:.0} µs per timed op)",
                s * 1e6 / driver_ops.max(1) as f64
            )
        })
    };
    if let Some(client) = per_op("client_cpu_s") {
        let driver = per_op("driver_cpu_s").unwrap_or_else(|| "unknown (no --pid)".into());
        eprintln!("CPU: client {client}, driver {driver}");
    }
    for (key, label) in [
        ("driver_idle_rss_kib", "idle"),
        ("driver_peak_rss_kib", "peak"),
    ] {
        if let Some(kib) = extra[key].as_u64().filter(|k| *k > 0) {
            eprintln!("driver RSS {label}: {:.1} MiB", kib as f64 / 1024.0);
        }
    }
}
