"""`vllm-trianglemix calibrate` on the tiny model, on CPU, checked against the float64 reference.

The per-layer KL the tool reports is recomputed independently with
``tests.reference_llama.ReferenceLlama`` (its own forward, the mask from the
rule) on the same prompts and greedy tokens: a wrong mask, wrong layer or
wrong scored position changes the numbers.
"""

from __future__ import annotations

import json
import random

import pytest

from tests.reference_llama import ReferenceLlama
from vllm_trianglemix.tools.cli import main
from vllm_trianglemix.config import load_layer_map, parse_layer_map
from vllm_trianglemix.tools.demo_model import build_tiny_llama

NUM_LAYERS = 4
PARAMS = ["--n-init", "4", "--n-local", "64", "--n-last", "16", "--device", "cpu",
          "--num-generated", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(str(tmp_path_factory.mktemp("m") / "tiny-llama-trianglemix-demo"))


@pytest.fixture(scope="module")
def word_prompts(tmp_path_factory):
    """Two prompts of 383 random words (384 tokens with <s>)."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    lines = [json.dumps({"prompt": " ".join(f"w{rng.randrange(1000)}" for _ in range(383))})
             for _ in range(2)]
    path.write_text("\n".join(lines) + "\n")
    return path


def calibrate(model_dir, out_dir, *extra):
    out, js = out_dir / "map.yaml", out_dir / "result.json"
    rc = main(["calibrate", "--model", model_dir, "--out", str(out), "--json", str(js),
               *PARAMS, *extra])
    return rc, out, (json.loads(js.read_text()) if js.exists() else None)


@pytest.fixture(scope="module")
def full_walk(model_dir, word_prompts, tmp_path_factory):
    """Every layer allowed: the walk records the joint KL of each nested set."""
    out_dir = tmp_path_factory.mktemp("full")
    rc, out, res = calibrate(model_dir, out_dir, "--prompts", str(word_prompts),
                             "--min-prompt-len", "128", "--kl-budget", "1e9",
                             "--max-layers-fraction", "1.0")
    assert rc == 0
    return out, res


def reference_kl(ref, prompts, generated, layers):
    layer_map = parse_layer_map(
        {"n_init": 4, "n_local": 64, "n_last": 16, "min_prompt_len": 128,
         "triangle_layers": sorted(layers)}, "test")
    total = 0.0
    for ids, gen in zip(prompts, generated):
        seq = ids + gen[:-1]
        dense = ref.logprobs(seq, None)[-len(gen):]
        tri = ref.logprobs(seq, layer_map, prompt_len=len(ids))[-len(gen):]
        total += float((dense.exp() * (dense - tri)).sum(-1).mean())  # float64: no cancellation issue
    return total / len(prompts)


def test_map_is_valid_and_kl_matches_reference(model_dir, word_prompts, full_walk):
    out, res = full_walk
    layer_map = load_layer_map(str(out))
    layer_map.check_model(NUM_LAYERS)
    assert sorted(layer_map.layers) == list(range(NUM_LAYERS))
    assert layer_map.num_hidden_layers == NUM_LAYERS and layer_map.min_prompt_len == 128
    assert {(p.n_init, p.n_local, p.n_last) for p in layer_map.layers.values()} == {(4, 64, 16)}
    header = out.read_text()
    assert "# command: vllm-trianglemix calibrate" in header and "KL alone" in header

    per_layer = {int(k): v for k, v in res["per_layer_kl"].items()}
    assert sorted(per_layer) == list(range(NUM_LAYERS))
    # Every layer but the last changes what later layers read at the scored rows;
    # the last layer's triangle rows feed no scored token, so its KL is 0.
    assert all(per_layer[i] > 1e-9 for i in range(NUM_LAYERS - 1)), per_layer
    assert per_layer[NUM_LAYERS - 1] < 1e-9

    ref = ReferenceLlama(model_dir)
    prompts = [[1] + [int(w[1:]) + 3 for w in json.loads(line)["prompt"].split()]
               for line in word_prompts.read_text().splitlines()]
    assert res["prompt_lens"] == [len(p) for p in prompts] == [384, 384]
    for ids, gen in zip(prompts, res["generated"]):
        assert len(gen) == 5  # last prompt position + 4 generated tokens scored
        greedy = ref.logprobs(ids + gen[:-1], None)[-len(gen):].argmax(-1).tolist()
        assert greedy == gen
    for layer in range(NUM_LAYERS - 1):
        expect = reference_kl(ref, prompts, res["generated"], [layer])
        assert per_layer[layer] == pytest.approx(expect, rel=1e-3), layer
    expect_all = reference_kl(ref, prompts, res["generated"], range(NUM_LAYERS))
    assert res["joint_kl"] == pytest.approx(expect_all, rel=1e-3)


def test_kl_budget_is_respected(model_dir, word_prompts, full_walk, tmp_path):
    steps = full_walk[1]["steps"]
    assert steps[2]["kl"] > steps[1]["kl"]
    budget = (steps[1]["kl"] + steps[2]["kl"]) / 2
    rc, out, res = calibrate(model_dir, tmp_path, "--prompts", str(word_prompts),
                             "--min-prompt-len", "128", "--kl-budget", repr(budget),
                             "--max-layers-fraction", "1.0")
    assert rc == 0
    assert res["chosen"] == steps[1]["layers"]
    assert res["joint_kl"] <= budget
    assert res["steps"][-1]["accepted"] is False and res["steps"][-1]["kl"] > budget
    assert sorted(load_layer_map(str(out)).layers) == steps[1]["layers"]


def test_max_layers_fraction(model_dir, word_prompts, full_walk, tmp_path):
    rc, out, res = calibrate(model_dir, tmp_path, "--prompts", str(word_prompts),
                             "--min-prompt-len", "128", "--kl-budget", "1e9",
                             "--max-layers-fraction", "0.5")
    assert rc == 0 and res["chosen"] == full_walk[1]["steps"][1]["layers"]
    assert sorted(load_layer_map(str(out)).layers) == res["chosen"]


@pytest.mark.parametrize("prompt_len,min_prompt_len", [(60, 16), (100, 128)])
def test_all_dense_prompts_give_exactly_zero(model_dir, tmp_path, prompt_len, min_prompt_len):
    """Synthetic prompts whose rows are all dense: shorter than n_init + n_local, or than
    min_prompt_len. Every mask equals causal, so the KL is exactly 0."""
    rc, out, res = calibrate(model_dir, tmp_path, "--prompt-len", str(prompt_len),
                             "--min-prompt-len", str(min_prompt_len), "--num-prompts", "2",
                             "--max-layers-fraction", "1.0")
    assert rc == 0
    assert res["prompt_lens"] == [prompt_len, prompt_len]
    assert all(v == 0.0 for v in res["per_layer_kl"].values()), res["per_layer_kl"]
    assert res["joint_kl"] == 0.0
    assert sorted(load_layer_map(str(out)).layers) == list(range(NUM_LAYERS))


def test_no_layer_within_budget_writes_no_map(model_dir, tmp_path):
    rc, out, res = calibrate(model_dir, tmp_path, "--prompt-len", "200", "--num-prompts", "1",
                             "--min-prompt-len", "128", "--kl-budget", "-1")
    assert rc == 1 and not out.exists() and res["chosen"] == []


def test_cli_lists_only_importable_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "calibrate" in text
