//! In-process cost of one WebAssembly script run: a fresh store, instantiate,
//! and a call of `handle`, measured with a plain timing loop.
//!
//! Variants, run interleaved in chunks (A B C A B C …) so the machine's drift
//! spreads over all of them:
//!
//! - `host, awaited on a worker`: the real code path,
//!   `kvdb::script::wasm::WasmRuntime::run` (the pooled allocator, the cached
//!   `ScriptPre`, a fresh store with fuel, limits and an epoch deadline, WASI
//!   made only at the guest's first WASI call (the hello guest makes none),
//!   an async call on a fiber, output capture, response checks), on a bucket
//!   of an in-memory store, awaited in a task on a tokio worker as the HTTP
//!   handler awaits it. Also builds the run's `Host` (a scoped bucket) and
//!   the request, as the handler does.
//! - `mirror pooled`: the same steps against public wasmtime APIs, with the
//!   engine configuration of host/src/script/wasm/mod.rs copied (see
//!   [`config`]), and the kvdb:script imports defined as traps (the hello
//!   guest calls none); a synchronous call, on the same worker.
//! - `mirror pooled, async`: the same with async WASI and an async call (the
//!   guest on a fiber), awaited on a tokio worker: what the host's async
//!   call costs over a synchronous one, without the host's own steps.
//! - `mirror on-demand`: the same as `mirror pooled`, with the on-demand
//!   allocator (no pooling).
//!
//! usage: kvdb-bench-instantiate GUEST.wasm [OUT.md]
//! env: ITERS (default 10000 per variant), WARMUP (default 1000), CHUNKS (50),
//!      NAME (the `name` variable, default World), ONLY (run only the variants
//!      whose label contains this text, e.g. `ONLY=host` to profile the host
//!      path alone).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// The guest's exports and types (the host's own bindings are private).
mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "script",
    });
}
/// The same, with the export called as an async function, as the host calls it.
mod bindings_async {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "script",
        exports: { default: async },
    });
}
use bindings::kvdb::script::types::Request as WitRequest;
use bindings_async::kvdb::script::types::Request as AsyncWitRequest;

/// The server's allocator (host/src/main.rs): the host path allocates as it
/// does there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The target: instantiate + call of a small guest, pooled, median.
const TARGET: Duration = Duration::from_micros(10);

// --- as in host/src/script/wasm/mod.rs (the pool's caps are the host's own
// constants; the rest copied) and script::Limits::default() ---
const POOLED_INSTANCES: u32 = kvdb::script::DEFAULT_RUNS;
use kvdb::script::wasm::{MAX_CORE_INSTANCES, MAX_MEMORIES, MAX_TABLES};
const CAPTURED_OUTPUT: usize = 64 * 1024;
const EPOCH_TICK_MS: u64 = 10;
const YIELD_FUEL: u64 = 100_000;

fn limits() -> kvdb::script::Limits {
    kvdb::script::Limits::default()
}

/// The engine configuration of `WasmRuntime::new`; `pooled: false` swaps the
/// pooling allocator for the on-demand one and changes nothing else.
fn config(pooled: bool) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.consume_fuel(true);
    config.epoch_interruption(true);
    if pooled {
        let mut pool = PoolingAllocationConfig::default();
        // `total_stacks` (the async variants' fiber stacks) as in the host.
        pool.total_stacks(POOLED_INSTANCES);
        pool.total_component_instances(POOLED_INSTANCES)
            .total_core_instances(POOLED_INSTANCES * MAX_CORE_INSTANCES)
            .total_memories(POOLED_INSTANCES * MAX_MEMORIES)
            .total_tables(POOLED_INSTANCES * MAX_TABLES)
            .max_memory_size(limits().memory_bytes)
            .max_memories_per_component(MAX_MEMORIES)
            .max_tables_per_component(MAX_TABLES)
            .max_core_instances_per_component(MAX_CORE_INSTANCES)
            .linear_memory_keep_resident(4 * 1024 * 1024)
            .table_keep_resident(64 * 1024)
            .decommit_batch_size(64)
            .pagemap_scan(wasmtime::Enabled::Auto);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    } else {
        config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    }
    config
}

struct MirrorState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for MirrorState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A compiled, pre-linked guest on its own engine.
struct Mirror {
    engine: Engine,
    pre: Pre,
}

