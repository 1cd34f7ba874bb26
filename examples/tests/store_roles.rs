//! A run spread over processes through a `file://` store, as a researcher starts one: a trainer
//! and two rollout workers of the countdown binary; one worker is killed with SIGKILL mid-run and
//! a new one takes its place; a stranger's corrupt rollout object is refused; the trainer is
//! killed with SIGKILL, its output_dir deleted, and restarted with `--resume` (from the store's
//! checkpoint); a worker whose trainer is gone for good gives up. The run finishes, every worker still
//! running exits by itself with status 0, no prompt is generated twice and every sample is
//! accounted for across the processes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grail_store::Store;
use grail_store::rollout_batch::decode;

const MAX_STEPS: u64 = 12;

fn countdown(args: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_countdown"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn rollout(url: &str, id: &str, dir: &Path) -> Child {
    countdown(
        &[
            "--role",
            "rollout",
            "--store",
            url,
            "--run-id",
            "demo",
            "--worker-id",
            id,
        ],
        &dir.join(format!("{id}.log")),
    )
}

/// A trainer's job config over `url` (output in `dir/out`), written to `dir/job.toml`.
fn trainer_job(dir: &Path, url: &str, run_id: &str, save_steps: u64, grpo: &str) -> PathBuf {
    let job = grail_testkit::tiny_job_toml(
        &dir.join("out"),
        &format!(
            "role = \"trainer\"\nstore = \"{url}\"\nrun_id = \"{run_id}\"\nsave_steps = {save_steps}"
        ),
        grpo,
        "prompts = 8\nevery = 0",
    );
    let config = dir.join("job.toml");
    std::fs::write(&config, job).unwrap();
    config
}

/// The last stdout line of a process that exited with status 0, as JSON.
fn summary(child: Child, what: &str) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{what}: exit status {:?}", out.status);
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().expect("a summary line")).unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 300 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_trainer_and_rollout_workers_that_come_and_go_finish_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let grpo = format!("max_steps = {MAX_STEPS}\nmax_staleness = 4");
    let config = trainer_job(dir.path(), &url, "demo", 0, &grpo);
    let trainer = countdown(
        &["--config", config.to_str().unwrap()],
        &dir.path().join("trainer.log"),
    );
    let first = rollout(&url, "w1", dir.path());
    let second = rollout(&url, "w2", dir.path());
    let mut trainer = trainer;
    let store = Store::open(&url, "demo").unwrap();
    let mut running = |what: &str| {
        if let Some(status) = trainer.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.path().join("trainer.log")).unwrap();
            panic!("the trainer exited ({status}) before {what}:\n{log}");
        }
    };
    wait_until("the trainer publishes the run", || {
        running("publishing the run");
        store.get("run/config.toml").unwrap().is_some()
    });
    // A stranger's object in the rollouts folder: refused, never trained on.
    store
        .put(
            "rollouts/stranger/000000000000.parquet",
            b"PAR1 not really".to_vec(),
        )
        .unwrap();
    let objects = |worker: &str| store.list(&format!("rollouts/{worker}/")).unwrap().len();
    wait_until("w1 writes a rollout object", || {
        running("w1 wrote");
        objects("w1") > 0
    });
    let mut first = first;
    first.kill().unwrap(); // SIGKILL, mid-run
    first.wait().unwrap();
    let third = rollout(&url, "w3", dir.path());
    let s = summary(trainer, "trainer");
    assert_eq!(s["steps"], MAX_STEPS);
    let acc = &s["accounting"];
    assert_eq!(acc["identity_holds"], true, "{acc}");
    assert!(acc["trained"].as_u64().unwrap() > 0, "{acc}");
    for (worker, child) in [("w2", second), ("w3", third)] {
        let w = summary(child, worker);
        let c = &w["counters"];
        assert_eq!(c["finished"], true, "{worker}: {w}");
        assert_eq!(
            c["generated"].as_u64().unwrap(),
            c["sent"].as_u64().unwrap()
                + c["failed"].as_u64().unwrap()
                + c["unsent_at_shutdown"].as_u64().unwrap(),
            "{worker}: {w}"
        );
    }
    // No prompt generated twice, whoever generated it.
    let mut prompts = BTreeSet::new();
    for key in store.list("rollouts/").unwrap() {
        if key.starts_with("rollouts/stranger/") {
            continue;
        }
        let batch = decode(store.get(&key).unwrap().unwrap()).unwrap();
        for g in batch.groups {
            assert!(
                prompts.insert(g.prompt_id),
                "prompt {} twice ({key})",
                g.prompt_id
            );
        }
    }
    assert!(store.get("run/FINISHED").unwrap().is_some());
    let log = std::fs::read_to_string(dir.path().join("trainer.log")).unwrap();
    assert!(
        log.contains("rollouts/stranger/000000000000.parquet"),
        "the refused object is logged with its key:\n{log}"
    );
}

