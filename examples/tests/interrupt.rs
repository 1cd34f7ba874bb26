//! The countdown binary as a scheduler or a crash treats it: SIGTERM stops it after the current
//! step with a checkpoint; SIGKILL at random moments, each followed by `--resume`, still ends
//! with a valid final checkpoint, every step's metrics exactly once and every sample accounted for.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MAX_STEPS: usize = 30;

/// A tiny countdown job writing to `dir`, with a checkpoint every 2 steps.
fn job(dir: &Path) -> PathBuf {
    let toml = grail_testkit::tiny_job_toml(
        &dir.join("out"),
        "save_steps = 2\nsave_total_limit = 3",
        &format!("max_steps = {MAX_STEPS}"),
        "prompts = 8\nevery = 0",
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn start(config: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_countdown"))
        .arg("--config")
        .arg(config)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn metric_steps(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|l| l["step"].as_u64().unwrap())
        .collect()
}

fn has_checkpoint(out: &Path) -> bool {
    std::fs::read_dir(out).into_iter().flatten().any(|e| {
        let p = e.unwrap().path();
        p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("checkpoint-")
            && p.join("run_state.json").is_file()
    })
}

/// The summary JSON, the last line of stdout, of a run that finished.
fn summary(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().expect("a summary line")).unwrap()
}

#[test]
fn sigterm_even_delivered_twice_stops_after_the_current_step_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = job(dir.path());
    let out = dir.path().join("out");
    let child = start(&config, &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric_steps(&out).len() < 3 {
        assert!(Instant::now() < deadline, "no GRPO step within 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Twice at once, as `timeout` and SLURM deliver it (to the process and to its group): one
    // request, still a graceful stop.
    for _ in 0..2 {
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let s = summary(child);
    let steps = s["steps"].as_u64().unwrap() as usize;
    assert!(steps < MAX_STEPS, "stopped early, at step {steps}");
    assert_eq!(metric_steps(&out), (1..=steps as u64).collect::<Vec<_>>());
    let checkpoint = PathBuf::from(s["checkpoint"].as_str().unwrap());
    assert!(checkpoint.ends_with(format!("checkpoint-{steps}")));
    assert!(checkpoint.join("model.safetensors").is_file());
    assert_eq!(
        s["accounting"]["identity_holds"], true,
        "{}",
        s["accounting"]
    );
}

#[test]
fn repeated_sigkill_and_resume_finishes_with_every_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = job(dir.path());
    let out = dir.path().join("out");
    // Seeded kill moments (a small LCG). Every other attempt is killed 0.3–1.8 s after its start
    // (start-up, the SFT warm-up or early GRPO), the others 0–0.8 s after a new GRPO step shows
    // up in the metrics: kills land in GRPO however slow the machine is. At least five kills,
    // three of them during GRPO.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let (mut kills, mut kills_in_grpo) = (0, 0);
    let mut attempts = 0;
    while kills < 5 || kills_in_grpo < 3 {
        attempts += 1;
        assert!(attempts < 40, "{kills} kills in {attempts} attempts");
        let extra: &[&str] = if has_checkpoint(&out) {
            &["--resume"]
        } else {
            &["--overwrite-output-dir"]
        };
        let steps_at_start = metric_steps(&out).len();
        let mut child = start(&config, extra);
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let jitter = (rng >> 33) % 800;
        let after_a_step = attempts % 2 == 0 || (kills >= 2 && kills_in_grpo < 3);
        if after_a_step {
            let deadline = Instant::now() + Duration::from_secs(120);
            while metric_steps(&out).len() <= steps_at_start && child.try_wait().unwrap().is_none()
            {
                assert!(Instant::now() < deadline, "no new GRPO step within 120 s");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let after = Duration::from_millis(if after_a_step {
            jitter
        } else {
            300 + 2 * jitter
        });
        let started = Instant::now();
        while started.elapsed() < after {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if child.try_wait().unwrap().is_some() {
            // Finished before the kill: start again from scratch for the next kill.
            std::fs::remove_dir_all(&out).unwrap();
            continue;
        }
        let steps_before = metric_steps(&out).len();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        let steps = metric_steps(&out).len();
        if steps > 0 && steps >= steps_before {
            kills_in_grpo += 1;
        }
        let when = if after_a_step {
            "after a new step"
        } else {
            "after start"
        };
        eprintln!(
            "kill {kills} {after:?} {when} ({}): {steps} steps in metrics.jsonl",
            extra[0]
        );
    }
    let extra: &[&str] = if has_checkpoint(&out) {
        &["--resume"]
    } else {
        &["--overwrite-output-dir"]
    };
    let s = summary(start(&config, extra));
    assert_eq!(s["steps"], MAX_STEPS as u64);
    assert_eq!(
        metric_steps(&out),
        (1..=MAX_STEPS as u64).collect::<Vec<_>>(),
        "every step exactly once"
    );
    assert_eq!(
        s["accounting"]["identity_holds"], true,
        "{}",
        s["accounting"]
    );
    let checkpoint = PathBuf::from(s["checkpoint"].as_str().unwrap());
    assert!(checkpoint.ends_with(format!("checkpoint-{MAX_STEPS}")));
    let model = grail::runner::load_checkpoint(&checkpoint).unwrap();
    assert_eq!(model.config.hidden_size, 32);
    // No temporary left by a torn write survives a resume.
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp-"), "left over: {name}");
    }
}