/// Pre-linked for a synchronous or for an async call.
enum Pre {
    Sync(bindings::ScriptPre<MirrorState>),
    Async(bindings_async::ScriptPre<MirrorState>),
}

impl Mirror {
    /// `asynchronous`: async WASI imports, for [`Mirror::run_async`].
    fn new(bytes: &[u8], pooled: bool, asynchronous: bool) -> Result<Self> {
        let engine = Engine::new(&config(pooled))?;
        let component = Component::new(&engine, bytes)?;
        let mut linker: Linker<MirrorState> = Linker::new(&engine);
        if asynchronous {
            wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        } else {
            wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        }
        // kvdb:script/{kv,scope,log}: a host that does nothing (traps if called).
        linker.define_unknown_imports_as_traps(&component)?;
        let pre = linker.instantiate_pre(&component)?;
        let pre = if asynchronous {
            Pre::Async(bindings_async::ScriptPre::new(pre)?)
        } else {
            Pre::Sync(bindings::ScriptPre::new(pre)?)
        };
        Ok(Self { engine, pre })
    }

    /// A store set up step for step as `WasmRuntime::run` does.
    fn store(&self) -> Result<Store<MirrorState>> {
        let limits = limits();
        let stdout = MemoryOutputPipe::new(CAPTURED_OUTPUT);
        let stderr = MemoryOutputPipe::new(CAPTURED_OUTPUT);
        let wasi = WasiCtx::builder()
            .stdout(stdout)
            .stderr(stderr)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.memory_bytes)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            MirrorState {
                wasi,
                table: ResourceTable::new(),
                limits: store_limits,
            },
        );
        store.limiter(|s| &mut s.limits);
        store.set_fuel(limits.fuel)?;
        let ticks = u64::try_from(limits.time.as_millis())?.div_ceil(EPOCH_TICK_MS);
        store.set_epoch_deadline(ticks.max(1));
        store.epoch_deadline_trap();
        Ok(store)
    }

    /// One run with a synchronous call.
    fn run(&self, request: &WitRequest) -> Result<Vec<u8>> {
        let Pre::Sync(pre) = &self.pre else {
            bail!("pre-linked for async calls");
        };
        let mut store = self.store()?;
        let instance = pre.instantiate(&mut store)?;
        let response = instance.call_handle(&mut store, request)?;
        Ok(response.body)
    }

    /// One run with an async call (the guest on a fiber), as the host calls.
    async fn run_async(&self, request: &AsyncWitRequest) -> Result<Vec<u8>> {
        let Pre::Async(pre) = &self.pre else {
            bail!("pre-linked for synchronous calls");
        };
        let mut store = self.store()?;
        store.fuel_async_yield_interval(Some(YIELD_FUEL))?;
        let instance = pre.instantiate_async(&mut store).await?;
        let response = instance.call_handle(&mut store, request).await?;
        Ok(response.body)
    }
}

/// The real host path: a runtime, an in-memory store with one bucket, and the
/// guest compiled and cached as an upload would leave it.
struct HostPath {
    runtime: kvdb::script::wasm::WasmRuntime,
    tokio: tokio::runtime::Handle,
    bucket: kvdb::bucket::Bucket,
    script: kvdb::bucket::StoredScript,
    request: kvdb::script::Request,
}

