"""The layer maps ``vllm-trianglemix eval`` compares, derived from a calibrated map.

* ``triangle``: the calibrated map (``calibrate``'s output, e.g. a bundled map);
* ``triangle-bad``: the same parameters, triangle on the layers ``calibrate``
  ranked worst (the highest KL alone, as many as the calibrated map has);
* ``triangle+dynamic``: the map's dynamic variant (``calibrate --dynamic-out``);
* ``dynamic-only``: XAttention on every layer the dynamic variant covers (its
  triangle and its dynamic layers), no triangle layer: the baseline TriangleMix
  is compared with;
* ``triangle-full``: the calibrated map's layers with a window that reaches
  back to the first key in every prompt of up to ``full_length`` tokens
  (``n_local = full_length - n_init - n_last``): the mask is dense, and the
  prompts longer than ``n_init + n_local`` tokens still run the calibrated
  layers on the plugin's path, so their difference from dense is numerics
  alone (the noise floor of the log-likelihood comparison).
"""

from __future__ import annotations

import os

from vllm_trianglemix.config import (
    LayerMap,
    bundled_map_by_name,
    find_bundled_map,
    format_layer_ranges,
    load_layer_map,
)
from vllm_trianglemix.tools.calibrate import layer_kl_from_map
from vllm_trianglemix.tools.errors import ToolError


def calibrated_map(map_arg: str | None, model_names: list[str]) -> LayerMap:
    if map_arg:
        if os.path.isfile(os.path.expanduser(map_arg)):
            return load_layer_map(os.path.expanduser(map_arg))
        found = bundled_map_by_name(map_arg)
        if found is None:
            raise ToolError(f"--map: no such file and no bundled map named {map_arg!r}")
        return found
    for name in model_names:
        found = find_bundled_map(name)
        if found is not None:
            return found
    raise ToolError(f"--map: no bundled map matches {model_names[0]!r}; give a map written by "
                    "`vllm-trianglemix calibrate`")


def dynamic_map(map_arg: str | None, base: LayerMap) -> LayerMap:
    if map_arg:
        return calibrated_map(map_arg, [])
    if base.dynamic_layers:
        return base
    name = os.path.basename(base.source)[: -len(".yaml")] + "-dynamic"
    sibling = os.path.join(os.path.dirname(base.source), name + ".yaml")
    found = load_layer_map(sibling) if os.path.isfile(sibling) else bundled_map_by_name(name)
    if found is None or not found.dynamic_layers:
        raise ToolError(f"--dynamic-map: {base.source} has no dynamic variant ({name}.yaml); "
                        "write one with `calibrate --dynamic-out`")
    return found


def worst_layers(base: LayerMap, bad_layers: str | None) -> list[int]:
    """The layers calibrate ranked most sensitive, as many as ``base`` has triangle layers."""
    if bad_layers:
        from vllm_trianglemix.config import _layer_ids

        return sorted(_layer_ids("--bad-layers", bad_layers))
    table = layer_kl_from_map(base.source)
    if not table:
        raise ToolError(f"--bad-layers: {base.source} records no per-layer KL (not written by "
                        "calibrate); name the layers with --bad-layers")
    ranked = sorted(table, key=lambda i: (-table[i], i))
    return sorted(ranked[: len(base.layers)])


def _without_match(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if k not in ("match", "layer_overrides")}


def derived_maps(base: LayerMap, dynamic: LayerMap, bad: list[int], out_dir: str,
                 full_length: int | None = None) -> dict[str, str]:
    """Write the triangle-bad (given ``bad`` layers) and dynamic-only maps (and
    triangle-full, given ``full_length``); every map's path by configuration."""
    import yaml

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.basename(base.source)[: -len(".yaml")]
    bad_raw = _without_match(base.raw) | {
        "triangle_layers": format_layer_ranges(bad),
        "notes": f"deliberately bad: triangle on the layers calibrate ranked worst "
                 f"(derived from {os.path.basename(base.source)})",
    }
    covered = sorted(set(dynamic.layers) | set(dynamic.dynamic_layers))
    only_raw = _without_match(dynamic.raw) | {
        "dynamic_layers": format_layer_ranges(covered),
        "notes": f"XAttention on every layer {os.path.basename(dynamic.source)} covers, no "
                 "triangle layer",
    }
    only_raw.pop("triangle_layers", None)
    derived = [("triangle-bad", bad_raw)] if bad else []  # none: triangle-bad not run
    derived.append(("dynamic-only", only_raw))
    if full_length is not None:
        d = base.defaults
        n_local = full_length - d.n_init - d.n_last
        if n_local < 1:
            raise ToolError(f"triangle-full: a {full_length}-token window has no room for "
                            f"n_init {d.n_init} + n_last {d.n_last}")
        derived.append(("triangle-full", _without_match(base.raw) | {
            "n_local": n_local,
            "notes": f"noise floor: the layers of {os.path.basename(base.source)} with a window "
                     f"that covers every prompt of up to {full_length} tokens (a dense mask on "
                     "the plugin's path)",
        }))
    paths = {"triangle": base.source, "triangle+dynamic": dynamic.source}
    for name, raw in derived:
        path = os.path.join(out_dir, f"{stem}-{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(raw, f, sort_keys=False, width=1000)
        load_layer_map(path)  # validated like any map
        paths[name] = path
    return paths
