//! What the example binaries share: the flags that place a process in a run spread over
//! processes (`--role`, `--store`, `--run-id`, `--worker-id`), each overriding its config key.

use anyhow::Result;
use grail::GrpoConfig;
use grail::config::Role;

/// `--role`, `--store`, `--run-id`, `--worker-id`: the config keys of the same names.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunFlags {
    /// all (pool and trainer in this process) | trainer | rollout (processes meeting in --store).
    #[arg(long)]
    pub role: Option<Role>,
    /// The object store the trainer and rollout workers meet in (file:///absolute/path).
    #[arg(long)]
    pub store: Option<String>,
    /// The run's folder in the store.
    #[arg(long)]
    pub run_id: Option<String>,
    /// This rollout worker's id (default: host, process id and start time).
    #[arg(long)]
    pub worker_id: Option<String>,
}

impl RunFlags {
    /// Sets the config keys given as flags and checks the result.
    pub fn apply(&self, cfg: &mut GrpoConfig) -> Result<()> {
        if let Some(role) = self.role {
            cfg.role = role;
        }
        if let Some(store) = &self.store {
            cfg.store = Some(store.clone());
        }
        if let Some(run_id) = &self.run_id {
            cfg.run_id = run_id.clone();
        }
        if let Some(worker_id) = &self.worker_id {
            cfg.worker_id = Some(worker_id.clone());
        }
        cfg.validate()
    }
}
