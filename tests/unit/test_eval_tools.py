"""The pieces of `vllm-trianglemix eval` that need no server: the log-likelihood numbers,
the derived maps (bad map, dynamic-only), the per-layer KL read back from a calibrated
map's header, the checks and the report."""

from __future__ import annotations

import argparse
import math

import pytest

from vllm_trianglemix.config import load_layer_map
from vllm_trianglemix.tools import eval_maps, eval_report, loglik
from vllm_trianglemix.tools.calibrate import Selection, layer_kl_from_map, map_text
from vllm_trianglemix.tools.evaluate import checks


def _row(probs: dict[int, float]) -> dict[int, tuple[float, int]]:
    ranked = sorted(probs, key=lambda t: -probs[t])
    return {t: (math.log(probs[t]), ranked.index(t) + 1) for t in probs}


def test_position_stats_identical_and_known_kl():
    d = _row({1: 0.5, 2: 0.3, 3: 0.1})
    same = loglik.position_stats(2, d, d, top_k=3)
    assert same["kl"] == pytest.approx(0.0, abs=1e-12)
    assert same["top1"] == 1.0 and same["dlp"] == 0.0
    o = _row({1: 0.2, 2: 0.6, 3: 0.1})
    s = loglik.position_stats(2, d, o, top_k=3)
    # dense top-3 plus the rest bucket (0.1 each side)
    expect = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.6)
    assert s["kl"] == pytest.approx(expect, rel=1e-9)
    assert s["top1"] == 0.0 and s["dlp"] == pytest.approx(abs(math.log(0.3) - math.log(0.6)))


def test_position_stats_token_outside_the_other_top_k():
    """A dense top-k token the other server did not return gets at most its k-th probability."""
    d = _row({1: 0.6, 2: 0.3})
    o = _row({1: 0.9, 3: 0.05})  # token 2 missing: 0.05 left over, k-th prob 0.05
    s = loglik.position_stats(1, d, o, top_k=2)
    q2 = min(0.05, 1 - 0.95)
    expect = 0.6 * math.log(0.6 / 0.9) + 0.3 * math.log(0.3 / q2) + 0.1 * math.log(0.1 / (1 - 0.9 - q2))
    assert s["kl"] == pytest.approx(expect, rel=1e-9)


def test_compare_scores_the_tail_and_every_position():
    ids = [[5] * 11]
    d = [[_row({5: 0.9, 6: 0.05})] * 10]
    o = [[_row({5: 0.9, 6: 0.05})] * 6 + [_row({6: 0.9, 5: 0.05})] * 4]
    out = loglik.compare(ids, d, o, top_k=2, tail=4, bucket=4)
    assert out["positions"] == 4 and out["top1_agreement"] == 0.0
    assert out["all_positions"]["positions"] == 10
    assert out["all_positions"]["top1_agreement"] == pytest.approx(0.6)
    assert [b["from"] for b in out["by_position"]] == [0, 4, 8]


@pytest.fixture
def calibrated(tmp_path):
    """A map as calibrate writes it (header with the per-layer KL), and its dynamic variant."""
    args = argparse.Namespace(model=str(tmp_path / "tiny"), model_name="org/Tiny-Model",
                              out="m.yaml", kl_budget=0.02, max_layers_fraction=0.5, n_init=4,
                              n_local=[64], n_local_chosen=64, n_last=16, min_prompt_len=128,
                              num_generated=4, device="cpu", dtype_used="float32", dynamic_rest=False)
    per_layer = {0: 0.3, 1: 0.02, 2: 0.001, 3: 0.0, 4: 0.5, 5: 0.004}
    sel = Selection(per_layer, [], [2, 3, 5], 0.004, "reached --max-layers-fraction (3 layers)")
    base = tmp_path / "tiny-model.yaml"
    base.write_text(map_text(args, 6, sel, "2 prompts"))
    (tmp_path / "tiny-model-dynamic.yaml").write_text(
        map_text(args, 6, sel, "2 prompts", dynamic=True, match=False))
    return base, per_layer


