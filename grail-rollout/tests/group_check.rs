//! The environment's check of a worker's groups: every group a real pool sends passes (and keeps
//! its rewards, recomputed), and each cheat is caught in every group — rewards inflated, the
//! prompt of another index, a completion cut short or carried on past its EOS.

mod common;

use std::sync::Arc;

use burn::tensor::Device;
use grail_core::model::CausalLm;
use grail_protocol::Group;
use grail_rollout::generate::GenerationConfig;
use grail_rollout::group_check::check_group;
use grail_rollout::sampling::SamplingConfig;
use grail_rollout::verify::Rejection;
use grail_rollout::{Completion, Environment, PoolConfig, Prompt, Reward, spawn_pool};

use common::tiny_config;

const EOS: u32 = 5;
const PROMPTS: u64 = 128;

/// Prompts of 2 to 6 tokens; rewards: the share of even tokens, and whether it finished.
struct Evens {
    rewards: Vec<Reward>,
}

impl Evens {
    fn new() -> Self {
        let rewards = vec![
            Reward::new("evens", 1.0, |_p: &Prompt, c: &Completion| {
                c.ids.iter().filter(|&&t| t % 2 == 0).count() as f32 / c.ids.len().max(1) as f32
            }),
            Reward::new("finished", 0.5, |_p: &Prompt, c: &Completion| {
                c.finished as u8 as f32
            }),
        ];
        Self { rewards }
    }
}

impl Environment for Evens {
    fn prompt(&self, index: u64) -> grail_core::Result<Option<Prompt>> {
        Ok((index < PROMPTS).then(|| Prompt {
            id: index,
            text: String::new(),
            ids: Arc::new(
                (0..2 + index % 5)
                    .map(|t| ((index + 3 * t) % 58) as u32 + 6)
                    .collect(),
            ),
            answer: String::new(),
            metadata: serde_json::Value::Null,
        }))
    }
    fn rewards(&self) -> &[Reward] {
        &self.rewards
    }
    fn decode(&self, ids: &[u32]) -> String {
        format!("{ids:?}")
    }
}

fn generation() -> GenerationConfig {
    GenerationConfig {
        sampling: SamplingConfig {
            temperature: 1.0,
            ..SamplingConfig::default()
        },
        max_completion_length: 16,
        max_batch: 32,
        eos_token_ids: vec![EOS],
        seed: 11,
        ..GenerationConfig::default()
    }
}

/// Every group of the environment, as a real pool sends them.
fn honest_groups(env: &Arc<Evens>) -> Vec<Group> {
    let model = CausalLm::init(&tiny_config(64), 4, &Device::flex());
    let cfg = PoolConfig {
        workers: 1,
        num_generations: 4,
        prompts_per_batch: 8,
        generation: generation(),
        channel_capacity: 4,
        ..PoolConfig::default()
    };
    let pool = spawn_pool(&model, env.clone(), cfg).unwrap();
    let groups: Vec<Group> = pool.groups.iter().collect();
    pool.shutdown().unwrap();
    assert_eq!(groups.len() as u64, PROMPTS);
    groups
}

/// Checks every group of `groups` (each with its claimed prompt); the rejections.
fn check_all(env: &Evens, groups: &mut [Group]) -> Vec<Rejection> {
    groups
        .iter_mut()
        .filter_map(|g| {
            let prompt = env.prompt(g.prompt_id).unwrap().unwrap();
            check_group(env, &prompt, &generation(), g)
                .err()
                .map(|(_, why)| why)
        })
        .collect()
}

#[test]
fn honest_groups_pass_and_each_cheat_is_caught_in_every_group() {
    let env = Arc::new(Evens::new());
    let honest = honest_groups(&env);
    let finished = honest
        .iter()
        .flat_map(|g| &g.samples)
        .filter(|s| s.completion_ids.last() == Some(&EOS))
        .count();
    let samples = honest.len() * 4;
    assert!(
        finished > 0 && finished < samples,
        "both endings occur: {finished} of {samples} finished"
    );
    let mut groups = honest.clone();
    assert_eq!(check_all(&env, &mut groups), []);
    assert_eq!(groups, honest, "recomputed rewards equal the pool's");

    type Cheat = fn(&mut Group);
    let cheats: [(&str, Cheat, &str); 5] = [
        (
            "rewards inflated",
            |g| g.samples[1].rewards[0] += 0.25,
            "rewards",
        ),
        (
            "finished claimed",
            |g| {
                g.samples
                    .iter_mut()
                    .for_each(|s| s.rewards[1] = 1.0 - s.rewards[1])
            },
            "rewards",
        ),
        (
            "another prompt's tokens",
            |g| g.prompt_id = (g.prompt_id + 1) % PROMPTS,
            "prompt",
        ),
        (
            "cut short",
            |g| {
                let s = &mut g.samples[2];
                let keep = s.completion_ids.len() - 1;
                s.completion_ids.truncate(keep.max(1));
                if s.completion_ids.last() == Some(&EOS) {
                    s.completion_ids.push(EOS + 1);
                }
            },
            "termination",
        ),
        (
            "carried on past the end",
            |g| {
                let s = &mut g.samples[3];
                match s.completion_ids.last() {
                    Some(&EOS) => s.completion_ids.push(7),
                    _ => s.completion_ids[0] = EOS,
                }
            },
            "termination",
        ),
    ];
    for (cheat, edit, reason) in cheats {
        let mut groups = honest.clone();
        groups.iter_mut().for_each(edit);
        let rejections = check_all(&env, &mut groups);
        assert_eq!(
            rejections.len(),
            honest.len(),
            "{cheat}: caught in every group"
        );
        for why in rejections {
            assert_eq!(why.reason(), reason, "{cheat}: {why}");
        }
    }
}
