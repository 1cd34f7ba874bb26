//! A run's folder in an object store, with blocking calls.
//!
//! grail's trainer and rollout workers are threads, not tasks: each call here runs the
//! `object_store` future to completion on a small tokio runtime the store owns, so callers need
//! no async code and no runtime of their own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::StoreError;

/// The objects of one run: every key is relative to `<url>/<run_id>/`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    root: Path,
    url: String,
    run_id: String,
    runtime: Arc<tokio::runtime::Runtime>,
    link: Option<SimulatedLink>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.location(""))
    }
}

impl Store {
    /// Opens run `run_id` in the store at `url`: `file:///abs/path` (a folder on this machine,
    /// shared by the processes that run there), `s3://bucket/prefix` (any S3-compatible server;
    /// endpoint and credentials from the `AWS_*` environment variables) or `memory://` (a new
    /// empty store, shared only by clones of this `Store`; for tests).
    ///
    /// With `GRAIL_SIMULATED_LINK=<Mbit/s>,<ms>` set (say `100,50`), every request waits the
    /// latency and every byte read or written the bandwidth: to measure a run over a commodity
    /// link on one machine.
    pub fn open(url: &str, run_id: &str) -> Result<Self, StoreError> {
        let bad_url = |why: String| StoreError::Url {
            url: url.to_string(),
            why,
        };
        let parsed = url::Url::parse(url).map_err(|e| bad_url(e.to_string()))?;
        let (inner, prefix): (Arc<dyn ObjectStore>, Path) = match parsed.scheme() {
            "memory" => (
                Arc::new(object_store::memory::InMemory::new()),
                Path::default(),
            ),
            "file" => {
                let folder = parsed
                    .to_file_path()
                    .map_err(|()| bad_url("not an absolute local path".into()))?;
                std::fs::create_dir_all(&folder).map_err(|e| {
                    bad_url(format!(
                        "cannot create the folder {}: {e}",
                        folder.display()
                    ))
                })?;
                // Empty version folders go with their last object, so listings stay short.
                let local = object_store::local::LocalFileSystem::new_with_prefix(&folder)
                    .map_err(|e| bad_url(e.to_string()))?
                    .with_automatic_cleanup(true);
                (Arc::new(local), Path::default())
            }
            // Endpoint, region and credentials from the usual AWS_* variables (AWS_ENDPOINT,
            // AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ALLOW_HTTP for an
            // http:// endpoint); conditional creates by `If-None-Match`, which S3, R2, MinIO and
            // SeaweedFS honour.
            "s3" => {
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| bad_url(e.to_string()))?;
                let prefix = Path::from_url_path(parsed.path())
                    .map_err(|e| bad_url(format!("the path after the bucket: {e}")))?;
                (Arc::new(s3), prefix)
            }
            other => {
                return Err(bad_url(format!(
                    "unsupported scheme `{other}` (use file:///path, s3://bucket/prefix or memory://)"
                )));
            }
        };
        let link =
            SimulatedLink::from_env().map_err(|why| bad_url(format!("{SIMULATED_LINK}: {why}")))?;
        Ok(Self {
            link,
            ..Self::at(inner, prefix, url, run_id)?
        })
    }

    /// Run `run_id` in an object store the caller built (object_store's throttled store, say,
    /// to measure a slow link); `label` stands for it in messages.
    pub fn over(
        inner: Arc<dyn ObjectStore>,
        label: &str,
        run_id: &str,
    ) -> Result<Self, StoreError> {
        Self::at(inner, Path::default(), label, run_id)
    }

    fn at(
        inner: Arc<dyn ObjectStore>,
        prefix: Path,
        url: &str,
        run_id: &str,
    ) -> Result<Self, StoreError> {
        if run_id.is_empty() || run_id.contains('/') || Path::parse(run_id).is_err() {
            return Err(StoreError::RunId(run_id.to_string()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("grail-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Url {
                url: url.to_string(),
                why: format!("cannot start the store's I/O runtime: {e}"),
            })?;
        Ok(Self {
            inner,
            root: prefix.join(run_id),
            url: url.trim_end_matches('/').to_string(),
            run_id: run_id.to_string(),
            runtime: Arc::new(runtime),
            link: None,
        })
    }

    /// Where `key` lives, for messages: `<url>/<run_id>/<key>`.
    pub fn location(&self, key: &str) -> String {
        format!("{}/{}/{key}", self.url, self.run_id)
    }

    fn path(&self, key: &str) -> Path {
        key.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.root.clone(), |p, part| p.join(part))
    }

    /// A request of `bytes` over the simulated link, if there is one.
    fn wait(&self, bytes: usize) {
        if let Some(link) = &self.link {
            let transfer = Duration::from_secs_f64(link.seconds_per_byte * bytes as f64);
            std::thread::sleep(link.latency + transfer);
        }
    }

    fn io(&self, key: &str, e: object_store::Error) -> StoreError {
        StoreError::Io {
            key: self.location(key),
            source: Box::new(e),
        }
    }

    /// Writes `key`, replacing what was there.
    pub fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.wait(bytes.len());
        let path = self.path(key);
        self.runtime
            .block_on(self.inner.put(&path, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| self.io(key, e))
    }

    /// Writes `key` only if no object is there (a conditional create): `Ok(false)` when one
    /// already is, which is how two writers agree on who made an object.
    pub fn create(&self, key: &str, bytes: Vec<u8>) -> Result<bool, StoreError> {
        self.wait(bytes.len());
        let path = self.path(key);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .runtime
            .block_on(self.inner.put_opts(&path, PutPayload::from(bytes), opts))
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.io(key, e)),
        }
    }

    /// The bytes of `key`, or `None` when there is no such object.
    pub fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(key);
        let read = async {
            let got = self.inner.get(&path).await?;
            got.bytes().await
        };
        match self.runtime.block_on(read) {
            Ok(b) => {
                self.wait(b.len());
                Ok(Some(b))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.io(key, e)),
        }
    }

    /// Every key under `prefix` (relative to the run, sorted).
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.wait(0);
        let path = self.path(prefix);
        let metas: Vec<_> = self
            .runtime
            .block_on(self.inner.list(Some(&path)).try_collect())
            .map_err(|e| self.io(prefix, e))?;
        let root = format!("{}/", self.root);
        let mut keys: Vec<String> = metas
            .into_iter()
            .filter_map(|m| m.location.as_ref().strip_prefix(&root).map(str::to_string))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Removes `key`; removing what is not there is not an error.
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.wait(0);
        let path = self.path(key);
        match self.runtime.block_on(self.inner.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.io(key, e)),
        }
    }
}

