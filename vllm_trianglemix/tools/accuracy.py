"""Compare a dense and a TriangleMix server (OpenAI API): greedy agreement, passkey accuracy, logprobs.

``vllm-trianglemix check-accuracy --dense-url http://host:8000 --trianglemix-url http://host:8001``

Start the same model twice, once stock and once with
``--attention-backend TRIANGLEMIX``; this tool sends the same requests to
both (``/v1/completions``, temperature 0, ``logprobs=5``, one request at a
time so batching cannot change the numbers) and reports, per prompt and
overall:

* agreement: whether the greedy outputs are identical (exact match rate);
* task accuracy of each server: whether the expected answer (the pass key of
  a synthetic prompt, or a prompt file's "answer") appears in the output;
* mean / max |delta logprob| of the tokens both servers put in the top 5 of
  the first generated token.

* the dynamic layers' density (the fraction of key blocks XAttention kept),
  per layer, over this run's requests, read from the TriangleMix server's
  ``/metrics`` (when it was started with the density report on:
  ``--additional-config '{"trianglemix_density_log_interval": 5, ...}'``).

It exits with status 1 when the agreement is below ``--min-agreement``, 2 on
errors. Remember that prompts shorter than the layer map's ``min_prompt_len``
run dense on the TriangleMix server too: use long prompts to test the pattern.

Prompts: ``--prompts file.jsonl`` (per line ``{"prompt": text or token ids,
"answer": optional text}``), else synthetic passkey retrieval of
``--prompt-len`` tokens built with the servers' own tokenizer (``/tokenize``,
``/detokenize``): English filler words and a 5-digit key when the tokenizer
round-trips English, else the words ``w10 .. w999`` of the tiny demo model.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import time
from dataclasses import dataclass

import requests

from vllm_trianglemix.tools.errors import ToolError, existing_file, http_url

# vLLM's logger namespace; this tool talks HTTP only and never imports vLLM.
logger = logging.getLogger("vllm.trianglemix")

ENGLISH = (
    "the of and to in is was that for on with as by at from his her they be this have had "
    "not are but were which one all their when there can more been has if who will about "
    "would up out them into time so some could than other then its only new two may first "
    "these any like very after over most also made did many before must through back years "
    "where much way well down should because each just those people how too little state "
    "good make world still own see men work long here get both between life being under "
    "never day same another know while last might great old year off come since against go "
    "came right used take three river stone garden window morning yellow music table"
).split()


@dataclass(frozen=True)
class Template:
    """How a passkey prompt is worded in one vocabulary."""

    words: tuple[str, ...]
    intro: str
    needle: str  # with {key}
    question: str
    number_key: bool

    def key(self, rng: random.Random) -> str:
        if self.number_key:
            return str(rng.randint(10000, 99999))
        return " ".join(rng.choice(self.words) for _ in range(3))


TEMPLATES = (
    Template(
        words=tuple(ENGLISH),
        intro="There is a pass key hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the pass key.\n",
        needle=" The pass key is {key}. Remember it. {key} is the pass key. ",
        question="\nWhat is the pass key? The pass key is",
        number_key=True,
    ),
    Template(  # the tiny demo model's word-level vocabulary
        words=tuple(f"w{i}" for i in range(10, 1000)),
        intro="",
        needle=" w1 w2 w3 {key} w4 w5 ",
        question=" w1 w2 w3",
        number_key=False,
    ),
)


@dataclass
class Task:
    prompt: str | list[int]
    answer: str | None = None
    note: str = ""


class Server:
    """One OpenAI-compatible vLLM server."""

    def __init__(self, url: str, model: str | None, timeout: float, what: str = "server"):
        self.url, self.timeout, self.what = url.rstrip("/"), timeout, what
        try:
            models = self._call("get", "/v1/models")["data"]
        except (KeyError, TypeError, ValueError):
            raise ToolError(f"{what} {self.url}: /v1/models did not answer as an OpenAI "
                            "server does (is this vLLM's server?)") from None
        if not models:
            raise ToolError(f"{what} {self.url} serves no model")
        ids = [m.get("id") for m in models]
        if model is not None and model not in ids:
            raise ToolError(f"--model {model!r}: {what} {self.url} serves {', '.join(map(str, ids))}")
        card = next(m for m in models if model is None or m["id"] == model)
        self.model = card.get("id")
        self.max_model_len = card.get("max_model_len")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            r = requests.request(method, self.url + path, json=body, timeout=self.timeout)
        except requests.ConnectionError:
            raise ToolError(f"{self.what} {self.url}: no server answers there "
                            "(connection failed)") from None
        except requests.Timeout:
            raise ToolError(f"{self.what} {self.url}{path}: no answer within "
                            f"{self.timeout:g} s (--timeout)") from None
        if r.status_code != 200:
            text = " ".join(r.text[:300].split())
            raise ToolError(f"{self.what} {self.url}{path}: HTTP {r.status_code}: {text}")
        return r.json()

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": special}
        return self._call("post", "/tokenize", body)["tokens"]

    def detokenize(self, ids: list[int]) -> str:
        return self._call("post", "/detokenize", {"model": self.model, "tokens": ids})["prompt"]

    def metrics(self) -> dict[str, dict[str, float]]:
        """The dynamic-layer counters on ``/metrics``: {sample name: {layer: value}}
        (empty when the server does not report them)."""
        from prometheus_client.parser import text_string_to_metric_families

        r = requests.get(self.url + "/metrics", timeout=self.timeout)
        if r.status_code != 200:
            return {}
        out: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(r.text):
            if family.name.startswith("trianglemix:dynamic_"):
                out.setdefault(family.name, {})
                for sample in family.samples:
                    if not sample.name.endswith("_created"):
                        out[family.name][sample.labels.get("layer", "")] = sample.value
        return out

    def prompt_logprobs(self, token_ids: list[int], top_k: int) -> list[dict[int, tuple[float, int]]]:
        """vLLM's ``prompt_logprobs``: per prompt position after the first, {token id:
        (logprob, rank)} for the ``top_k`` most likely tokens and the prompt's own."""
        body = {"model": self.model, "prompt": token_ids, "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": top_k}
        rows = self._call("post", "/v1/completions", body)["choices"][0]["prompt_logprobs"]
        return [{int(t): (e["logprob"], e.get("rank")) for t, e in row.items()}
                for row in rows[1:]]

    def complete(self, prompt, max_tokens: int) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "logprobs": 5}
        return self._call("post", "/v1/completions", body)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dense-url", required=True, help="stock server, e.g. http://localhost:8000")
    parser.add_argument("--trianglemix-url", required=True, help="server with TRIANGLEMIX")
    parser.add_argument("--model", default=None, help="model name (default: each server's first)")
    parser.add_argument("--prompts", default=None, help="JSONL file (default: synthetic passkey)")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts to send to both servers")
    parser.add_argument(
        "--prompt-len", type=int, default=None,
        help="tokens per synthetic prompt (default: 16384, at most what the server accepts)",
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--min-agreement", type=float, default=0.9,
                        help="exit 1 when fewer outputs than this fraction are identical")
    parser.add_argument("--report", default=None, help="write per-prompt results here (JSON)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--density-wait", type=float, default=60.0,
                        help="seconds to wait for the TriangleMix server to publish the densities "
                             "of this run (its report interval)")


