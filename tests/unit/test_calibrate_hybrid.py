"""`vllm-trianglemix calibrate` on the tiny hybrid (Qwen3-Next): it may only pick
full-attention layers (3 and 7 of 8), and its KL is recomputed independently
with tests.reference_qwen3_next (Hugging Face's forward, the mask from the rule).
"""

from __future__ import annotations

import json
import random

import pytest

from tests.reference_qwen3_next import ReferenceQwen3Next
from tests.unit.test_calibrate import calibrate
from vllm_trianglemix.config import load_layer_map, parse_layer_map
from vllm_trianglemix.tools.demo_model import build_tiny_qwen3_next

FULL_ATTENTION = [3, 7]


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    return build_tiny_qwen3_next(str(tmp_path_factory.mktemp("m") / "tiny-qwen3-next"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rng = random.Random(2)
    path = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": " ".join(f"w{rng.randrange(1000)}"
                                                             for _ in range(299))})
                              for _ in range(2)) + "\n")
    return path


def test_calibrate_picks_only_full_attention_layers(hybrid_dir, prompts_file, tmp_path):
    rc, out, res = calibrate(hybrid_dir, tmp_path, "--prompts", str(prompts_file),
                             "--min-prompt-len", "128", "--kl-budget", "1e9",
                             "--max-layers-fraction", "1.0", "--dtype", "float32")
    assert rc == 0
    per_layer = {int(k): v for k, v in res["per_layer_kl"].items()}
    assert sorted(per_layer) == FULL_ATTENTION
    assert set(res["chosen"]) <= set(FULL_ATTENTION) and res["chosen"]
    layer_map = load_layer_map(str(out))
    assert sorted(layer_map.layers) == sorted(res["chosen"])
    layer_map.check_model(8, FULL_ATTENTION)

    # Layer 3 feeds the scored rows through layers 4-7: recompute its KL independently.
    ref = ReferenceQwen3Next(hybrid_dir)
    lm = parse_layer_map({"n_init": 4, "n_local": 64, "n_last": 16, "min_prompt_len": 128,
                          "triangle_layers": [3]}, "test")
    total = 0.0
    for line, gen in zip(prompts_file.read_text().splitlines(), res["generated"]):
        ids = [1] + [int(w[1:]) + 3 for w in json.loads(line)["prompt"].split()]
        seq = ids + gen[:-1]
        dense = ref.logprobs(seq, None)[-len(gen):]
        tri = ref.logprobs(seq, lm, prompt_len=len(ids))[-len(gen):]
        total += float((dense.exp() * (dense - tri)).sum(-1).mean())
    assert per_layer[3] > 1e-6
    assert per_layer[3] == pytest.approx(total / 2, rel=1e-2)


def test_max_layers_fraction_counts_full_attention_layers(hybrid_dir, prompts_file, tmp_path):
    rc, out, res = calibrate(hybrid_dir, tmp_path, "--prompts", str(prompts_file),
                             "--min-prompt-len", "128", "--kl-budget", "1e9",
                             "--max-layers-fraction", "0.5", "--dtype", "float32", "--dynamic-rest")
    assert rc == 0 and len(res["chosen"]) == 1 and res["chosen"][0] in FULL_ATTENTION
    # --dynamic-rest: the other full-attention layer becomes a dynamic layer (no other layer)
    layer_map = load_layer_map(str(out))
    assert sorted(layer_map.dynamic_layers) == [i for i in FULL_ATTENTION if i not in res["chosen"]]
    layer_map.check_model(8, FULL_ATTENTION)
    assert "--dynamic-rest" in layer_map.notes

