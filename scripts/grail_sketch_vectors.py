#!/usr/bin/env python3
"""Test vectors for grail-protocol's sketch (`grail-protocol/src/proof.rs`), computed by the
Python grail's own verifier, so that a sketch means the same thing in both systems.

Needs a checkout of one-covenant/grail (only `grail/protocol/` is loaded, not the package's
`__init__`, so none of its network dependencies are needed) and `pip install numpy torch`.

    python3 scripts/grail_sketch_vectors.py --grail-src ../grail \
        --out grail-protocol/tests/data/grail_v5_sketches.json
"""

import argparse
import importlib
import json
import math
import sys
import types

import numpy as np
import torch


def load_verifier(src):
    """grail.protocol.grail_verifier without running grail/__init__.py or
    grail/protocol/__init__.py (which import bittensor, dotenv and the rest)."""
    for name, path in (("grail", f"{src}/grail"), ("grail.protocol", f"{src}/grail/protocol")):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    constants = importlib.import_module("grail.protocol.constants")
    verifier = importlib.import_module("grail.protocol.grail_verifier")
    return constants, verifier


def hidden_rows(rng, rows, size):
    """Hidden states shaped like a model's last layer: mostly O(1), a few outliers (the
    "massive activations" of real checkpoints), some exact zeros and near-zeros."""
    h = rng.standard_normal((rows, size)).astype(np.float32)
    for row in h:
        outliers = rng.choice(size, size=4, replace=False)
        row[outliers] *= rng.uniform(20.0, 400.0, size=4).astype(np.float32)
        row[rng.choice(size, size=3, replace=False)] = 0.0
        row[rng.choice(size, size=2, replace=False)] = rng.uniform(-2e-6, 2e-6, 2)
    return h


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grail-src", required=True, help="a checkout of one-covenant/grail")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    constants, verifier_module = load_verifier(args.grail_src)

    rng = np.random.default_rng(20261203)
    cases = []
    for randomness, size, rows in (
        ("00" * 32, 32, 4),
        ("0x" + "ff" * 32, 64, 4),
        (bytes(range(32)).hex(), 576, 6),
        (rng.bytes(32).hex(), 896, 6),
        (rng.bytes(7).hex()[1:], 128, 3),  # odd length: grail pads a leading zero
    ):
        verifier = verifier_module.GRAILVerifier(hidden_dim=size)
        r_vec = verifier.generate_r_vec(randomness)
        h = torch.from_numpy(hidden_rows(rng, rows, size))
        sketches = [c["sketch"] for c in verifier.create_commitments_batch(h, r_vec)]
        one_by_one = [verifier.create_commitment(row, r_vec)["sketch"] for row in h]
        assert sketches == one_by_one, "grail's batched and scalar sketches disagree"
        cases.append(
            {
                "randomness": randomness,
                "coefficients": r_vec.tolist(),
                "hidden": h.tolist(),
                "sketches": sketches,
            }
        )

    values = [0.0, -0.0, 1e-7, -9.99e-7, 1e-6, 0.5, -0.5, 1.0, 3.0, -3.0, 10.0, -31.0, 100.0,
              400.0, 1e4, -1e30, math.inf, -math.inf, math.nan]
    values += list(rng.standard_normal(40) * 30)
    for n in range(1, 8):  # bucket edges, |x| = 2^(10n/8) - 1, and their float32 neighbours
        edge = np.float32(2.0 ** (1.25 * n) - 1.0)
        values += [np.nextafter(edge, np.float32(0)), edge, np.nextafter(edge, np.float32(1e9))]
    values = [float(np.float32(v)) for v in values]
    # Special values as strings: JSON has no infinity or NaN.
    buckets = [
        [v if math.isfinite(v) else str(v), verifier_module.log_magnitude_bucket(v)]
        for v in values
    ]
    positions = [0, 1, 2, 15, 100, 1000, 8191, 8192]
    tolerances = [[p, verifier_module.adaptive_sketch_tolerance(p, p + 1)] for p in positions]

    out = {
        "source": "one-covenant/grail grail/protocol/grail_verifier.py, proof version "
        + constants.GRAIL_PROOF_VERSION,
        "prime_q": constants.PRIME_Q,
        "buckets": buckets,
        "tolerances": tolerances,
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(out, f)
        f.write("\n")


if __name__ == "__main__":
    main()
