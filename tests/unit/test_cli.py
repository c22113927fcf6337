"""The command line a newcomer meets: help that says what each command does, ``-h``
without loading vLLM or torch, ``check-map``, and one-line errors (exit 2, no
traceback) for bad paths, URLs, maps and models, before any engine starts.

No engine starts here: each bad input must be refused before one would.
"""

from __future__ import annotations

import argparse
import http.server
import importlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vllm_trianglemix.tools.cli import COMMANDS, HelpFormatter, main
from vllm_trianglemix.tools.server_process import free_port

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "vllm", "transformers", "triton")

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 4}
TINY_HYBRID = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "num_hidden_layers": 8,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
    + ["full_attention"],
}
GOOD_MAP = "n_init: 4\nn_local: 64\nn_last: 16\nmin_prompt_len: 128\ntriangle_layers: '2-3'\n"


def model_folder(tmp_path: Path, config: dict, name: str = "tiny-llama-trianglemix-demo") -> str:
    """A model folder holding only config.json: all check-map reads."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"vllm-trianglemix {command}: error: "), err
    return lines[0]


# --- help ---------------------------------------------------------------------------------


def test_top_level_help_says_what_each_command_does(capsys):
    with pytest.raises(SystemExit) as e:
        main(["-h"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for name in COMMANDS:
        i = next(i for i, line in enumerate(lines) if line.strip().split(" ")[0] == name)
        summary = lines[i].strip()[len(name):].strip() or lines[i + 1].strip()  # long names wrap
        assert len(summary) > 20 and "-h`" not in summary, (name, summary)


def _parsers():
    """Every command's parser (bench: each subcommand's), built as the CLI builds them."""
    for name, module_name in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=name, formatter_class=HelpFormatter)
        importlib.import_module(module_name).add_arguments(parser)
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for sub_name, sub in subs[0].choices.items():
                yield f"{name} {sub_name}", sub
        else:
            yield name, parser


def test_every_option_has_help_and_shows_its_default():
    for name, parser in _parsers():
        assert parser.formatter_class is HelpFormatter, name
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.option_strings and action.default not in (None, False):
                shown = HelpFormatter(name)._get_help_string(action)
                assert "default" in shown.lower(), f"{name} {action.option_strings}: default not shown"


def test_help_of_every_command_loads_neither_vllm_nor_torch():
    """`-h` must answer at once: heavy modules (what takes seconds) are imported after parsing."""
    commands = [[name] for name in COMMANDS] + [["bench", b] for b in ("kernel", "dynamic", "ttft", "report")]
    code = (
        "import contextlib, io, sys\n"
        "from vllm_trianglemix.tools.cli import main\n"
        f"for argv in {commands!r} + [[]]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv + ['-h'])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_serve_help_points_at_vllms_options(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "-h"])
    assert "serve MODEL --help" in " ".join(capsys.readouterr().out.split())


# --- check-map ----------------------------------------------------------------------------


def test_check_map_prints_what_would_run(tmp_path, capsys):
    model = model_folder(tmp_path, TINY_LLAMA)
    overrides = GOOD_MAP.replace("'2-3'", "'1-2'") + "layer_overrides:\n  2: {n_local: 32}\n" \
        "dynamic_layers: [3]\ndynamic: {block_size: 32, stride: 4}\n"
    assert main(["check-map", write(tmp_path, "m.yaml", overrides), "--model", model]) == 0
    out = capsys.readouterr().out
    assert "triangle layers 1: n_init=4, n_local=64, n_last=16" in out
    assert "triangle layers 2: n_init=4, n_local=32, n_last=16" in out
    assert "dynamic layers 3: xattention, block_size=32, stride=4, threshold=0.9, n_last=16" in out
    assert "dense layers (stock backend): 0" in out
    assert "min_prompt_len 128" in out and out.rstrip().endswith("OK")


def test_check_map_picks_the_bundled_map_as_the_engine_does(tmp_path, capsys):
    model = model_folder(tmp_path, TINY_LLAMA)  # folder name matches tiny-llama-demo.yaml
    assert main(["check-map", "--model", str(Path(model) / "config.json")]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama-demo.yaml" in out and "triangle layers 2-3: n_init=4, n_local=64" in out
    assert main(["check-map", "tiny-llama-demo-dynamic", "--model", model]) == 0
    assert "dynamic layers 0-1: xattention" in capsys.readouterr().out


def test_check_map_on_a_hybrid_names_its_full_attention_layers(tmp_path, capsys):
    model = model_folder(tmp_path, TINY_HYBRID, "tiny-qwen3-next")
    assert main(["check-map", write(tmp_path, "ok.yaml", GOOD_MAP.replace("'2-3'", "[7]")),
                 "--model", model]) == 0
    out = capsys.readouterr().out
    assert "full attention: 3,7" in out and "dense full-attention layers (stock backend): 3" in out
    assert main(["check-map", write(tmp_path, "bad.yaml", GOOD_MAP), "--model", model]) == 2
    line = one_error_line(capsys, "check-map")
    assert "field 'triangle_layers': layers [2] are not full-attention layers" in line
    # Dynamic layers follow the same rule as triangle layers (the engine's rule, rules.py).
    assert main(["check-map", write(tmp_path, "dyn.yaml", GOOD_MAP.replace("'2-3'", "[7]")
                                    + "dynamic_layers: [3]\n"), "--model", model]) == 0
    out = capsys.readouterr().out
    assert "triangle layers 7:" in out and "dynamic layers 3: xattention" in out
    assert main(["check-map", write(tmp_path, "dyn2.yaml", GOOD_MAP.replace("'2-3'", "[7]")
                                    + "dynamic_layers: [2, 3]\n"), "--model", model]) == 2
    assert "field 'dynamic_layers': layers [2] are not full-attention layers" in one_error_line(
        capsys, "check-map")


def test_bundled_hybrid_dynamic_map_passes_serve_and_bench_checks(tmp_path, capsys):
    """The published Qwen3.5-4B shape with its bundled dynamic map: `check-map`, `serve`'s
    and `bench ttft`'s checks accept it, as the engine does (tests/e2e_cpu/test_bundled_maps.py)."""
    from vllm_trianglemix.tools import bench_ttft
    from vllm_trianglemix.tools.serve import check_before_start

    model = str(ROOT / "benchmarks" / "models" / "qwen3.5-4b")
    assert main(["check-map", "qwen3.5-4b-9b-dynamic", "--model", model]) == 0
    assert "dynamic layers 3,7,11,15: xattention" in capsys.readouterr().out
    check_before_start([model, "--language-model-only", "--attention-backend", "TRIANGLEMIX",
                        "--additional-config", json.dumps({"trianglemix_config": "qwen3.5-4b-9b-dynamic"})])
    parser = argparse.ArgumentParser()
    bench_ttft.add_arguments(parser)
    args = parser.parse_args(["--model", model, "--language-model-only", "--backends",
                              "dense,trianglemix,dynamic", "--dynamic-map", "qwen3.5-4b-9b-dynamic",
                              "--out", str(tmp_path / "ttft.json")])
    bench_ttft._check_inputs(args)