def test_layer_kl_read_back_and_bad_map(calibrated, tmp_path):
    base_path, per_layer = calibrated
    assert layer_kl_from_map(str(base_path)) == pytest.approx(per_layer)
    base = load_layer_map(str(base_path))
    assert base.model == "org/Tiny-Model" and base.match == ("Tiny-Model",)
    assert eval_maps.worst_layers(base, None) == [0, 1, 4]
    assert eval_maps.worst_layers(base, "1-2") == [1, 2]
    dyn = eval_maps.dynamic_map(None, base)
    assert sorted(dyn.dynamic_layers) == [0, 1, 4] and not dyn.match
    paths = eval_maps.derived_maps(base, dyn, [0, 1, 4], str(tmp_path / "derived"))
    bad = load_layer_map(paths["triangle-bad"])
    assert sorted(bad.layers) == [0, 1, 4] and not bad.match
    assert (bad.defaults, bad.min_prompt_len) == (base.defaults, base.min_prompt_len)
    only = load_layer_map(paths["dynamic-only"])
    assert not only.layers and sorted(only.dynamic_layers) == list(range(6))
    assert "triangle-full" not in paths


def test_triangle_full_map_is_dense_on_the_plugin_path(calibrated, tmp_path):
    """The noise-floor map: the calibrated layers, a window reaching the first key of every
    prompt up to the given length (a dense mask), yet a full-length prompt still has rows past
    the first sparse row, so the plugin computes the calibrated layers."""
    import numpy as np

    from vllm_trianglemix.pattern import dense_start, first_sparse_row, visible

    base = load_layer_map(str(calibrated[0]))
    paths = eval_maps.derived_maps(base, eval_maps.dynamic_map(None, base), [],
                                   str(tmp_path / "derived"), full_length=512)
    assert "triangle-bad" not in paths  # no bad layers: --configs without triangle-bad
    full = load_layer_map(paths["triangle-full"])
    assert sorted(full.layers) == sorted(base.layers) and not full.match
    (params,) = full.param_sets
    assert (params.n_init, params.n_last) == (base.defaults.n_init, base.defaults.n_last)
    assert first_sparse_row(params) < 512  # routed: not every row is below the first sparse one
    for prompt in (128, 300, 511, 512):
        q = np.arange(prompt)
        d = dense_start(prompt, params.n_last, full.min_prompt_len)
        mask = visible(q[:, None], q[None, :], d, params.n_init, params.n_local)
        assert (mask == (q[None, :] <= q[:, None])).all(), prompt
    with pytest.raises(Exception, match="no room"):
        eval_maps.derived_maps(base, base, [0], str(tmp_path / "d2"), full_length=16)


def test_bad_layers_need_a_calibrated_map(tmp_path):
    from vllm_trianglemix.tools.errors import ToolError

    path = tmp_path / "plain.yaml"
    path.write_text("n_init: 4\nn_local: 64\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: [1]\n")
    with pytest.raises(ToolError, match="--bad-layers"):
        eval_maps.worst_layers(load_layer_map(str(path)), None)


def _report(tri_score: float, bad_kl: float) -> dict:
    def config(score, kl, top1):
        ll = {"positions": 64, "top1_agreement": top1, "kl": kl, "max_kl": kl, "ppl": 10.0,
              "ppl_dense": 10.0, "mean_abs_delta_logprob": 0.1,
              "all_positions": {"positions": 100, "top1_agreement": top1, "kl": kl},
              "by_position": [{"from": 0, "positions": 100, "top1_agreement": top1, "kl": kl}]}
        return {"ruler": {"niah_single_1": {"1024": {"score": score, "n": 4}}},
                "density": {}, "seconds": {"total": 1.0}, "loglik": ll}

    configs = {"dense": config(75.0, 0.0, 1.0), "triangle": config(tri_score, 0.001, 0.97),
               "triangle-bad": config(50.0, bad_kl, 0.9)}
    del configs["dense"]["loglik"]
    return {"model": "m", "vllm": "0.32.0", "machine": "x", "date": "d", "limit": 4,
            "tasks": ["niah_single_1"], "lengths": [1024],
            "loglik": {"docs": 1, "length": 1024, "top_k": 20, "tail": 64, "text": "t"},
            "seconds": {"total": 3.0, "sample_generation": 1.0}, "configs": configs}


@pytest.mark.parametrize("tri_score,bad_kl,passed", [(75.0, 0.01, [True, True]),
                                                     (100.0, 0.01, [True, True]),
                                                     (73.5, 0.01, [True, True]),
                                                     (50.0, 0.01, [False, True]),
                                                     (72.5, 0.01, [False, True]),
                                                     (75.0, 0.0015, [True, False])])
