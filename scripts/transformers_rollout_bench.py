#!/usr/bin/env python3
"""The workload of `grail-bench rollout`, run by Hugging Face transformers' `generate`.

The reference for the rollout-engine issue's comparison (docs/benchmarks.md): the same model
shape with random weights, the same prompt and completion lengths, sampling at temperature 1
with the KV cache on, no EOS (every sequence runs to `--new-tokens`), the samples of a prompt
asked for as `num_return_sequences`. Prints one JSON line with grail-bench's field names.

Optional dependency, not needed to build or test grail: `pip install torch transformers`.

    python3 scripts/transformers_rollout_bench.py --batch 8
    python3 scripts/transformers_rollout_bench.py --prompts 8 --num-generations 8 \
        --prompt-len 128 --new-tokens 128
    python3 scripts/transformers_rollout_bench.py --config .models/smollm2-135m-instruct/config.json
"""

import argparse
import json
import resource
import time

import torch
import transformers


def model_config(args):
    """The model shape: a config.json, or grail-bench's shape flags (grail's
    default architecture: Llama's, no attention bias, untied embeddings)."""
    if args.config:
        return transformers.AutoConfig.from_pretrained(args.config)
    return transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )


def generate(model, prompts, num_generations, new_tokens, batch):
    """Generates `num_generations` samples of each prompt, `batch` sequences per `generate` call
    (whole prompts per call, as grail's pool schedules groups); returns tokens generated."""
    per_call = max(1, batch // num_generations)
    generated = 0
    for start in range(0, prompts.shape[0], per_call):
        chunk = prompts[start : start + per_call]
        out = model.generate(
            input_ids=chunk,
            attention_mask=torch.ones_like(chunk),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            num_return_sequences=num_generations,
            use_cache=True,
            pad_token_id=0,
        )
        generated += out.shape[0] * (out.shape[1] - chunk.shape[1])
    return generated


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a Hugging Face config.json (overrides the shape flags)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--inter", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="sequences generated together")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, help="distinct prompts; default: --batch")
    p.add_argument("--num-generations", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    config = model_config(args)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.eval()
    prompts_n = args.prompts or args.batch
    prompts = torch.randint(0, config.vocab_size, (prompts_n, args.prompt_len))
    g = args.num_generations

    with torch.inference_mode():
        generate(model, prompts, g, 2, args.batch)  # warm-up
        t = time.perf_counter()
        generate(model, prompts, g, 1, args.batch)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        generated = generate(model, prompts, g, args.new_tokens, args.batch)
        total_s = time.perf_counter() - t
    decode_s = max(total_s - prefill_s, 1e-9)
    sequences = prompts_n * g
    print(
        json.dumps(
            {
                "bench": "rollout-transformers",
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "threads": args.threads,
                "params": sum(t.numel() for t in model.parameters()),
                "batch": args.batch,
                "prompts": prompts_n,
                "num_generations": g,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "generated_tokens": generated,
                "tokens_per_s": generated / total_s,
                "decode_tokens_per_s": (generated - sequences) / decode_s,
                "prefill_s": prefill_s,
                "decode_s": decode_s,
                "total_s": total_s,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