# ----------------------------------------------------------------------------
# Prompts


def pick_template(server: Server) -> Template:
    """The first template whose words survive /tokenize + /detokenize."""
    for template in TEMPLATES:
        rng = random.Random(0)
        probe = template.needle.format(key=template.key(rng)) + " ".join(template.words[:50])
        if server.detokenize(server.tokenize(probe)).split() == probe.split():
            return template
    raise RuntimeError("the server's tokenizer round-trips neither English nor w0..w999 words; "
                       "give prompts with --prompts")


def filler_ids(server: Server, words, n_tokens: int, rng: random.Random) -> list[int]:
    """At least ``n_tokens`` tokens of random words, cut to ``n_tokens``."""
    n_words = max(16, n_tokens)
    while True:
        ids = server.tokenize(" " + " ".join(rng.choice(words) for _ in range(n_words)))
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        n_words = 2 * n_words


def passkey_tasks(server: Server, num: int, length: int, seed: int) -> list[Task]:
    template = pick_template(server)
    rng = random.Random(seed)
    bos = server.tokenize("", special=True)
    intro, question = server.tokenize(template.intro), server.tokenize(template.question)
    tasks = []
    for i in range(num):
        key = template.key(rng)
        needle = server.tokenize(template.needle.format(key=key))
        n_fill = length - len(bos) - len(intro) - len(needle) - len(question)
        if n_fill < 0:
            raise RuntimeError(f"--prompt-len {length} is too short for a passkey prompt "
                               f"(needs {length - n_fill} tokens)")
        fill = filler_ids(server, template.words, n_fill, rng)
        depth = int((i + 0.5) / num * n_fill)
        ids = bos + intro + fill[:depth] + needle + fill[depth:] + question
        tasks.append(Task(ids, key, f"key at depth {depth / max(n_fill, 1):.2f}"))
    return tasks