/// Every sample of `batch`.
fn samples(
    batch: &mut grail_store::RolloutBatch,
) -> impl Iterator<Item = &mut grail_protocol::Sample> {
    batch.groups.iter_mut().flat_map(|g| &mut g.samples)
}

/// Rollout objects forged from a real worker's: in its own folder, its rewards inflated, its
/// log-probs scaled, then replayed unchanged (each refused for that reason), after which the
/// worker is quarantined and even its honest objects are refused unread; copied into another
/// folder (prompts that folder's worker never claimed) and written under another worker's name
/// (refused without counting against the named worker). The other honest worker's objects all
/// train, and the summary counts every refused sample by worker and reason.
#[test]
fn forged_rollouts_are_refused_by_reason_and_their_worker_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let grpo = "max_steps = 6\nmax_staleness = 4";
    let config = trainer_job(dir.path(), &url, "demo", 0, grpo);
    let trainer = countdown(
        &["--config", config.to_str().unwrap()],
        &dir.path().join("trainer.log"),
    );
    let honest = rollout(&url, "w1", dir.path());
    let forged = rollout(&url, "w2", dir.path());
    let store = Store::open(&url, "demo").unwrap();
    wait_until("w2 writes a rollout object", || {
        !store.list("rollouts/w2/").unwrap().is_empty()
    });
    let key = store.list("rollouts/w2/").unwrap()[0].clone();
    let original = decode(store.get(&key).unwrap().unwrap()).unwrap();
    type Edit = fn(&mut grail_store::RolloutBatch);
    // (key, edit, the reason its refusal names); read in this order (sequence numbers above
    // any real object's, so after the original).
    let objects: [(&str, Edit, &str); 6] = [
        (
            "rollouts/w2/900000000000.parquet",
            |b| samples(b).for_each(|s| s.rewards[0] += 1.0),
            "(rewards)",
        ),
        (
            "rollouts/w2/900000000001.parquet",
            |b| samples(b).for_each(|s| s.behaviour_logps.iter_mut().for_each(|l| *l *= 1.05)),
            "(logprob)",
        ),
        ("rollouts/w2/900000000002.parquet", |_| {}, "(duplicate)"),
        (
            "rollouts/w2/900000000003.parquet",
            |_| {},
            "worker `w2` is quarantined",
        ),
        (
            "rollouts/cheat/900000000004.parquet",
            |b| b.worker_id = "cheat".into(),
            "(claim)",
        ),
        ("rollouts/cheat/900000000005.parquet", |_| {}, "(identity)"),
    ];
    for (key, edit, _) in &objects {
        let mut batch = original.clone();
        edit(&mut batch);
        let bytes = grail_store::rollout_batch::encode(&batch).unwrap();
        store.put(key, bytes).unwrap();
    }
    let s = summary(trainer, "trainer");
    let acc = &s["accounting"];
    assert_eq!(acc["identity_holds"], true, "{acc}");
    let log = std::fs::read_to_string(dir.path().join("trainer.log")).unwrap();
    for (key, _, why) in &objects {
        let line = log
            .lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("{key} refused:\n{log}"));
        assert!(line.contains(why), "{key}: {why}:\n{line}");
    }
    assert!(
        !log.contains("rollouts/w1/"),
        "an honest object refused:\n{log}"
    );
    assert!(log.contains("worker quarantined"), "{log}");
    let n: u64 = original.groups.iter().map(|g| g.samples.len() as u64).sum();
    let refused = &s["rollouts_refused"];
    for (worker, reason, samples) in [
        ("w2", "rewards", n),
        ("w2", "logprob", n),
        ("w2", "duplicate", n),
        ("cheat", "claim", n),
        ("cheat", "identity", n),
    ] {
        assert_eq!(
            refused[worker][reason], samples,
            "{worker} {reason}: {refused}"
        );
    }
    assert!(
        refused["w2"]["quarantined"].as_u64().unwrap() >= n,
        "{refused}"
    );
    assert!(refused.get("w1").is_none(), "{refused}");
    let total: u64 = refused
        .as_object()
        .unwrap()
        .values()
        .flat_map(|r| r.as_object().unwrap().values())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(acc["rejected"].as_u64().unwrap(), total, "{acc} {refused}");
    summary(honest, "w1");
    summary(forged, "w2");
}