impl HostPath {
    fn new(
        bytes: &[u8],
        request: kvdb::script::Request,
        tokio: &tokio::runtime::Runtime,
    ) -> Result<Self> {
        use kvdb::bucket::{Buckets, PolicyChange, ScriptKind, ScriptName, StoredScript};
        use kvdb::storage::{Durability, Store, memory::MemoryBackend};
        let bucket = tokio.block_on(async {
            let store = Store::open(Arc::new(MemoryBackend::new()), Durability::Relaxed)
                .map_err(|e| anyhow!("store: {e}"))?;
            let buckets = Buckets::new(
                store,
                kvdb::bucket::Limits {
                    max_value_bytes: 1024 * 1024,
                },
            );
            let (id, _) = buckets
                .create(PolicyChange::default())
                .await
                .map_err(|e| anyhow!("bucket: {e}"))?;
            buckets.open(id).map_err(|e| anyhow!("open: {e}"))
        })?;
        let runtime = kvdb::script::wasm::WasmRuntime::new(limits(), None)
            .map_err(|e| anyhow!("runtime: {e}"))?;
        // As an upload does: compiled once, cached under the source's SHA-256.
        runtime
            .compile_cached(bytes)
            .map_err(|e| anyhow!("compile: {e}"))?;
        let digest: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            bytes,
        ))
        .into();
        let script = StoredScript {
            bucket: bucket.id(),
            name: ScriptName::new("hello").map_err(|e| anyhow!("name: {e}"))?,
            kind: ScriptKind::Wasm,
            size: bytes.len() as u64,
            version: 1,
            digest,
            updated_at: 0,
        };
        Ok(Self {
            runtime,
            tokio: tokio.handle().clone(),
            bucket,
            script,
            request,
        })
    }

    /// One run, as the HTTP handler makes it: the run's scoped bucket, its
    /// `Host` and its request (a copy here, built from the HTTP request
    /// there), then `WasmRuntime::run`.
    async fn run(&self) -> Result<Vec<u8>> {
        let scoped = self.bucket.clone().scoped(kvdb::bucket::Scope::admin());
        let host = kvdb::script::api::Host::new(scoped, self.tokio.clone());
        let source = || -> Result<Vec<u8>, kvdb::script::ScriptError> {
            Err(kvdb::script::ScriptError::Internal(
                "the bench compiled the script up front".into(),
            ))
        };
        let response = self
            .runtime
            .run(&self.script, &source, host, self.request.clone())
            .await
            .map_err(|e| anyhow!("run: {e}"))?;
        Ok(response.body)
    }
}

/// [`on_a_worker`] for a mirror's synchronous runs.
fn mirror_on_a_worker<'a>(
    tokio: &'a tokio::runtime::Runtime,
    mirror: &Arc<Mirror>,
    request: &Arc<WitRequest>,
) -> ChunkFn<'a> {
    let (mirror, request) = (mirror.clone(), request.clone());
    on_a_worker(tokio, move || {
        let (mirror, request) = (mirror.clone(), request.clone());
        async move { mirror.run(&request) }
    })
}

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// Runs `n` runs, pushing the time of each, and answers the last body.
type ChunkFn<'a> = Box<dyn Fn(usize, &mut Vec<Duration>) -> Result<Vec<u8>> + 'a>;

