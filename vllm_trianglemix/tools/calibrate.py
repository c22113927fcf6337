"""Pick triangle layers for a new model and write a layer map.

``vllm-trianglemix calibrate --model PATH --out map.yaml``

Method: a training-free proxy of the paper's gradient analysis (He et al.,
2025, arXiv 2507.21526; their ``*_by_gradient`` layer lists). The paper makes a layer
triangle when the "middle" Q-K region (neither sinks, window nor last rows)
matters little for the loss of tokens generated *after* the prompt. Here the
same question is answered by measurement instead of gradients:

1. The model is loaded with Hugging Face transformers and a custom attention
   function (registered through ``transformers.AttentionInterface``) that
   applies, on the layers currently set to triangle, the mask of
   :func:`vllm_trianglemix.pattern.visible` with the request's
   :func:`~vllm_trianglemix.pattern.dense_start`, and plain causal attention
   elsewhere. A triangle layer whose mask equals causal (short prompt) runs
   the very same dense computation, so its KL is exactly 0.
2. For every calibration prompt of length ``L``, ``--num-generated`` tokens
   are generated greedily with dense attention. The scored distributions are
   those that matter at inference: the next-token distributions at the last
   prompt position and at the generated tokens (teacher-forced; the generated
   tokens are dense rows of the rule, positions ``>= L``).
3. Sensitivity of layer ``i``: KL(dense || only layer ``i`` triangle) of
   those distributions, in nats, averaged over positions and prompts. (The
   last layer always scores 0: its triangle rows feed no scored token.)
4. Layers are then added greedily from least to most sensitive (ties: deeper
   first), re-measuring the KL of the joint set each time; the walk stops at
   the first layer that would push the joint KL over ``--kl-budget`` or the
   set over ``--max-layers-fraction`` of the layers (default 0.5, the
   paper's share on Llama-3.1-8B). The default budget, 0.02 nats, bounds the
   mean total-variation distance of the scored distributions by
   sqrt(0.02 / 2) = 0.1 (Pinsker); typical well-chosen layers score far less.

Calibration prompts: ``--prompts`` (JSONL with a "prompt" or "text" field per
line, or a plain text file cut into ``--prompt-len`` token windows), else
synthetic passkey prompts: random tokens of the model's vocabulary with a
pass key sentence at a random depth and the question at the end. Real text
of your workload gives a more faithful map than random tokens.

Hybrid models (Qwen3-Next, Qwen3.5): only their full-attention layers are
candidates (``model_info.hf_attention_layer_ids``); the Gated DeltaNet layers
run as they are, and ``--max-layers-fraction`` counts full-attention layers.

Limits: one prompt at a time, no padding; a full ``T x T`` boolean mask per
triangle layer call (``T**2`` bytes: 256 MiB at 16K tokens); models whose
attention does not go through ``AttentionInterface`` are refused, and so are
sliding-window layers; logit soft-capping and similar extras are ignored.

The map is checked by re-loading it with ``load_layer_map``; its header
comments record the command line, date, prompts and the per-layer KL table.
``--json`` also writes the measurements in machine-readable form.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass, field

from vllm_trianglemix.config import (
    DYNAMIC_DEFAULTS,
    TriangleMixConfigError,
    format_layer_ranges,
    load_layer_map,
    parse_layer_map,
)
from vllm_trianglemix.model_info import hf_attention_layer_ids
from vllm_trianglemix.pattern import TriangleParams, dense_start, first_sparse_row, visible
from vllm_trianglemix.tools.errors import (
    ToolError,
    existing_file,
    model_folder_or_hub_id,
    shown_path,
    writable_file,
)

# vLLM's logger namespace, without importing vLLM (so that `calibrate -h` answers at once).
logger = logging.getLogger("vllm.trianglemix")

ATTENTION_NAME = "trianglemix_calibrate"
DEFAULT_KL_BUDGET = 0.02


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face model directory or name (required)")
    parser.add_argument("--out", help="layer map to write (YAML; required)")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float64", "bfloat16", "float16"],
        help="auto: float32 on cpu, the model's dtype on cuda",
    )
    parser.add_argument("--n-init", type=int, default=8, help="sink tokens every row keeps")
    parser.add_argument("--n-local", type=_n_local_list, default=[512],
                        help="causal window of a triangle row (the query itself included); "
                        "several, comma-separated (e.g. 128,256): each is calibrated and the "
                        "one giving the most triangle layers is written (ties: the smallest). "
                        "Default: 512")
    parser.add_argument("--n-last", type=int, default=128,
                        help="the last n_last prompt rows stay dense")
    parser.add_argument("--min-prompt-len", type=int, default=8192,
                        help="shorter prompts run dense in every layer")
    parser.add_argument(
        "--prompt-len", type=int, default=None,
        help="tokens per calibration prompt (default: 2 x --min-prompt-len, at most the "
        "model's max_position_embeddings); with a JSONL file, longer prompts are cut "
        "in the middle",
    )
    parser.add_argument("--num-prompts", type=int, default=4, help="calibration prompts")
    parser.add_argument("--prompts", default=None, help="JSONL or text file (default: synthetic)")
    parser.add_argument(
        "--num-generated", type=int, default=8,
        help="greedy tokens scored after the prompt (the last prompt position is scored too)",
    )
    parser.add_argument(
        "--kl-budget", type=float, default=DEFAULT_KL_BUDGET,
        help=f"largest mean KL(dense || TriangleMix) in nats (default {DEFAULT_KL_BUDGET})",
    )
    parser.add_argument("--max-layers-fraction", type=float, default=0.5,
                        help="at most this fraction of the candidate layers become triangle")
    parser.add_argument(
        "--dynamic-rest", action="store_true",
        help="also make every attention layer not chosen as a triangle layer (on a hybrid: "
        "every other full-attention layer) a dynamic (XAttention) layer, with XAttention's "
        "defaults; their accuracy is not measured here: check the map with check-accuracy",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    parser.add_argument("--model-name", default=None,
                        help="the name the map records as `model` and `match`es (default: the "
                        "--model folder's name)")
    parser.add_argument("--dynamic-out", default=None,
                        help="also write the opt-in dynamic variant here (the same triangle "
                        "layers, every other attention layer XAttention, as --dynamic-rest; "
                        "no `match`: selected by name)")


def _n_local_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("no value")
    return values


# ----------------------------------------------------------------------------
# The attention function


@dataclass
class MaskState:
    """What the attention function applies; changed between forwards."""

    params: TriangleParams
    min_prompt_len: int
    prompt_len: int = 0
    triangle_layers: frozenset = frozenset()
    seen_layers: set = field(default_factory=set)
    mask_cache: dict = field(default_factory=dict)  # the last mask: every triangle layer of a forward shares it


def make_attention(state: MaskState):
    """An ``AttentionInterface`` function: TriangleMix on ``state.triangle_layers``."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                  is_causal=None, **kwargs):
        # query [B, Hq, Tq, D]; key, value [B, Hkv, Tk, D]; batch of one, no padding.
        layer = module.layer_idx
        state.seen_layers.add(layer)
        if getattr(module, "sliding_window", None):
            raise NotImplementedError("calibrate: sliding-window attention is not supported")
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        q_len, k_len = query.shape[2], key.shape[2]
        q_pos = torch.arange(k_len - q_len, k_len, device=query.device)
        k_pos = torch.arange(k_len, device=query.device)
        mask = None
        if layer in state.triangle_layers:
            p = state.params
            ds = int(dense_start(state.prompt_len, p.n_last, state.min_prompt_len))
            # Rows in [first_sparse_row, dense start) see fewer keys than causal rows.
            if max(k_len - q_len, first_sparse_row(p)) < min(ds, k_len):
                cache_key = (q_len, k_len, ds, p.n_init, p.n_local, str(query.device))
                mask = state.mask_cache.get(cache_key)
                if mask is None:
                    mask = visible(q_pos[:, None], k_pos[None, :], ds, p.n_init, p.n_local)
                    state.mask_cache.clear()
                    state.mask_cache[cache_key] = mask
        if mask is not None:
            out = sdpa(query, key, value, attn_mask=mask, scale=scaling)
        elif q_len == k_len or q_len == 1:
            out = sdpa(query, key, value, is_causal=q_len > 1, scale=scaling)
        else:
            causal = visible(q_pos[:, None], k_pos[None, :], 0, 0, 1)
            out = sdpa(query, key, value, attn_mask=causal, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return attention


# ----------------------------------------------------------------------------
# Prompts


def synthetic_prompts(tokenizer, vocab_size: int, num: int, length: int, seed: int):
    """Random tokens with a pass key sentence at a random depth and the question last."""
    import random

    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids or [])
    pool = [i for i in range(vocab_size) if i not in special]
    prefix = tokenizer("").input_ids  # BOS, if the tokenizer adds one
    prompts = []

    def enc(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    for _ in range(num):
        key = rng.randint(10000, 99999)
        intro = enc("There is a pass key hidden in the text below. Find it and memorize it. ")
        needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
        question = enc(" What is the pass key? The pass key is")
        n_fill = max(0, length - len(prefix) - len(intro) - len(needle) - len(question))
        filler = [rng.choice(pool) for _ in range(n_fill)]
        depth = rng.randint(0, n_fill)
        ids = prefix + intro + filler[:depth] + needle + filler[depth:] + question
        prompts.append(ids[-length:] if len(ids) > length else ids)
    return prompts


def file_prompts(tokenizer, path: str, num: int, length: int | None):
    """Prompts from a JSONL file ("prompt"/"text" per line) or windows of a text file."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".jsonl"):
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise ToolError(f"--prompts {path}, line {number}: not JSON ({e})") from None
            item = item if isinstance(item, str) else (
                item.get("prompt", item.get("text")) if isinstance(item, dict) else None)
            if not isinstance(item, str):
                raise ToolError(f"--prompts {path}, line {number}: needs a 'prompt' or 'text' string")
            ids = tokenizer(item).input_ids
            if length is not None and len(ids) > length:
                ids = ids[: length // 2] + ids[len(ids) - (length - length // 2):]
            prompts.append(ids)
        return prompts[:num]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prefix = tokenizer("").input_ids
    step = (length or len(ids)) - len(prefix)
    windows = [prefix + ids[i : i + step] for i in range(0, len(ids) - step + 1, step)]
    return windows[:num]


# ----------------------------------------------------------------------------
# Measurements


class Scorer:
    """Dense references and KL of any set of triangle layers, on fixed prompts."""

    def __init__(self, model, state: MaskState, prompts: list[list[int]], num_generated: int):
        import torch

        self.model, self.state, self.torch = model, state, torch
        self.device = next(model.parameters()).device
        self.items = []  # (prompt length, input ids, number of scored positions)
        self.generated = []
        self.reference = []
        for ids in prompts:
            gen = self._greedy(ids, num_generated + 1)
            seq = torch.tensor([ids + gen[:-1]], device=self.device)
            self.items.append((len(ids), seq, len(gen)))
            self.generated.append(gen)
            self.reference.append(self._logprobs(len(self.items) - 1, ()))

    def _greedy(self, ids: list[int], n: int) -> list[int]:
        """``n`` greedy dense tokens after ``ids`` (stops after an EOS)."""
        torch = self.torch
        self.state.triangle_layers = frozenset()
        self.state.prompt_len = len(ids)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        gen = []
        with torch.no_grad():
            inp = torch.tensor([ids], device=self.device)
            past = None
            for _ in range(n):
                out = self.model(input_ids=inp, past_key_values=past, use_cache=True,
                                 logits_to_keep=1)
                past = out.past_key_values
                tok = int(out.logits[0, -1].argmax())
                gen.append(tok)
                if tok in eos:
                    break
                inp = torch.tensor([[tok]], device=self.device)
        return gen

    def _logprobs(self, index: int, layers) -> "object":
        prompt_len, seq, n_scored = self.items[index]
        self.state.triangle_layers = frozenset(layers)
        self.state.prompt_len = prompt_len
        with self.torch.no_grad():
            logits = self.model(input_ids=seq, use_cache=False, logits_to_keep=n_scored).logits
        return logits[0].float().log_softmax(-1)

    def kl(self, layers) -> float:
        """Mean KL(dense || ``layers`` triangle) over scored positions and prompts."""
        total = 0.0
        for i, ref in enumerate(self.reference):
            lp = self._logprobs(i, layers)
            total += float(kl_rows(ref, lp).mean())
        return total / len(self.reference)


def kl_rows(ref, lp):
    """KL(ref || lp) per row of log-probabilities, summed as sum p (d + e^-d - 1),
    d = ref - lp: every term is >= 0 and second order in d, so the sum does not
    lose the KL to cancellation when the distributions are close."""
    import torch

    d = (ref - lp).double()
    return (ref.double().exp() * (d + torch.expm1(-d))).sum(-1)


@dataclass
class Selection:
    per_layer: dict[int, float]
    steps: list[dict]  # {"layers": [...], "kl": x, "accepted": bool}
    chosen: list[int]
    joint_kl: float
    stop_reason: str


def select_layers(scorer: Scorer, candidates: list[int], budget: float,
                  max_layers: int) -> Selection:
    """Greedy walk over ``candidates`` (the layers that run softmax attention)."""
    per_layer = {}
    for layer in candidates:
        per_layer[layer] = scorer.kl([layer])
        logger.info("calibrate: layer %d alone: KL %.6g nats", layer, per_layer[layer])
    # Least sensitive first; on ties the deeper layer first (the paper's preference).
    order = sorted(per_layer, key=lambda i: (per_layer[i], -i))
    chosen, joint, steps = [], 0.0, []
    stop = "every layer fits"
    for layer in order:
        if len(chosen) >= max_layers:
            stop = f"reached --max-layers-fraction ({max_layers} layers)"
            break
        trial = sorted(chosen + [layer])
        kl = per_layer[layer] if not chosen else scorer.kl(trial)
        accepted = kl <= budget
        steps.append({"layers": trial, "kl": kl, "accepted": accepted})
        logger.info("calibrate: layers %s: joint KL %.6g nats (%s)", format_layer_ranges(trial),
                    kl, "kept" if accepted else "over budget")
        if not accepted:
            stop = f"adding layer {layer} gives KL {kl:.4g} > budget {budget:g}"
            break
        chosen, joint = trial, kl
    return Selection(per_layer, steps, chosen, joint, stop)


# ----------------------------------------------------------------------------
# Output


def map_text(args, num_layers: int, sel: Selection, prompt_desc: str, dynamic: bool | None = None,
             match: bool = True, tried: dict | None = None) -> str:
    import yaml

    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    options = [
        f"--{k.replace('_', '-')}" + ("" if v is True else " " + shlex.quote(_shown(k, v)))
        for k, v in vars(args).items()
        if v is not None and v is not False
        and k not in ("command", "_run", "dtype_used", "n_local_chosen")
    ]
    command = "vllm-trianglemix calibrate " + " ".join(options)
    lines = [
        f"# TriangleMix layer map written by `vllm-trianglemix calibrate` on {date}.",
        f"# command: {command}",
        f"# model: {shown_path(args.model)} ({num_layers} layers), device {args.device}, dtype {args.dtype_used}",
        f"# prompts: {prompt_desc}",
        "# score: KL(dense || TriangleMix) in nats of the next-token distributions at the",
        f"#   last prompt position and {args.num_generated} greedy tokens, mean over prompts.",
        "# layer  KL alone (nats)",
    ]
    lines += [f"#  {i:4d}  {kl:.6g}{'  <- triangle' if i in sel.chosen else ''}"
              for i, kl in sel.per_layer.items()]
    lines += ["# greedy walk (least sensitive first):"]
    lines += [f"#   {format_layer_ranges(s['layers'])}: {s['kl']:.6g}"
              f"{'' if s['accepted'] else '  (over budget)'}" for s in sel.steps]
    lines += [f"# budget {args.kl_budget:g} nats, max {args.max_layers_fraction:g} of the layers;"
              f" stopped: {sel.stop_reason}; joint KL {sel.joint_kl:.6g} nats."]
    if tried and len(tried) > 1:
        lines += ["# n_local tried (most triangle layers wins; ties: the smallest): " + "; ".join(
            f"{nl}: {len(t.chosen)} layers, joint KL {t.joint_kl:.4g}" for nl, t in tried.items())]
    name = args.model_name or os.path.basename(os.path.abspath(args.model).rstrip("/"))
    data = {
        "model": name,
        "match": [os.path.basename(name.rstrip("/"))],
        "num_hidden_layers": num_layers,
        "n_init": args.n_init,
        "n_local": args.n_local_chosen,
        "n_last": args.n_last,
        "min_prompt_len": args.min_prompt_len,
        "triangle_layers": format_layer_ranges(sel.chosen),
        "notes": f"calibrated: joint KL {sel.joint_kl:.4g} nats <= budget {args.kl_budget:g} "
                 f"on {prompt_desc}",
    }
    if not match:
        del data["match"]
    rest = [i for i in sel.per_layer if i not in sel.chosen]
    if dynamic is None:
        dynamic = getattr(args, "dynamic_rest", False)
    if dynamic and rest:
        data["dynamic_layers"] = format_layer_ranges(rest)
        data["dynamic"] = {k: v for k, v in DYNAMIC_DEFAULTS.items() if v is not None}
        data["notes"] += (f"; dynamic layers {format_layer_ranges(rest)} (XAttention defaults) "
                          "added by --dynamic-rest, their accuracy not measured")
    return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False, width=1000)


def _shown(key: str, value) -> str:
    """An option's value as the map's header records it: lists comma-separated, paths
    relative to the working folder or the home folder (no machine-specific prefix)."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    value = str(value)
    if key in ("model", "out", "json", "dynamic_out", "prompts"):
        return shown_path(value)
    return value


def report_text(args, sel: Selection) -> str:
    rows = [f"{'layer':>5}  {'KL alone (nats)':>15}  triangle"]
    rows += [f"{i:>5}  {kl:>15.6g}  {'yes' if i in sel.chosen else ''}"
             for i, kl in sel.per_layer.items()]
    chosen = format_layer_ranges(sel.chosen) if sel.chosen else "none"
    rows += [f"triangle layers: {chosen} ({len(sel.chosen)}/{len(sel.per_layer)}); joint KL "
             f"{sel.joint_kl:.6g} nats (budget {args.kl_budget:g}); stopped: {sel.stop_reason}"]
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------


def _load_model(args, state: MaskState):
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    AttentionInterface.register(ATTENTION_NAME, make_attention(state))
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.float32 if args.device == "cpu" else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, attn_implementation=ATTENTION_NAME
        ).to(args.device)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError, ImportError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ToolError(f"--model: cannot load {args.model} with transformers: {first}") from None
    model.eval()
    args.dtype_used = str(model.dtype).removeprefix("torch.")
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    try:  # the map's own checks, before the long run
        parse_layer_map({"n_init": args.n_init, "n_local": min(args.n_local), "n_last": args.n_last,
                         "min_prompt_len": args.min_prompt_len, "triangle_layers": [0]},
                        "(calibrate options)")
    except TriangleMixConfigError as e:
        raise ToolError(str(e)) from None
    if not args.model:
        raise ToolError("--model: required (a model folder, or a Hugging Face name)")
    args.model = model_folder_or_hub_id(args.model)
    if not args.out:
        raise ToolError("--out: required (the layer map file to write, e.g. --out map.yaml)")
    writable_file(args.out, "--out")
    if args.json:
        writable_file(args.json, "--json")
    if args.dynamic_out:
        writable_file(args.dynamic_out, "--dynamic-out")
    if args.prompts:
        existing_file(args.prompts, "--prompts")
    params = TriangleParams(args.n_init, args.n_local[0], args.n_last)
    state = MaskState(params=params, min_prompt_len=args.min_prompt_len)
    model, tokenizer = _load_model(args, state)
    cfg = model.config.get_text_config()
    num_layers = cfg.num_hidden_layers
    candidates = hf_attention_layer_ids(cfg)
    length = args.prompt_len
    if length is None and not (args.prompts or "").endswith(".jsonl"):
        max_pos = getattr(cfg, "max_position_embeddings", None) or 2 * args.min_prompt_len
        length = min(2 * args.min_prompt_len, max_pos)
    if args.prompts:
        prompts = file_prompts(tokenizer, args.prompts, args.num_prompts, length)
        desc = f"{len(prompts)} from {args.prompts}"
    else:
        vocab = min(len(tokenizer), cfg.vocab_size)
        prompts = synthetic_prompts(tokenizer, vocab, args.num_prompts, length, args.seed)
        desc = f"{len(prompts)} synthetic passkey prompts (random tokens, seed {args.seed})"
    if not prompts:
        logger.error("calibrate: no calibration prompt (file %s)", args.prompts)
        return 2
    lens = sorted(len(p) for p in prompts)
    desc += f", {lens[0]}-{lens[-1]} tokens" if lens[0] != lens[-1] else f", {lens[0]} tokens"
    if lens[0] < args.min_prompt_len:
        logger.warning("calibrate: prompts shorter than --min-prompt-len %d run dense in every "
                       "layer and measure nothing", args.min_prompt_len)
    logger.info("calibrate: %s; %d layers; generating %d tokens per prompt",
                desc, num_layers, args.num_generated)

    scorer = Scorer(model, state, prompts, args.num_generated)
    if state.seen_layers != set(candidates):
        logger.error("calibrate: the model did not call the attention function in every "
                     "attention layer (saw %s, expected %s); this architecture is not supported",
                     sorted(state.seen_layers), candidates)
        return 2
    if len(candidates) < num_layers:
        logger.info("calibrate: hybrid model: candidates are its full-attention layers %s",
                    format_layer_ranges(candidates))
    max_layers = math.floor(args.max_layers_fraction * len(candidates))
    tried: dict[int, Selection] = {}
    for n_local in args.n_local:
        state.params = TriangleParams(args.n_init, n_local, args.n_last)
        if len(args.n_local) > 1:
            logger.info("calibrate: n_local %d", n_local)
        tried[n_local] = select_layers(scorer, candidates, args.kl_budget, max_layers)
    # The most triangle layers; on ties the smallest window (the sparsest).
    args.n_local_chosen = max(tried, key=lambda nl: (len(tried[nl].chosen), -nl))
    sel = tried[args.n_local_chosen]

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "per_layer_kl": {str(k): v for k, v in sel.per_layer.items()},
                "steps": sel.steps, "chosen": sel.chosen, "joint_kl": sel.joint_kl,
                "stop_reason": sel.stop_reason, "kl_budget": args.kl_budget,
                "prompt_lens": [len(p) for p in prompts], "generated": scorer.generated,
                "n_local": args.n_local_chosen,
                "n_local_tried": {str(nl): {"per_layer_kl": {str(k): v for k, v in t.per_layer.items()},
                                            "chosen": t.chosen, "joint_kl": t.joint_kl}
                                  for nl, t in tried.items()},
            }, f, indent=1)
    for n_local, other in tried.items():
        if len(tried) > 1:
            sys.stdout.write(f"n_local {n_local}:{'  (written)' if other is sel else ''}\n")
        sys.stdout.write(report_text(args, other))
    if not sel.chosen:
        sys.stdout.write(f"no layer fits the KL budget; {args.out} not written "
                         "(raise --kl-budget or use longer --n-local)\n")
        return 1
    outputs = [(args.out, dict())]
    if args.dynamic_out:
        outputs.append((args.dynamic_out, dict(dynamic=True, match=False)))
    for path, how in outputs:
        with open(path, "w") as f:
            f.write(map_text(args, num_layers, sel, desc, tried=tried, **how))
        layer_map = load_layer_map(path)
        layer_map.check_model(num_layers, candidates)
        sys.stdout.write(f"wrote {path}: {layer_map.describe()}\n")
    return 0


def layer_kl_from_map(path: str) -> dict[int, float]:
    """The per-layer KL table a map written by calibrate records in its header
    (``# layer  KL alone (nats)`` rows); empty for a map written otherwise."""
    table, inside = {}, False
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            if "KL alone (nats)" in line:
                inside = True
                continue
            parts = line[1:].split()
            if inside and len(parts) >= 2 and parts[0].isdigit():
                try:
                    table[int(parts[0])] = float(parts[1])
                except ValueError:
                    break
            elif inside:
                break
    return table