def test_checks_can_fail(tri_score, bad_kl, passed):
    """Dense scores 75: the calibrated map passes at or above it, or within 2 points; one
    answer lost of 4 samples (50), or 2.5 points, fails; so does a bad map not 2x further in KL."""
    report = _report(tri_score, bad_kl)
    assert [c["passed"] for c in checks(report["configs"], 2.0)] == passed


def test_report_table_and_plot(tmp_path):
    report = _report(75.0, 0.01)
    report["checks"] = checks(report["configs"], 2.0)
    text = eval_report.markdown(report)
    assert "| niah_single_1 | 1024 | 75.0 | 75.0 | 50.0 |" in text
    assert "| triangle-bad | 0.9000 |" in text and "PASS" in text
    # a log-likelihood-only configuration (triangle-full) has no RULER column
    full = dict(report["configs"]["triangle"], ruler={})
    report["configs"]["triangle-full"] = full
    text = eval_report.markdown(report)
    assert "| task | length | dense | triangle | triangle-bad |\n" in text
    assert "| triangle-full | 0.9700 |" in text
    # fewer samples for some configurations (--dynamic-limit) are named in the header
    report["configs"]["triangle-bad"]["limit"] = 2
    assert "4 samples per task and length; triangle-bad: the first 2." in eval_report.markdown(report)
    pytest.importorskip("matplotlib")
    assert eval_report.plot(report, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_ruler_samples_are_generated_without_a_network_fetch(monkeypatch):
    """lm-eval's RULER module asks nltk to download punkt_tab when imported; loading the
    offline tasks must not try (a machine without internet, or one that must not fetch)."""
    pytest.importorskip("lm_eval")
    nltk = pytest.importorskip("nltk")
    import os

    from vllm_trianglemix.tools import ruler

    tokenizer = os.path.expanduser("~/.cache/vllm-trianglemix/smollm2-135m-instruct")
    if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
        pytest.skip("the SmolLM2 folder is not cached (vllm-trianglemix smollm2 makes it)")

    def fetch(*args, **kwargs):
        raise AssertionError(f"nltk.download{args} was called")

    monkeypatch.setattr(nltk, "download", fetch)
    monkeypatch.setattr(nltk.data, "find", lambda *a, **k: (_ for _ in ()).throw(LookupError("absent")))
    loaded = ruler.load(["niah_single_1"], 1024, tokenizer, max_gen_toks=48)
    assert loaded.tasks == ("niah_single_1",)
    assert nltk.download is fetch  # restored


def test_ruler_samples_are_the_same_every_run():
    """lm-eval draws RULER's needles from unseeded global generators; ``load`` seeds them, so
    two loads (two runs, or a run against other servers) give the same samples, and the
    caller's random state is left as it was."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("nltk")
    import os
    import random

    from vllm_trianglemix.tools import ruler

    tokenizer = os.path.expanduser("~/.cache/vllm-trianglemix/smollm2-135m-instruct")
    if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
        pytest.skip("the SmolLM2 folder is not cached (vllm-trianglemix smollm2 makes it)")

    def outputs(loaded):
        (task,) = loaded.task_dict["tasks"].values()
        return [doc["outputs"] for doc in list(task.test_docs())[:8]]

    random.seed(1)
    first = outputs(ruler.load(["niah_multikey_2"], 1024, tokenizer))
    after = random.random()
    random.seed(2)
    second = outputs(ruler.load(["niah_multikey_2"], 1024, tokenizer))
    assert first == second
    random.seed(1)
    assert random.random() == after  # the caller's generator is untouched


def test_ruler_in_a_folder_installed_environment_is_one_clear_line(tmp_path):
    """An environment installed into a folder (``pip install --target``, on PYTHONPATH): dill,
    which ``datasets`` fingerprints new datasets with, pickles pyarrow by value there and fails
    inside lm-eval; ``eval`` says so in one line (what and how to fix), not a pickling traceback.
    The folder here holds pyarrow with its ``__init__.py`` copied (so the module's file lies
    outside the interpreter's prefix and any site-packages folder) and the rest linked."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("nltk")
    import os
    import shutil
    import subprocess
    import sys

    import pyarrow

    tokenizer = os.path.expanduser("~/.cache/vllm-trianglemix/smollm2-135m-instruct")
    if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
        pytest.skip("the SmolLM2 folder is not cached (vllm-trianglemix smollm2 makes it)")
    real = os.path.dirname(pyarrow.__file__)
    folder = tmp_path / "env" / "pyarrow"
    folder.mkdir(parents=True)
    for name in os.listdir(real):
        if name == "__init__.py":
            shutil.copy(os.path.join(real, name), folder / name)
        elif name != "__pycache__":
            os.symlink(os.path.join(real, name), folder / name)
    code = ("from vllm_trianglemix.tools import ruler\n"
            "from vllm_trianglemix.tools.errors import ToolError\n"
            "try:\n"
            f"    ruler.load(['niah_single_1'], 1024, {tokenizer!r})\n"
            "except ToolError as e:\n"
            "    print('ToolError:', e)\n"
            "else:\n"
            "    print('loaded')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "env"), os.getcwd()]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    out = done.stdout.strip().splitlines()
    assert out, done.stderr[-2000:]
    if out[-1] == "loaded":
        pytest.skip("this dill/datasets pair pickles a folder-installed pyarrow by name")
    line = out[-1]
    assert line.startswith("ToolError: lm-eval could not build the RULER samples"), done.stderr[-2000:]
    assert str(tmp_path / "env" / "pyarrow") in line and "site-packages" in line


def test_only_a_folder_installed_pyarrow_is_blamed(tmp_path):
    """The one-line error names pyarrow's folder only where dill would pickle it by value; a
    pickling failure in an ordinary environment keeps its own traceback."""
    import os
    import sys

    from vllm_trianglemix.tools.ruler import _outside_site_packages

    assert _outside_site_packages(str(tmp_path / "env" / "pyarrow" / "__init__.py")) == (
        not str(tmp_path).startswith(sys.prefix))
    assert not _outside_site_packages(os.path.join(sys.prefix, "lib", "x", "pyarrow", "__init__.py"))
    assert not _outside_site_packages("/opt/env/lib/python3/site-packages/pyarrow/__init__.py")


def _eval_args(tmp_path, **changes) -> argparse.Namespace:
    from vllm_trianglemix.tools.evaluate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "smollm2"), "--out", str(tmp_path / "out")])
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def test_resume_keeps_results_measured_with_the_same_settings(tmp_path):
    import json

    from vllm_trianglemix.tools.evaluate import resumable, settings_of

    args = _eval_args(tmp_path)
    settings = settings_of(args, ["niah_single_1"])
    out = tmp_path / "out"
    assert resumable(str(out), settings) == ({}, None)  # nothing yet: measure everything
    out.mkdir()
    report = _report(75.0, 0.01) | {"settings": settings}
    (out / "results.json").write_text(json.dumps(report))
    kept, earlier = resumable(str(out), json.loads(json.dumps(settings)))
    assert kept == report["configs"] and earlier["settings"] == settings


