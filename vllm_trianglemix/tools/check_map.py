"""Check a layer map against a model's config.json without starting vLLM: what would run, or why not.

``vllm-trianglemix check-map MAP --model MODEL``

MAP is a layer map file or a bundled map's name (``configs/``, e.g.
``llama-3.1-8b-instruct-dynamic``); without MAP, the bundled map the engine
would pick for the model's name. MODEL is the model's folder or its
``config.json`` (nothing else is read: no weights, no vLLM). The map and the
model go through the engine's own rule (``vllm_trianglemix.rules``: every
field, layer ids against the model's layers, a hybrid's full-attention layers
for triangle and dynamic layers alike, the models TriangleMix refuses), with
the model's facts read from config.json. What depends on the engine's
settings (``rules.CHECKED_AT_START``: dtype, head size and the dynamic layers'
limits on GPU, --kv-cache-dtype, ...) is checked when vLLM starts. Prints the
triangle and dynamic layers with their parameters, the dense layers and
``min_prompt_len``, or one error line naming the field, with exit status 2.
``vllm-trianglemix serve`` runs the same check before it starts vLLM.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from vllm_trianglemix.config import (
    ADDITIONAL_CONFIG_KEY,
    LayerMap,
    format_layer_ranges,
    resolve_layer_map,
)
from vllm_trianglemix.model_info import ModelConfigError, load_text_config
from vllm_trianglemix.rules import CHECKED_AT_START, ModelFacts, check_layer_map, model_refusals
from vllm_trianglemix.tools.errors import ToolError, looks_like_path


@dataclass
class MapCheck:
    """A map validated against a model's config."""

    layer_map: LayerMap
    model: str
    architecture: str
    num_layers: int
    attention_layers: list[int]
    hybrid: bool


def check_map(map_ref: str | None, model: str, served_name: str | None = None) -> MapCheck:
    """Validate ``map_ref`` (a file, a bundled name, or None: the bundled map for
    the model) against ``model`` (a folder or config.json), as the engine would.

    Raises ``TriangleMixConfigError`` (the map's field named) or ``ToolError``.
    """
    try:
        cfg = load_text_config(model)
    except ModelConfigError as e:
        hint = ""
        if not os.path.exists(os.path.expanduser(model)) and not looks_like_path(model):
            hint = (f" (check-map reads a local config.json; for a hub model, fetch it with "
                    f"`huggingface-cli download {model} config.json`)")
        raise ToolError(f"--model: {e}{hint}") from None
    folder = model if os.path.isdir(os.path.expanduser(model)) else os.path.dirname(
        os.path.abspath(os.path.expanduser(model)))
    facts = ModelFacts.from_hf_config(cfg)
    reasons = model_refusals(facts)
    if reasons:
        raise ToolError(f"TriangleMix attention cannot serve {model}: {'; '.join(reasons)}")
    additional = {ADDITIONAL_CONFIG_KEY: map_ref} if map_ref is not None else {}
    layer_map = resolve_layer_map(additional, folder, served_name)
    check_layer_map(layer_map, facts)
    arch = ", ".join(getattr(cfg, "architectures", []) or []) or getattr(cfg, "model_type", "?")
    return MapCheck(layer_map, model, arch, facts.num_layers, list(facts.attention_layers),
                    facts.hybrid)


def report(check: MapCheck) -> str:
    m = check.layer_map
    lines = [f"model: {check.model} ({check.architecture}, {check.num_layers} layers"
             + (f"; full attention: {format_layer_ranges(check.attention_layers)})"
                if check.hybrid else ")"),
             f"map: {m.source}"]
    groups: dict = {}
    for layer in sorted(m.layers):
        groups.setdefault(m.layers[layer], []).append(layer)
    for p, ids in groups.items():
        lines.append(f"triangle layers {format_layer_ranges(ids)}: n_init={p.n_init}, "
                     f"n_local={p.n_local}, n_last={p.n_last}")
    if not groups:
        lines.append("triangle layers: none")
    dyn: dict = {}
    for layer in sorted(m.dynamic_layers):
        dyn.setdefault(m.dynamic_layers[layer], []).append(layer)
    for p, ids in dyn.items():
        lines.append(
            f"dynamic layers {format_layer_ranges(ids)}: {p.method}, block_size={p.block_size}, "
            f"stride={p.stride}, threshold={p.threshold}"
            + (f", max_density={p.max_density}" if p.max_density is not None else "")
            + f", n_last={p.n_last}")
    if not dyn:
        lines.append("dynamic layers: none")
    dense = [i for i in check.attention_layers if i not in m.layers and i not in m.dynamic_layers]
    kind = "full-attention layers" if check.hybrid else "layers"
    if dense:
        lines.append(f"dense {kind} (stock backend): {format_layer_ranges(dense)}")
    if check.hybrid:
        lines.append("the linear-attention layers run as vLLM runs them")
    lines.append(f"min_prompt_len {m.min_prompt_len}: shorter prompts run dense in every layer; "
                 "decode always runs the stock backend")
    if "uncalibrated" in (m.notes or "").lower():
        lines.append(f"warning: an uncalibrated starting point; run `vllm-trianglemix calibrate "
                     f"--model {check.model}` for a measured map")
    lines.append(f"checked when vLLM starts, not here: {CHECKED_AT_START}")
    lines.append("OK")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "map", nargs="?", default=None, metavar="MAP",
        help="a layer map file or a bundled map's name (default: the bundled map whose "
        "'match' names the model, as the engine picks it)",
    )
    parser.add_argument("--model", required=True,
                        help="the model's folder or its config.json (only config.json is read)")
    parser.add_argument("--served-model-name", default=None,
                        help="also matched against bundled maps, as vLLM's option of that name")


def run(args) -> int:
    sys.stdout.write(report(check_map(args.map, args.model, args.served_model_name)))
    return 0