/// A chunk of runs, each awaited in turn by one task on the tokio worker (as
/// a request's handler awaits its run). The synchronous variants run there
/// too, so that every variant runs on the same thread.
fn on_a_worker<'a, F, Fut>(tokio: &'a tokio::runtime::Runtime, run: F) -> ChunkFn<'a>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<u8>>> + Send,
{
    Box::new(move |n, samples| {
        let run = run.clone();
        let (times, body) = tokio.block_on(tokio.spawn(async move {
            let mut times = Vec::with_capacity(n);
            let mut body = Vec::new();
            for _ in 0..n {
                let start = Instant::now();
                let answer = run().await?;
                times.push(start.elapsed());
                // The previous body is freed here, outside the timed span.
                body = std::hint::black_box(answer);
            }
            Ok::<_, anyhow::Error>((times, body))
        }))??;
        samples.extend(times);
        Ok(body)
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(guest) = args.get(1) else {
        bail!("usage: kvdb-bench-instantiate GUEST.wasm [OUT.md]");
    };
    let out = args.get(2);
    let iters = env_usize("ITERS", 10_000)?;
    let warmup = env_usize("WARMUP", 1_000)?;
    let chunks = env_usize("CHUNKS", 50)?.clamp(1, iters.max(1));
    let name = std::env::var("NAME").unwrap_or_else(|_| "World".into());
    let bytes = std::fs::read(guest).with_context(|| format!("reading {guest}"))?;
    let expected = format!("Hello {name}\n").into_bytes();

    let vars = vec![("name".to_owned(), name.clone())];
    let host_request = kvdb::script::Request {
        method: "GET".into(),
        path: "/bench/scripts/hello".into(),
        fields: vars.clone(),
        remote_addr: None,
        headers: vec![],
        body: vec![],
    };
    let async_request = Arc::new(AsyncWitRequest {
        method: "GET".into(),
        path: "/bench/scripts/hello".into(),
        vars: vars.clone(),
        headers: vec![],
        body: vec![],
    });
    let wit_request = Arc::new(WitRequest {
        method: "GET".into(),
        path: "/bench/scripts/hello".into(),
        vars,
        headers: vec![],
        body: vec![],
    });

    let t = Instant::now();
    // One worker, as a request's run has one thread.
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let host = Arc::new(HostPath::new(&bytes, host_request, &tokio)?);
    let pooled = Arc::new(Mirror::new(&bytes, true, false)?);
    let pooled_async = Arc::new(Mirror::new(&bytes, true, true)?);
    let on_demand = Arc::new(Mirror::new(&bytes, false, false)?);
    eprintln!(
        "[instantiate] {guest}: {} bytes, compiled 4 times in {:.0} ms",
        bytes.len(),
        t.elapsed().as_secs_f64() * 1e3
    );

    let mut variants: Vec<(&str, bool, ChunkFn<'_>)> = vec![
        (
            "host: WasmRuntime::run, awaited on a worker (pooled, cached ScriptPre)",
            true,
            on_a_worker(&tokio, {
                let host = host.clone();
                move || {
                    let host = host.clone();
                    async move { host.run().await }
                }
            }),
        ),
        (
            "mirror: pooled allocator + InstancePre",
            true,
            mirror_on_a_worker(&tokio, &pooled, &wit_request),
        ),
        (
            "mirror: pooled allocator + InstancePre, async call on a worker",
            false,
            on_a_worker(&tokio, {
                let (mirror, request) = (pooled_async.clone(), async_request.clone());
                move || {
                    let (mirror, request) = (mirror.clone(), request.clone());
                    async move { mirror.run_async(&request).await }
                }
            }),
        ),
        (
            "mirror: on-demand allocator + InstancePre",
            false,
            mirror_on_a_worker(&tokio, &on_demand, &wit_request),
        ),
    ];
    if let Ok(only) = std::env::var("ONLY") {
        variants.retain(|(label, _, _)| label.contains(&only));
        if variants.is_empty() {
            bail!("ONLY={only}: no variant's label contains it");
        }
    }

    for (label, _, run) in &variants {
        let body = run(1, &mut Vec::new()).with_context(|| format!("{label}: first run"))?;
        if body != expected {
            bail!(
                "{label}: answered {:?}, expected {:?}",
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(&expected)
            );
        }
        run(warmup, &mut Vec::with_capacity(warmup))?;
    }

    let mut samples: Vec<Vec<Duration>> =
        variants.iter().map(|_| Vec::with_capacity(iters)).collect();
    for chunk in 0..chunks {
        let n = iters / chunks + usize::from(chunk < iters % chunks);
        for (i, (_, _, run)) in variants.iter().enumerate() {
            run(n, &mut samples[i])?;
        }
    }

    let mut lines = vec![
        format!(
            "In-process: fresh store + instantiate + call of `handle` of {} ({} bytes, `name={name}`), {iters} iterations per variant after {warmup} warm-up, interleaved in {chunks} chunks, one thread.",
            std::path::Path::new(guest)
                .file_name()
                .map_or_else(|| guest.clone(), |f| f.to_string_lossy().into_owned()),
            bytes.len()
        ),
        String::new(),
        "| Variant | median | p99 | mean | min | Target (median) | Met |".to_owned(),
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: |".to_owned(),
    ];
    for ((label, target, _), mut s) in variants.iter().zip(samples) {
        s.sort_unstable();
        let median = percentile(&s, 50.0);
        let mean = s.iter().sum::<Duration>() / u32::try_from(s.len().max(1))?;
        let (target_cell, met) = if *target {
            (
                format!("≤ {} µs", TARGET.as_micros()),
                if median <= TARGET { "✅" } else { "❌" },
            )
        } else {
            ("–".to_owned(), "–")
        };
        lines.push(format!(
            "| {label} | {} | {} | {} | {} | {target_cell} | {met} |",
            us(median),
            us(percentile(&s, 99.0)),
            us(mean),
            us(s[0]),
        ));
    }
    let text = lines.join("\n") + "\n";
    print!("{text}");
    if let Some(out) = out {
        std::fs::write(out, &text).with_context(|| format!("writing {out}"))?;
    }
    Ok(())
}