@pytest.mark.parametrize("map_text,expected", [
    (GOOD_MAP.replace("n_local", "n_locl"), "field 'n_locl': unknown key; did you mean 'n_local'?"),
    (GOOD_MAP.replace("'2-3'", "'2-4'"), "field 'triangle_layers': layer 4 is outside the model"),
    (GOOD_MAP + "layer_overrides:\n  2: {nlocal: 3}\n",
     "field 'layer_overrides.2.nlocal': unknown key; did you mean 'n_local'?"),
    (GOOD_MAP + "dynamic_layers: [0]\ndynamic: {treshold: 0.5}\n",
     "field 'dynamic.treshold': unknown key; did you mean 'threshold'?"),
    (GOOD_MAP + "num_hidden_layers: 32\n", "field 'num_hidden_layers'"),
    (None, "no such file"),
])
def test_check_map_bad_map_is_one_line_naming_the_field(tmp_path, capsys, map_text, expected):
    model = model_folder(tmp_path, TINY_LLAMA)
    path = str(tmp_path / "missing.yaml") if map_text is None else write(tmp_path, "m.yaml", map_text)
    assert main(["check-map", path, "--model", model]) == 2
    assert expected in one_error_line(capsys, "check-map")


@pytest.mark.parametrize("config,expected", [
    ({**TINY_LLAMA, "sliding_window": 4096}, "sliding-window models are not supported"),
    ({**TINY_LLAMA, "model_type": "deepseek_v3", "kv_lora_rank": 512}, "MLA attention"),
    ({"architectures": ["Foo"], "model_type": "foo"}, "no num_hidden_layers"),
    ({"architectures": ["JambaForCausalLM"], "model_type": "jamba", "num_hidden_layers": 4,
      "attn_layer_period": 2, "attn_layer_offset": 1}, "hybrid model type 'jamba' is not supported"),
    ({"architectures": ["MambaForCausalLM"], "model_type": "mamba", "num_hidden_layers": 4},
     "attention-free models are not supported"),
])
def test_check_map_refuses_models_it_cannot_serve(tmp_path, capsys, config, expected):
    model = model_folder(tmp_path, config)
    assert main(["check-map", write(tmp_path, "m.yaml", GOOD_MAP), "--model", model]) == 2
    assert expected in one_error_line(capsys, "check-map")