#[test]
fn a_trainer_refuses_a_run_id_already_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let store = Store::open(&url, "taken").unwrap();
    store
        .put("run/config.toml", b"seed = 0\n".to_vec())
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_countdown"))
        .args(["--role", "trainer", "--store", &url, "--run-id", "taken"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already holds a run"), "{err}");
}

#[test]
fn a_trainer_killed_mid_run_resumes_from_its_checkpoint_in_the_store_with_the_same_workers() {
    const STEPS: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let out = dir.path().join("out");
    let grpo = format!("max_steps = {STEPS}\nmax_staleness = 4");
    let config = trainer_job(dir.path(), &url, "demo", 2, &grpo);
    let config = config.to_str().unwrap();
    let mut trainer = countdown(&["--config", config], &dir.path().join("trainer.log"));
    let workers = [
        rollout(&url, "w1", dir.path()),
        rollout(&url, "w2", dir.path()),
    ];
    let steps = || {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    wait_until("a checkpoint and a step after it", || {
        assert!(trainer.try_wait().unwrap().is_none(), "the trainer exited");
        steps() >= 5
    });
    trainer.kill().unwrap(); // SIGKILL: no FINISHED, no final checkpoint
    trainer.wait().unwrap();
    // Its machine is gone with it: the restarted trainer has only the store.
    std::fs::remove_dir_all(&out).unwrap();
    let store = Store::open(&url, "demo").unwrap();
    let killed_at = grail_store::weight_writer::newest_version(&store)
        .unwrap()
        .unwrap();
    assert!(store.get("run/FINISHED").unwrap().is_none());
    let resumed = countdown(
        &["--config", config, "--resume"],
        &dir.path().join("resumed.log"),
    );
    let s = summary(resumed, "resumed trainer");
    assert_eq!(s["steps"], STEPS);
    let acc = &s["accounting"];
    assert_eq!(acc["identity_holds"], true, "{acc}");
    let metric_steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        metric_steps,
        (1..=STEPS).collect::<Vec<_>>(),
        "every step once"
    );
    // The resumed attempt's versions come after every version the killed one published.
    let newest = grail_store::weight_writer::newest_version(&store)
        .unwrap()
        .unwrap();
    assert!(newest > killed_at, "{newest} after {killed_at}");
    for (i, w) in workers.into_iter().enumerate() {
        let w = summary(w, &format!("w{}", i + 1));
        assert_eq!(w["counters"]["finished"], true, "{w}");
    }
}

#[test]
fn a_worker_gives_up_on_a_trainer_silent_for_the_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let grpo = "max_steps = 100000\nstall_timeout = 15";
    let config = trainer_job(dir.path(), &url, "demo", 0, grpo);
    let mut trainer = countdown(
        &["--config", config.to_str().unwrap()],
        &dir.path().join("trainer.log"),
    );
    let mut worker = rollout(&url, "w1", dir.path());
    let store = Store::open(&url, "demo").unwrap();
    wait_until("the worker writes a rollout object", || {
        assert!(trainer.try_wait().unwrap().is_none(), "the trainer exited");
        !store.list("rollouts/w1/").unwrap().is_empty()
    });
    trainer.kill().unwrap(); // SIGKILL, never restarted
    trainer.wait().unwrap();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            worker.kill().unwrap();
            panic!("the worker still waits for its trainer 120 s after it was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "giving up is an error");
    assert!(
        killed.elapsed() >= Duration::from_secs(14),
        "not before the trainer has been silent for long"
    );
    let log = std::fs::read_to_string(dir.path().join("w1.log")).unwrap();
    assert!(log.contains("has been silent for"), "{log}");
    assert!(log.contains("stall_timeout = 15 s"), "{log}");
    let counters = store.get("workers/w1.json").unwrap().unwrap();
    let counters: serde_json::Value = serde_json::from_slice(&counters).unwrap();
    assert_eq!(
        counters["finished"], true,
        "its final counts are written: {counters}"
    );
}

#[test]
fn a_trainer_without_workers_stops_at_the_stall_timeout_saying_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let config = trainer_job(
        dir.path(),
        &url,
        "alone",
        0,
        "max_steps = 10\nstall_timeout = 3",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_countdown"))
        .args(["--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no group arrived"), "{err}");
    assert!(
        err.contains(&format!("--role rollout --store {url} --run-id alone")),
        "{err}"
    );
    let store = Store::open(&url, "alone").unwrap();
    assert!(
        store.get("run/FINISHED").unwrap().is_some(),
        "marked finished"
    );
}