@pytest.mark.parametrize("change,flag", [({"lengths": [1024]}, "--lengths: [1024, 2048, 4096] there, [1024] now"),
                                         ({"limit": 4}, "--limit: 8 there, 4 now"),
                                         ({"top_k": 5}, "--loglik-docs/--loglik-length/--loglik-tail/--top-k"),
                                         ({"server_args": "--dtype float32"}, "--server-args: null there")])
def test_resume_refuses_results_of_other_settings(tmp_path, change, flag):
    import json

    from vllm_trianglemix.tools.errors import ToolError
    from vllm_trianglemix.tools.evaluate import resumable, settings_of

    out = tmp_path / "out"
    out.mkdir()
    earlier = settings_of(_eval_args(tmp_path), ["niah_single_1"])
    (out / "results.json").write_text(json.dumps(_report(75.0, 0.01) | {"settings": earlier}))
    now = settings_of(_eval_args(tmp_path, **change), ["niah_single_1"])
    with pytest.raises(ToolError, match="^--resume: .* was measured with other settings") as e:
        resumable(str(out), now)
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_resume_refuses_results_of_another_pythons_text(tmp_path):
    """The log-likelihood text ships with Python and changes between its releases: results
    measured on another Python's text are not mixed with this one's."""
    import json
    import platform

    from vllm_trianglemix.tools.errors import ToolError
    from vllm_trianglemix.tools.evaluate import resumable, settings_of

    now = settings_of(_eval_args(tmp_path), ["niah_single_1"])
    assert f"Python {platform.python_version()}, sha256 " in now["text"]
    out = tmp_path / "out"
    out.mkdir()
    earlier = now | {"text": "pydoc_data.topics of Python 3.0.0, sha256 000000000000"}
    (out / "results.json").write_text(json.dumps(_report(75.0, 0.01) | {"settings": earlier}))
    with pytest.raises(ToolError, match="the log-likelihood text .* Python 3.0.0"):
        resumable(str(out), now)


