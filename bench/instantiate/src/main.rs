//! In-process cost of one WebAssembly script run: a fresh store, instantiate,
//! and a call of `handle`, measured with a plain timing loop.
//!
//! Variants, run interleaved in chunks (A B C A B C …) so the machine's drift
//! spreads over all of them:
//!
//! - `host`: the real code path, `kvdb::script::wasm::WasmRuntime::run` (the
//!   pooled allocator, the cached `ScriptPre`, a fresh store with WASI, fuel,
//!   limits and an epoch deadline, output capture, response checks), on a
//!   bucket of an in-memory store. Also builds the run's `Host` (a scoped
//!   bucket), as the HTTP handler does.
//! - `mirror pooled`: the same steps against public wasmtime APIs, with the
//!   engine configuration of host/src/script/wasm/mod.rs copied (see
//!   [`config`]), and the kvdb:script imports defined as traps (the hello
//!   guest calls none).
//! - `mirror on-demand`: the same, with the on-demand allocator (no pooling).
//!
//! usage: kvdb-bench-instantiate GUEST.wasm [OUT.md]
//! env: ITERS (default 10000 per variant), WARMUP (default 1000), CHUNKS (10),
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
use bindings::ScriptPre;
use bindings::kvdb::script::types::Request as WitRequest;

/// The server's allocator (host/src/main.rs): the host path allocates as it
/// does there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The target: instantiate + call of a small guest, pooled, median.
const TARGET: Duration = Duration::from_micros(10);

// --- copied from host/src/script/wasm/mod.rs and script::Limits::default() ---
const POOLED_INSTANCES: u32 = 256;
const CAPTURED_OUTPUT: usize = 64 * 1024;
const EPOCH_TICK_MS: u64 = 10;

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
        pool.total_component_instances(POOLED_INSTANCES)
            .total_core_instances(POOLED_INSTANCES * 8)
            .total_memories(POOLED_INSTANCES * 2)
            .total_tables(POOLED_INSTANCES * 4)
            .max_memory_size(limits().memory_bytes)
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
    pre: ScriptPre<MirrorState>,
}

impl Mirror {
    fn new(bytes: &[u8], pooled: bool) -> Result<Self> {
        let engine = Engine::new(&config(pooled))?;
        let component = Component::new(&engine, bytes)?;
        let mut linker: Linker<MirrorState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        // kvdb:script/{kv,scope,log}: a host that does nothing (traps if called).
        linker.define_unknown_imports_as_traps(&component)?;
        let pre = ScriptPre::new(linker.instantiate_pre(&component)?)?;
        Ok(Self { engine, pre })
    }

    /// One run, step for step as `WasmRuntime::run` up to the call.
    fn run(&self, request: &WitRequest) -> Result<Vec<u8>> {
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
        let instance = self.pre.instantiate(&mut store)?;
        let response = instance.call_handle(&mut store, request)?;
        Ok(response.body)
    }
}

/// The real host path: a runtime, an in-memory store with one bucket, and the
/// guest compiled and cached as an upload would leave it.
struct HostPath {
    runtime: kvdb::script::wasm::WasmRuntime,
    tokio: tokio::runtime::Runtime,
    bucket: kvdb::bucket::Bucket,
    script: kvdb::bucket::StoredScript,
    request: kvdb::script::Request,
}

impl HostPath {
    fn new(bytes: &[u8], request: kvdb::script::Request) -> Result<Self> {
        use kvdb::bucket::{Buckets, PolicyChange, ScriptKind, ScriptName, StoredScript};
        use kvdb::storage::{Durability, Store, memory::MemoryBackend};
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
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
        let runtime =
            kvdb::script::wasm::WasmRuntime::new(limits()).map_err(|e| anyhow!("runtime: {e}"))?;
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
            tokio,
            bucket,
            script,
            request,
        })
    }

    fn run(&self) -> Result<Vec<u8>> {
        let scoped = self.bucket.clone().scoped(kvdb::bucket::Scope::admin());
        let host = kvdb::script::api::Host::new(scoped, self.tokio.handle().clone());
        let source = || -> Result<Vec<u8>, kvdb::script::ScriptError> {
            Err(kvdb::script::ScriptError::Internal(
                "the bench compiled the script up front".into(),
            ))
        };
        let response = self
            .tokio
            .block_on(self.runtime.run(&self.script, &source, host, &self.request))
            .map_err(|e| anyhow!("run: {e}"))?;
        Ok(response.body)
    }
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

type RunFn<'a> = Box<dyn Fn() -> Result<Vec<u8>> + 'a>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(guest) = args.get(1) else {
        bail!("usage: kvdb-bench-instantiate GUEST.wasm [OUT.md]");
    };
    let out = args.get(2);
    let iters = env_usize("ITERS", 10_000)?;
    let warmup = env_usize("WARMUP", 1_000)?;
    let chunks = env_usize("CHUNKS", 10)?.clamp(1, iters.max(1));
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
    let wit_request = WitRequest {
        method: "GET".into(),
        path: "/bench/scripts/hello".into(),
        vars,
        headers: vec![],
        body: vec![],
    };

    let t = Instant::now();
    let host = HostPath::new(&bytes, host_request)?;
    let pooled = Mirror::new(&bytes, true)?;
    let on_demand = Mirror::new(&bytes, false)?;
    eprintln!(
        "[instantiate] {guest}: {} bytes, compiled 3 times in {:.0} ms",
        bytes.len(),
        t.elapsed().as_secs_f64() * 1e3
    );

    let mut variants: Vec<(&str, bool, RunFn<'_>)> = vec![
        (
            "host: WasmRuntime::run (pooled, cached ScriptPre)",
            true,
            Box::new(|| host.run()),
        ),
        (
            "mirror: pooled allocator + InstancePre",
            true,
            Box::new(|| pooled.run(&wit_request)),
        ),
        (
            "mirror: on-demand allocator + InstancePre",
            false,
            Box::new(|| on_demand.run(&wit_request)),
        ),
    ];
    if let Ok(only) = std::env::var("ONLY") {
        variants.retain(|(label, _, _)| label.contains(&only));
        if variants.is_empty() {
            bail!("ONLY={only}: no variant's label contains it");
        }
    }

    for (label, _, run) in &variants {
        let body = run().with_context(|| format!("{label}: first run"))?;
        if body != expected {
            bail!(
                "{label}: answered {:?}, expected {:?}",
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(&expected)
            );
        }
        for _ in 0..warmup {
            run()?;
        }
    }

    let mut samples: Vec<Vec<Duration>> =
        variants.iter().map(|_| Vec::with_capacity(iters)).collect();
    for chunk in 0..chunks {
        let n = iters / chunks + usize::from(chunk < iters % chunks);
        for (i, (_, _, run)) in variants.iter().enumerate() {
            for _ in 0..n {
                let start = Instant::now();
                let body = run()?;
                samples[i].push(start.elapsed());
                std::hint::black_box(body);
            }
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