def test_check_map_missing_model(tmp_path, capsys):
    assert main(["check-map", "tiny-llama-demo", "--model", str(tmp_path / "none")]) == 2
    assert "--model: no such model folder or config.json" in one_error_line(capsys, "check-map")
    assert main(["check-map", "tiny-llama-demo", "--model", str(tmp_path)]) == 2
    assert "has no config.json" in one_error_line(capsys, "check-map")


def test_check_map_command_line_is_fast_and_light(tmp_path):
    """The real command: one line on stderr, exit 2, no traceback, no vLLM/torch (what takes
    seconds to import; the check itself takes about a second)."""
    model = model_folder(tmp_path, TINY_LLAMA)
    bad = write(tmp_path, "typo.yaml", GOOD_MAP.replace("n_local", "n_locl"))
    code = ("import sys\nfrom vllm_trianglemix.tools.cli import main\n"
            f"rc = main(['check-map', {bad!r}, '--model', {model!r}])\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 2 and lines[1] == "[]", proc.stderr
    assert "did you mean 'n_local'?" in lines[0] and "Traceback" not in proc.stderr


# --- serve checks the map before vLLM starts ---------------------------------------------


def test_serve_refuses_a_bad_map_before_vllm_starts(tmp_path, capsys):
    model = model_folder(tmp_path, TINY_LLAMA)
    bad = write(tmp_path, "typo.yaml", GOOD_MAP.replace("n_local", "n_locl"))
    rc = main(["serve", model, "--dtype", "float32", "--attention-backend", "TRIANGLEMIX",
               "--additional-config", json.dumps({"trianglemix_config": bad})])
    assert rc == 2
    assert "field 'n_locl': unknown key; did you mean 'n_local'?" in one_error_line(capsys, "serve")
    rc = main(["serve", model, "--attention-backend=CUSTOM", "--additional-config="
               + json.dumps({"trianglemix_config": str(tmp_path / "missing.yaml")})])
    assert rc == 2 and "no such file" in one_error_line(capsys, "serve")
    # A hub name: the map alone (no bundled map for it, none given).
    assert main(["serve", "org/Unknown-Model", "--attention-backend", "TRIANGLEMIX"]) == 2
    assert "no bundled layer map matches model 'org/Unknown-Model'" in one_error_line(capsys, "serve")


def test_serve_check_passes_other_engines_through():
    from vllm_trianglemix.tools.serve import check_before_start

    check_before_start(["some/model", "--dtype", "float32"])  # TriangleMix not selected
    check_before_start(["some/model", "--attention-backend", "TRIANGLEMIX", "--help"])


# --- every tool: one line for a bad path, URL or model ------------------------------------


def test_calibrate_bad_inputs(tmp_path, capsys):
    out = str(tmp_path / "map.yaml")
    assert main(["calibrate", "--model", "/no/such/dir", "--out", out]) == 2
    assert "--model: no such model folder: /no/such/dir" in one_error_line(capsys, "calibrate")
    assert main(["calibrate", "--model", str(tmp_path), "--out", out]) == 2
    assert "has no config.json" in one_error_line(capsys, "calibrate")
    model = model_folder(tmp_path, TINY_LLAMA)
    assert main(["calibrate", "--model", model, "--out", str(tmp_path / "no" / "map.yaml")]) == 2
    assert "--out: folder" in one_error_line(capsys, "calibrate")
    assert main(["calibrate", "--model", model, "--out", out, "--prompts", "/no/p.jsonl"]) == 2
    assert "--prompts: no such file" in one_error_line(capsys, "calibrate")
    assert main(["calibrate", "--model", model, "--out", out, "--n-local", "0"]) == 2
    assert "field 'n_local': must be >= 1" in one_error_line(capsys, "calibrate")


def test_calibrate_names_a_bad_model_before_a_missing_out(capsys):
    assert main(["calibrate", "--model", "/no/such/dir"]) == 2
    assert "--model: no such model folder: /no/such/dir" in one_error_line(capsys, "calibrate")
    assert main(["calibrate", "--out", "map.yaml"]) == 2
    assert "--model: required" in one_error_line(capsys, "calibrate")
    assert main(["calibrate", "--model", str(ROOT / "benchmarks" / "models" / "llama-3.1-8b-instruct")]) == 2
    assert "--out: required" in one_error_line(capsys, "calibrate")


def test_options_argparse_refuses_are_one_line(capsys):
    """argparse's own errors (unknown option, bad type, missing argument): one line, exit 2."""
    cases = [(["check-map"], "check-map"), (["soak", "--requests", "many"], "soak"),
             (["bench", "ttft", "--no-such-option"], "bench ttft"), (["demo", "--port"], "demo")]
    for argv, name in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        line = one_error_line(capsys, name)
        assert line.endswith(f"(`vllm-trianglemix {name} -h` lists the options)"), line


def test_calibrate_model_transformers_cannot_load(tmp_path, capsys):
    model = model_folder(tmp_path, {"architectures": ["Foo"], "model_type": "no-such-type",
                                    "num_hidden_layers": 2})
    assert main(["calibrate", "--model", model, "--out", str(tmp_path / "m.yaml"),
                 "--device", "cpu"]) == 2
    assert "cannot load" in one_error_line(capsys, "calibrate")


class _FakeServer(http.server.BaseHTTPRequestHandler):
    """Answers /v1/models as an OpenAI server serving model 'm'; 404 elsewhere."""

    def do_GET(self):  # noqa: N802
        body = json.dumps({"data": [{"id": "m", "max_model_len": 4096}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body if self.path == "/v1/models" else b"not found\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_openai_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_check_accuracy_bad_inputs(tmp_path, capsys, fake_openai_server):
    url = fake_openai_server
    dead = f"http://127.0.0.1:{free_port()}"
    cases = [
        (["--dense-url", "localhost:8000", "--trianglemix-url", url], "--dense-url: not an http(s) URL"),
        (["--dense-url", url, "--trianglemix-url", "http://"], "--trianglemix-url: not an http(s) URL"),
        (["--dense-url", dead, "--trianglemix-url", url], f"dense server {dead}: no server answers"),
        (["--dense-url", url, "--trianglemix-url", url, "--prompts", "/no/p.jsonl"],
         "--prompts: no such file"),
        (["--dense-url", url, "--trianglemix-url", url, "--model", "other"],
         f"--model 'other': dense server {url} serves m"),
        (["--dense-url", url + "/api", "--trianglemix-url", url], "HTTP 404"),
    ]
    for args, expected in cases:
        assert main(["check-accuracy", *args, "--timeout", "10"]) == 2, args
        assert expected in one_error_line(capsys, "check-accuracy"), args


def test_soak_bad_inputs_before_any_server_starts(tmp_path, capsys, fake_openai_server):
    """Each problem soak can know up front: one line, exit 2, no server started."""
    dead = f"http://127.0.0.1:{free_port()}"
    bare = model_folder(tmp_path, TINY_LLAMA, "bare-model")  # config.json only
    other = model_folder(tmp_path, TINY_LLAMA, "some-other-model")
    (Path(other) / "tokenizer.json").write_text("{}")
    cases = [
        (["--url", dead], f"--url {dead}: no server answers there"),
        (["--url", dead], "start one (`vllm-trianglemix serve MODEL ...`)"),
        (["--url", "localhost:8000"], "--url: not an http(s) URL"),
        (["--url", fake_openai_server + "/api"], "/v1/models answered HTTP 404"),
        (["--model", "/no/such/dir"], "--model: no such model folder: /no/such/dir"),
        (["--model", bare], f"model folder {bare} has no tokenizer"),
        (["--model", bare], "-- --tokenizer TOKENIZER_FOLDER_OR_NAME"),
        (["--model", other, "--lengths", "9-3"], "--lengths: expected"),
        (["--model", other, "--output", str(tmp_path / "no" / "s.json")], "--output: folder"),
        (["--url", dead, "--", "--dtype", "float32"], "need --model"),
    ]
    for args, expected in cases:
        assert main(["soak", *args]) == 2, args
        assert expected in one_error_line(capsys, "soak"), args
    # A TriangleMix server whose map does not fit: serve's own line, before the tokenizer's.
    for model in (bare, other):
        tm = [model, "--attention-backend", "TRIANGLEMIX"]
        assert main(["soak", "--model", *tm[:1], "--", *tm[1:]]) == 2
        soak_line = one_error_line(capsys, "soak")
        assert main(["serve", *tm]) == 2
        serve_line = one_error_line(capsys, "serve")
        assert "no bundled layer map matches" in soak_line
        assert soak_line.split(": error: ", 1)[1] == serve_line.split(": error: ", 1)[1]
    bad = write(tmp_path, "typo.yaml", GOOD_MAP.replace("n_local", "n_locl"))
    assert main(["soak", "--model", other, "--", "--attention-backend", "CUSTOM",
                 "--additional-config", json.dumps({"trianglemix_config": bad})]) == 2
    assert "did you mean 'n_local'?" in one_error_line(capsys, "soak")


def test_soak_server_that_exits_at_start_is_one_line(tmp_path, capsys):
    """A server soak starts that stops before it is ready (vLLM refuses an argument):
    one line with vLLM's reason and the log's path (vLLM starts, no engine does)."""
    model = model_folder(tmp_path, TINY_LLAMA, "some-model")
    (Path(model) / "tokenizer.json").write_text("{}")
    assert main(["soak", "--model", model, "--", "--no-such-flag"]) == 2
    line = one_error_line(capsys, "soak")
    assert "the server it started exited with status 2" in line
    assert "unrecognized arguments: --no-such-flag" in line and "its log: " in line


def test_bench_bad_inputs(tmp_path, capsys):
    model = model_folder(tmp_path, TINY_LLAMA)
    ttft = ["bench", "ttft", "--out", str(tmp_path / "t.json")]
    assert main([*ttft, "--model", "/no/such/dir"]) == 2
    assert "--model: no such model folder" in one_error_line(capsys, "bench ttft")
    assert main([*ttft, "--model", model, "--backends", "dense,fast"]) == 2
    assert "--backends: unknown backend 'fast'" in one_error_line(capsys, "bench ttft")
    assert main([*ttft, "--model", model, "--backends", "dynamic@2"]) == 2
    assert "density in (0, 1]" in one_error_line(capsys, "bench ttft")
    bad = write(tmp_path, "m.yaml", GOOD_MAP.replace("'2-3'", "'2-9'"))
    assert main([*ttft, "--model", model, "--trianglemix-config", bad]) == 2
    assert "field 'triangle_layers': layer 4 is outside the model" in one_error_line(capsys, "bench ttft")
    other = model_folder(tmp_path, TINY_LLAMA, "some-other-model")
    assert main([*ttft, "--model", other, "--backends", "dense,dynamic"]) == 2
    assert "no bundled map of that name" in one_error_line(capsys, "bench ttft")
    assert main(["bench", "report", "--kernel", "/no/k.json", "--ttft", "/no/t.json",
                 "--out", str(tmp_path / "r.md")]) == 2
    assert "--kernel: no such file" in one_error_line(capsys, "bench report")


def test_bench_report_overwrites_only_its_own_reports(tmp_path, capsys):
    inputs = ["bench", "report", "--kernel", str(ROOT / "benchmarks" / "results-kernel.json"),
              "--ttft", str(ROOT / "benchmarks" / "results-ttft.json")]
    with pytest.raises(SystemExit) as e:  # no default target: --out is required
        main(inputs)
    assert e.value.code == 2 and "--out" in one_error_line(capsys, "bench report")
    report = tmp_path / "report.md"
    assert main([*inputs, "--out", str(report)]) == 0
    first = report.read_text()
    assert "# Benchmarks" in first and "## 1. Kernel" in first
    assert main([*inputs, "--out", str(report)]) == 0 and report.read_text() == first  # its own
    hand = tmp_path / "BENCHMARKS.md"
    hand.write_text((ROOT / "BENCHMARKS.md").read_text())
    assert main([*inputs, "--out", str(hand)]) == 2
    assert "exists and was not written by `bench report`" in one_error_line(capsys, "bench report")
    assert hand.read_text() == (ROOT / "BENCHMARKS.md").read_text()  # untouched
    assert main([*inputs, "--out", str(hand), "--force"]) == 0 and hand.read_text() == first


@pytest.mark.parametrize("name,described,checked", [
    ("results-kernel.json", "a merge launch for split dense rows", "dense rows vs FA3"),  # every row ours
    ("results-kernel-h200.json", "FA3 on the last 128 rows", "dense rows vs FA3"),  # last rows by FA3
    ("results-kernel-no-splits-h200.json", "FA3 on the last 128 rows", "kernel rows vs FA3"),
])
def test_bench_report_describes_each_kernel_run_as_it_ran(name, described, checked):
    """A kernel JSON of any release is described by what that run did (its fields tell)."""
    from vllm_trianglemix.tools.bench_report import kernel_section

    text = "\n".join(kernel_section(json.loads((ROOT / "benchmarks" / name).read_text())))
    assert described in text and checked in text


def test_bench_gpu_kernels_need_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for which in ("kernel", "dynamic"):
        assert main(["bench", which, "--lengths", "1024"]) == 2
        assert "needs a CUDA GPU" in one_error_line(capsys, f"bench {which}")


def test_demo_bad_inputs(tmp_path, capsys):
    not_a_folder = write(tmp_path, "file", "x")
    assert main(["demo", "--model-dir", not_a_folder]) == 2
    assert f"--model-dir: {not_a_folder} is a file" in one_error_line(capsys, "demo")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["demo", "--model-dir", str(tmp_path / "m"), "--port", str(port)]) == 2
    assert f"--port: {port} is in use" in one_error_line(capsys, "demo")
    assert main(["demo", "--model-dir", str(tmp_path / "m"), "--prompt-words", "0"]) == 2
    assert "--prompt-words" in one_error_line(capsys, "demo")
