//! Tokenizers: Hugging Face `tokenizer.json` through the `tokenizers` crate, special tokens from
//! the checkpoint's configs, chat templates rendered with minijinja as transformers renders them,
//! and a byte-level BPE trained at run time for self-contained examples and tests.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use tokenizers::AddedToken;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::atomic;
use crate::error::{GrailError, Result};

/// One message of a chat, as chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"` or `"assistant"`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A tokenizer with its special tokens and (optional) chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token, if any.
    pub bos_token: Option<String>,
    /// End-of-sequence token, if any.
    pub eos_token: Option<String>,
    /// Padding token, if any.
    pub pad_token: Option<String>,
    /// Every token id that ends a generation (the eos token plus generation_config's ids).
    pub eos_token_ids: Vec<u32>,
    /// The Jinja chat template of `tokenizer_config.json`, if any.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_token", &self.pad_token)
            .finish()
    }
}

/// A special token in `tokenizer_config.json`: a plain string or an AddedToken object.
fn token_content(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| GrailError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| GrailError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

impl Tokenizer {
    /// Wraps a `tokenizers` tokenizer with no special tokens or template.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            eos_token_ids: Vec::new(),
            chat_template: None,
        }
    }

    /// Loads `tokenizer.json` from `dir`, with special tokens and the chat template from
    /// `tokenizer_config.json` and extra end-of-sequence ids from `generation_config.json` when
    /// those files exist.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(GrailError::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        // tokenizers 0.23 panics (an `expect` in its decoder deserializer) on some malformed
        // files instead of returning an error: a bad file must be an error naming it.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(&path)).map_err(
            |panic| {
                let why = grail_protocol::panic_message(panic.as_ref());
                GrailError::Tokenizer(format!(
                    "{}: malformed tokenizer file ({why})",
                    path.display()
                ))
            },
        )?;
        let inner =
            parsed.map_err(|e| GrailError::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut tok = Self::from_inner(inner);
        if let Some(cfg) = read_json_opt(&dir.join("tokenizer_config.json"))? {
            tok.bos_token = token_content(cfg.get("bos_token"));
            tok.eos_token = token_content(cfg.get("eos_token"));
            tok.pad_token = token_content(cfg.get("pad_token"));
            tok.chat_template = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: transformers uses the one called "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
        }
        if let Some(eos) = tok.eos_token.as_deref().and_then(|t| tok.token_to_id(t)) {
            tok.eos_token_ids.push(eos);
        }
        if let Some(gen_cfg) = read_json_opt(&dir.join("generation_config.json"))? {
            let ids: Vec<u32> = match gen_cfg.get("eos_token_id") {
                Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_u64().map(|n| n as u32))
                    .collect(),
                _ => Vec::new(),
            };
            for id in ids {
                if !tok.eos_token_ids.contains(&id) {
                    tok.eos_token_ids.push(id);
                }
            }
        }
        Ok(tok)
    }

    /// Trains a byte-level BPE tokenizer on `texts` (any text round-trips exactly), with
    /// `special_tokens` added first (ids 0, 1, ...). The first special token, if any, becomes the
    /// eos and pad token. Deterministic for the same inputs.
    pub fn train_bpe<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
        special_tokens: &[&str],
    ) -> Result<Self> {
        let specials: Vec<AddedToken> = special_tokens
            .iter()
            .map(|s| AddedToken::from(s.to_string(), true))
            .collect();
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::new(false, true, true)));
        inner
            .train(&mut trainer, texts)
            .map_err(|e| GrailError::Tokenizer(format!("BPE training failed: {e}")))?;
        let mut tok = Self::from_inner(inner);
        if let Some(first) = special_tokens.first() {
            tok.eos_token = Some(first.to_string());
            tok.pad_token = Some(first.to_string());
            tok.eos_token_ids = tok.token_to_id(first).into_iter().collect();
        }
        Ok(tok)
    }

    /// Writes `tokenizer.json`, a `tokenizer_config.json` with the special tokens and chat
    /// template, and a `generation_config.json` with every end-of-sequence id to `dir`, so that
    /// [`from_dir`](Self::from_dir) reads back the same tokenizer (a rollout worker given the
    /// run's tokenizer stops where the trainer's generation stops).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| GrailError::io(dir, e))?;
        atomic::write_file_with(&dir.join("tokenizer.json"), |tmp| {
            self.inner
                .save(tmp, false)
                .map_err(|e| GrailError::Tokenizer(format!("saving tokenizer.json: {e}")))
        })?;
        let cfg = serde_json::json!({
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        atomic::write_file(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&cfg)
                .expect("JSON value")
                .as_bytes(),
        )?;
        if self.eos_token_ids.is_empty() {
            return Ok(());
        }
        let generation = serde_json::json!({ "eos_token_id": self.eos_token_ids });
        atomic::write_file(
            &dir.join("generation_config.json"),
            serde_json::to_string_pretty(&generation)
                .expect("JSON value")
                .as_bytes(),
        )
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Id of the eos token, if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token_ids.first().copied()
    }

    /// Id of the pad token, if any.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Id of the bos token, if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Token ids of `text` (with the tokenizer's post-processor specials when
    /// `add_special_tokens`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| GrailError::Tokenizer(format!("encode: {e}")))
    }

    /// Text of `ids`, optionally without special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| GrailError::Tokenizer(format!("decode: {e}")))
    }

    /// Renders the chat template for `messages` as transformers' `apply_chat_template` does
    /// (`trim_blocks` and `lstrip_blocks` on; `bos_token`, `eos_token`, `add_generation_prompt`
    /// and `raise_exception` available; Python string methods such as `.strip()` supported).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, &Value::Null)
    }

    /// [`Tokenizer::apply_chat_template`] with `extra` template variables: what transformers'
    /// `apply_chat_template(..., **kwargs)` passes on to the template, such as Qwen3's thinking
    /// switch `json!({"enable_thinking": false})`. `extra` is a JSON object (or null for none);
    /// see [`render_chat_template_with`].
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &Value,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| GrailError::Template("this tokenizer has no chat_template".into()))?;
        render_chat_template_with(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
            extra,
        )
    }
}