def file_tasks(path: str, num: int) -> list[Task]:
    tasks = []
    with open(path) as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                item = {"prompt": item} if not isinstance(item, dict) else item
                tasks.append(Task(item["prompt"], item.get("answer")))
    return tasks[:num]


# ----------------------------------------------------------------------------
# Comparison


def answer_found(answer: str, text: str) -> bool:
    want, got = re.findall(r"\w+", answer), re.findall(r"\w+", text)
    return any(got[i : i + len(want)] == want for i in range(len(got) - len(want) + 1))


def compare(task: Task, dense: dict, tm: dict) -> dict:
    d, t = dense["choices"][0], tm["choices"][0]
    d_tokens = (d.get("logprobs") or {}).get("tokens") or []
    t_tokens = (t.get("logprobs") or {}).get("tokens") or []
    first_diff = next((i for i, (a, b) in enumerate(zip(d_tokens, t_tokens)) if a != b), None)
    if first_diff is None and len(d_tokens) != len(t_tokens):
        first_diff = min(len(d_tokens), len(t_tokens))
    d_top = ((d.get("logprobs") or {}).get("top_logprobs") or [{}])[0] or {}
    t_top = ((t.get("logprobs") or {}).get("top_logprobs") or [{}])[0] or {}
    deltas = [abs(d_top[k] - t_top[k]) for k in d_top if k in t_top]
    row = {
        "prompt_tokens": dense.get("usage", {}).get("prompt_tokens"),
        "note": task.note,
        "match": d["text"] == t["text"] and first_diff is None,
        "first_diff_token": first_diff,
        "dense_text": d["text"],
        "trianglemix_text": t["text"],
        "top_logprob_mean_abs_delta": sum(deltas) / len(deltas) if deltas else None,
        "top_logprob_max_abs_delta": max(deltas) if deltas else None,
        "top_tokens_shared": len(deltas),
    }
    if task.answer is not None:
        row["answer"] = task.answer
        row["dense_found"] = answer_found(task.answer, d["text"])
        row["trianglemix_found"] = answer_found(task.answer, t["text"])
    return row


def summarize(rows: list[dict]) -> dict:
    means = [r["top_logprob_mean_abs_delta"] for r in rows if r["top_tokens_shared"]]
    maxes = [r["top_logprob_max_abs_delta"] for r in rows if r["top_tokens_shared"]]
    summary = {
        "num_prompts": len(rows),
        "agreement": sum(r["match"] for r in rows) / len(rows),
        "top_logprob_mean_abs_delta": sum(means) / len(means) if means else None,
        "top_logprob_max_abs_delta": max(maxes) if maxes else None,
    }
    scored = [r for r in rows if "answer" in r]
    if scored:
        summary["dense_accuracy"] = sum(r["dense_found"] for r in scored) / len(scored)
        summary["trianglemix_accuracy"] = sum(r["trianglemix_found"] for r in scored) / len(scored)
    return summary


KEPT, CAUSAL = "trianglemix:dynamic_kept_blocks", "trianglemix:dynamic_causal_blocks"
REPORT_TIME = "trianglemix:dynamic_report_time_seconds"


def densities(before: dict, after: dict) -> dict[str, float]:
    """Per dynamic layer: kept / causal key blocks between two reads of the counters."""
    out = {}
    for layer, causal in after.get(CAUSAL, {}).items():
        d_causal = causal - before.get(CAUSAL, {}).get(layer, 0.0)
        if d_causal > 0:
            d_kept = after[KEPT].get(layer, 0.0) - before.get(KEPT, {}).get(layer, 0.0)
            out[layer] = d_kept / d_causal
    return out