def test_every_setting_resume_compares_names_its_options(tmp_path):
    from vllm_trianglemix.tools.evaluate import _FLAGS, settings_of

    assert set(settings_of(_eval_args(tmp_path), ["niah_single_1"])) == set(_FLAGS)


def test_resume_refuses_a_file_that_is_not_an_eval_result(tmp_path):
    from vllm_trianglemix.tools.errors import ToolError
    from vllm_trianglemix.tools.evaluate import resumable, settings_of

    settings = settings_of(_eval_args(tmp_path), ["niah_single_1"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{not json")
    with pytest.raises(ToolError, match="is not a result of eval"):
        resumable(str(out), settings)
    (out / "results.json").write_text('{"configs": {}}')  # an eval from before --resume
    with pytest.raises(ToolError, match="does not record its settings"):
        resumable(str(out), settings)


def test_dense_logprobs_are_kept_exactly(tmp_path):
    from vllm_trianglemix.tools.evaluate import load_rows, save_rows

    rows = [[_row({5: 0.5, 7: 0.25, 11: 0.25}), {3: (-0.1234567890123, None)}],
            [_row({2: 0.9, 40000: 0.1})]]
    save_rows(str(tmp_path), rows)
    assert load_rows(str(tmp_path)) == rows
    assert load_rows(str(tmp_path / "none")) is None


class _FakeHandle:
    """Stands in for a `vllm serve` process (server_process.launch_server): records events."""

    def __init__(self, events, name):
        self.events, self.name, self.url, self.log_path = events, name, f"http://{name}", "log"
        events.append(("launch", name))

    def wait_ready(self, timeout):
        self.events.append(("ready", self.name))
        return self

    def stop(self):
        self.events.append(("stop", self.name))


@pytest.fixture
def fake_servers(monkeypatch, tmp_path):
    from vllm_trianglemix.tools import server_process

    def launch(model, extra_args=()):  # the configuration, read back from its map's name
        import json

        extra = list(extra_args)
        config = ("dense" if "--additional-config" not in extra else
                  json.loads(extra[extra.index("--additional-config") + 1])["trianglemix_config"])
        return _FakeHandle(events, config)

    events = []
    monkeypatch.setattr(server_process, "launch_server", launch)
    return events


MAPS = {"triangle": "triangle", "triangle-bad": "triangle-bad"}


@pytest.mark.parametrize("ahead", [False, True])
def test_servers_start_one_ahead_and_all_stop(fake_servers, tmp_path, ahead):
    import contextlib

    from vllm_trianglemix.tools.evaluate import servers

    args = _eval_args(tmp_path, start_ahead=ahead, server_args="")
    todo = ["dense", "triangle", "triangle-bad"]
    with contextlib.closing(servers(todo, args, MAPS, {})) as ready:
        seen = [(config, running.url) for config, running in ready]
    assert seen == [(c, f"http://{c}") for c in todo]
    if ahead:  # the next one launches as soon as the current one is ready, before it is measured
        assert fake_servers == [("launch", "dense"), ("ready", "dense"), ("launch", "triangle"),
                                ("stop", "dense"), ("ready", "triangle"), ("launch", "triangle-bad"),
                                ("stop", "triangle"), ("ready", "triangle-bad"), ("stop", "triangle-bad")]
    else:
        assert fake_servers == [(e, c) for c in todo for e in ("launch", "ready", "stop")]


def test_servers_given_by_url_are_not_started_and_an_error_stops_every_one(fake_servers, tmp_path):
    import contextlib

    from vllm_trianglemix.tools.evaluate import servers

    args = _eval_args(tmp_path, start_ahead=True, server_args="")
    todo = ["dense", "triangle", "triangle-bad"]
    with pytest.raises(RuntimeError, match="measuring failed"):
        with contextlib.closing(servers(todo, args, MAPS, {"triangle": "http://given"})) as ready:
            for config, running in ready:
                if config == "triangle":
                    assert running.url == "http://given"
                    raise RuntimeError("measuring failed")
    # triangle was given by URL: nothing launched for it; triangle-bad (launched ahead) stopped
    launched = [c for e, c in fake_servers if e == "launch"]
    stopped = [c for e, c in fake_servers if e == "stop"]
    assert launched == ["dense", "triangle-bad"] and sorted(stopped) == sorted(launched)