/// The variables every render sets; `extra` may not redefine them.
const STANDARD_TEMPLATE_VARIABLES: [&str; 4] = [
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

/// Renders a Hugging Face chat template (see [`Tokenizer::apply_chat_template`]).
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    render_chat_template_with(
        template,
        messages,
        add_generation_prompt,
        bos_token,
        eos_token,
        &Value::Null,
    )
}

/// [`render_chat_template`] with `extra` template variables: each key of the JSON object
/// `extra` becomes a variable (JSON `false` passes the template's `is false` test, as Python's
/// `False` does). `Value::Null` adds none. Anything but an object or null is an error, and so is
/// a key that names a variable every render sets (`messages`, `add_generation_prompt`,
/// `bos_token`, `eos_token`): transformers rejects such a duplicate keyword too, and silently
/// shadowing one would render something other than what the caller asked for.
pub fn render_chat_template_with(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
    extra: &Value,
) -> Result<String> {
    let extra = match extra {
        Value::Null => None,
        Value::Object(map) => Some(map),
        other => {
            return Err(GrailError::Template(format!(
                "extra template variables must be a JSON object, not {other}"
            )));
        }
    };
    if let Some(map) = extra {
        for name in STANDARD_TEMPLATE_VARIABLES {
            if map.contains_key(name) {
                return Err(GrailError::Template(format!(
                    "extra template variable `{name}` would replace the one the render sets"
                )));
            }
        }
    }
    let mut env = minijinja::Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("default delimiters are valid"),
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let tmpl = env
        .template_from_str(template)
        .map_err(|e| GrailError::Template(format!("parse: {e}")))?;
    let standard = minijinja::context! {
        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    // No key is in both maps (checked above), so the merge order does not matter.
    let ctx = match extra {
        Some(map) => minijinja::value::merge_maps([
            standard,
            minijinja::Value::from(minijinja::value::Serde(map)),
        ]),
        None => standard,
    };
    tmpl.render(ctx)
        .map_err(|e| GrailError::Template(format!("render: {e}")))
}