def wait_for_densities(server: Server, before: dict, wait_s: float) -> dict:
    """The counters once the server has read them after this run: the first report
    published after this call's first read (the engine reports every interval)."""
    if CAUSAL not in before:  # the report is off (or no dynamic layer): nothing to wait for
        return before
    first = server.metrics()
    deadline = time.monotonic() + wait_s
    while True:
        now = server.metrics()
        if now.get(REPORT_TIME) != first.get(REPORT_TIME) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def density_lines(summary: dict) -> list[str]:
    dens = summary.get("dynamic_density")
    if dens is None:
        return ["dynamic layers' density: not reported (no dynamic layer, or the TriangleMix "
                "server's density report is off: trianglemix_density_log_interval)"]
    if not dens:
        return ["dynamic layers' density: no dynamic rows in these prompts"]
    return ["dynamic layers' density (key blocks kept): " + ", ".join(
        f"layer {layer} {100 * d:.1f}%" for layer, d in sorted(dens.items(), key=lambda x: int(x[0])))]


def _fmt(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def table(rows: list[dict], summary: dict, min_agreement: float) -> str:
    head = f"{'#':>3} {'tokens':>7} {'match':>5} {'diff@':>5} {'dense ok':>8} " \
           f"{'TM ok':>5} {'mean|dlp|':>9} {'max|dlp|':>9}"
    lines = [head]
    for i, r in enumerate(rows):
        lines.append(
            f"{i:>3} {_fmt(r['prompt_tokens']):>7} {'yes' if r['match'] else 'NO':>5} "
            f"{_fmt(r['first_diff_token']):>5} {_fmt(r.get('dense_found')):>8} "
            f"{_fmt(r.get('trianglemix_found')):>5} {_fmt(r['top_logprob_mean_abs_delta']):>9} "
            f"{_fmt(r['top_logprob_max_abs_delta']):>9}"
        )
    ok = summary["agreement"] >= min_agreement
    lines.append(f"agreement {summary['agreement']:.3f} (min {min_agreement:g}): "
                 f"{'OK' if ok else 'BELOW MINIMUM'}")
    if "dense_accuracy" in summary:
        lines.append(f"task accuracy: dense {summary['dense_accuracy']:.3f}, "
                     f"TriangleMix {summary['trianglemix_accuracy']:.3f}")
    lines.append(f"first token, top-5 |delta logprob|: mean "
                 f"{_fmt(summary['top_logprob_mean_abs_delta'])}, max "
                 f"{_fmt(summary['top_logprob_max_abs_delta'])}")
    lines += density_lines(summary)
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    http_url(args.dense_url, "--dense-url")
    http_url(args.trianglemix_url, "--trianglemix-url")
    if args.prompts:
        existing_file(args.prompts, "--prompts")
    try:
        dense = Server(args.dense_url, args.model, args.timeout, "dense server")
        tm = Server(args.trianglemix_url, args.model, args.timeout, "TriangleMix server")
        if args.prompts:
            tasks = file_tasks(args.prompts, args.num_prompts)
        else:
            room = min(s.max_model_len or 10**9 for s in (dense, tm)) - args.max_tokens
            length = min(args.prompt_len or 16384, room)
            if args.prompt_len and length < args.prompt_len:
                logger.warning("check-accuracy: --prompt-len cut to %d (max_model_len)", length)
            probe = "w1 w2 the pass key 12345"
            if dense.tokenize(probe) != tm.tokenize(probe):
                raise RuntimeError("the two servers tokenize differently: not the same model")
            tasks = passkey_tasks(dense, args.num_prompts, length, args.seed)
        if not tasks:
            raise RuntimeError(f"no prompt in {args.prompts}")
        before = tm.metrics()
        rows = []
        for i, task in enumerate(tasks):
            logger.info("check-accuracy: prompt %d/%d", i + 1, len(tasks))
            rows.append(compare(task, dense.complete(task.prompt, args.max_tokens),
                                tm.complete(task.prompt, args.max_tokens)))
        after = wait_for_densities(tm, before, args.density_wait)
    except (requests.RequestException, RuntimeError, OSError, KeyError, ValueError) as e:
        logger.error("check-accuracy: %s", e)
        return 2
    summary = summarize(rows)
    summary["dynamic_density"] = densities(before, after) if CAUSAL in after else None
    summary.update(min_agreement=args.min_agreement, dense_url=args.dense_url,
                   trianglemix_url=args.trianglemix_url, model=dense.model)
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"summary": summary, "prompts": rows}, f, indent=1)
    sys.stdout.write(table(rows, summary, args.min_agreement))
    return 0 if summary["agreement"] >= args.min_agreement else 1
