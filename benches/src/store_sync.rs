//! `grail-bench store-sync`: how long each weight version takes to reach a rollout worker through
//! an object store, on this machine and over a simulated commodity link (object_store's
//! throttled store: a latency per request and a bandwidth per byte read), with PULSE deltas and
//! with every version a full copy. Real AdamW steps, as `weight-sync`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use burn::tensor::Device;
use grail_core::model::named_tensors;
use grail_protocol::WireDtype;
use grail_store::{Store, WeightReader, WeightWriter, WeightWriterConfig};
use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::throttle::{ThrottleConfig, ThrottledStore};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;

use crate::{Args, WeightSyncArgs, bench_trainer, peak_rss_bytes, random_step};

/// Flags of the store-sync bench.
#[derive(clap::Args, Debug)]
pub(crate) struct StoreSyncArgs {
    /// Which weights and how many steps (a multiple of 4 puts each of the 4 lanes first after a
    /// step equally often).
    #[command(flatten)]
    weights: WeightSyncArgs,
    /// The simulated link's bandwidth, in Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    mbit: f64,
    /// The simulated link's latency per request, in milliseconds.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
}

/// One way of syncing over one link, with its totals.
struct Lane {
    link: &'static str,
    sync: &'static str,
    writer: WeightWriter,
    reader: WeightReader,
    bytes: u64,
    publish_s: f64,
    catch_up_s: f64,
}

pub(crate) fn store_sync_bench(args: &Args, device: &Device, s: &StoreSyncArgs) -> Result<()> {
    let wire = WireDtype::Bf16;
    let w = &s.weights;
    let mut trainer = bench_trainer(args, device, w)?;
    let params = trainer.model().config.num_parameters();
    let per_byte = Duration::from_secs_f64(8.0 / (s.mbit * 1e6));
    let latency = Duration::from_millis(s.latency_ms);
    let slow = ThrottleConfig {
        wait_get_per_call: latency,
        wait_get_per_byte: per_byte,
        wait_put_per_call: latency,
        wait_list_per_call: latency,
        wait_delete_per_call: latency,
        ..ThrottleConfig::default()
    };
    let mut lanes = Vec::new();
    for (link, throttle) in [("local", None), ("throttled", Some(slow))] {
        for (sync, anchor_interval) in [("delta", 1_000_000), ("full", 1)] {
            let memory = InMemory::new();
            let inner: Arc<dyn ObjectStore> = match &throttle {
                Some(config) => Arc::new(ThrottledStore::new(memory, *config)),
                None => Arc::new(memory),
            };
            let store = Store::over(inner, &format!("{link}://"), "bench")?;
            let cfg = WeightWriterConfig {
                wire,
                anchor_interval,
                ..WeightWriterConfig::default()
            };
            lanes.push(Lane {
                link,
                sync,
                writer: WeightWriter::new(store.clone(), cfg),
                reader: WeightReader::new(store, wire),
                bytes: 0,
                publish_s: 0.0,
                catch_up_s: 0.0,
            });
        }
    }
    // Version 0 (a full copy everywhere) is where every worker starts: not measured.
    let first = named_tensors(trainer.model(), wire);
    for lane in &mut lanes {
        lane.writer.publish(0, &first)?;
        lane.reader.catch_up()?;
    }
    let mut rng = StdRng::seed_from_u64(args.seed);
    let steps = w.steps.max(1);
    for _ in 0..steps {
        random_step(&mut trainer, &mut rng)?;
        let version = trainer.version();
        let tensors = named_tensors(trainer.model(), wire);
        // Whichever lane comes first after a training step runs slower (the step's threads and
        // memory settling): each takes that place in turn.
        lanes.rotate_left(1);
        for lane in &mut lanes {
            let t = Instant::now();
            let published = lane.writer.publish(version, &tensors)?;
            lane.publish_s += t.elapsed().as_secs_f64();
            lane.bytes += published.bytes as u64;
            let t = Instant::now();
            let caught = lane.reader.catch_up()?;
            lane.catch_up_s += t.elapsed().as_secs_f64();
            ensure!(
                caught.faults.is_empty() && lane.reader.version() == Some(version),
                "{} {}: the reader did not reach version {version}: {:?}",
                lane.link,
                lane.sync,
                caught.faults
            );
        }
    }
    let n = steps as f64;
    lanes.sort_by_key(|l| (l.link, l.sync));
    for lane in &lanes {
        let bytes = lane.bytes as f64 / n;
        // The throttled store slows reads per byte but writes only per request: the upload at
        // the link's bandwidth is reported beside the measured times, not inside them.
        let upload_s = (lane.link == "throttled").then_some(bytes * per_byte.as_secs_f64());
        println!(
            "{}",
            json!({
                "bench": "store-sync", "device": args.device, "params": params,
                "weights": if w.model_dir.is_some() { "checkpoint" } else { "random" },
                "lr": w.lr, "steps": steps, "link": lane.link, "mbit": s.mbit,
                "latency_ms": s.latency_ms, "sync": lane.sync, "bytes_mean": bytes,
                "publish_s_mean": lane.publish_s / n, "catch_up_s_mean": lane.catch_up_s / n,
                "reach_s_mean": (lane.publish_s + lane.catch_up_s) / n,
                "upload_s_at_bandwidth_mean": upload_s,
                "peak_rss_bytes": peak_rss_bytes(),
            })
        );
    }
    Ok(())
}