/// The environment variable that slows a store down to a simulated link (see [`Store::open`]).
pub const SIMULATED_LINK: &str = "GRAIL_SIMULATED_LINK";

/// A slow link in front of the store, as `GRAIL_SIMULATED_LINK` asks. object_store's
/// `ThrottledStore` cannot wrap a local folder (it panics on reads of local files) and does not
/// slow uploads per byte, so the store waits itself, before each request (or after a read).
#[derive(Debug, Clone, Copy)]
struct SimulatedLink {
    latency: Duration,
    seconds_per_byte: f64,
}

impl SimulatedLink {
    fn from_env() -> Result<Option<Self>, String> {
        match std::env::var(SIMULATED_LINK) {
            Ok(text) => Self::parse(&text).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// `<Mbit/s>,<latency ms>`.
    fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not `<Mbit/s>,<latency ms>` (e.g. `100,50`)");
        let (mbit, ms) = text.split_once(',').ok_or_else(bad)?;
        let mbit: f64 = mbit.trim().parse().map_err(|_| bad())?;
        let ms: u64 = ms.trim().parse().map_err(|_| bad())?;
        // From a modem to a datacenter link; an hour per request at most.
        if !(0.01..=1e6).contains(&mbit) || ms > 3_600_000 {
            return Err(format!(
                "`{text}`: the bandwidth must be 0.01 to 1,000,000 Mbit/s, the latency at most an hour"
            ));
        }
        Ok(Self {
            latency: Duration::from_millis(ms),
            seconds_per_byte: 8.0 / (mbit * 1e6),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_link_is_bandwidth_and_latency_or_an_error_saying_the_form() {
        let link = SimulatedLink::parse("100, 50").unwrap();
        assert_eq!(link.latency, Duration::from_millis(50));
        assert!((link.seconds_per_byte - 80e-9).abs() < 1e-15);
        for bad in ["100", "fast,50", "100,-1", ""] {
            let err = SimulatedLink::parse(bad).unwrap_err();
            assert!(err.contains("<Mbit/s>,<latency ms>"), "{bad}: {err}");
        }
        for out_of_range in ["0,50", "1e-9,50", "inf,50", "NaN,50", "100,99999999"] {
            let err = SimulatedLink::parse(out_of_range).unwrap_err();
            assert!(
                err.contains("0.01 to 1,000,000 Mbit/s"),
                "{out_of_range}: {err}"
            );
        }
    }
}
