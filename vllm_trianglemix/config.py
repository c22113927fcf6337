"""The layer map: schema, loading, validation with field-named errors, bundled maps.

A layer map is a YAML file::

    model: meta-llama/Llama-3.1-8B-Instruct   # optional: what the numbers were chosen for
    match: [llama-3.1-8b-instruct]            # optional: model names this bundled map serves
    num_hidden_layers: 32                     # optional: checked against the served model
    n_init: 8            # sink tokens every row keeps
    n_local: 512         # causal window, the query itself included
    n_last: 128          # the last n_last prompt rows stay dense
    min_prompt_len: 8192 # shorter prompts run dense in every layer
    triangle_layers: "16-31"                  # ints and "a-b" ranges, a list or one string
                                              # (may be empty or absent when dynamic_layers
                                              # is given: a dynamic-only map)
    layer_overrides:                          # optional, per triangle layer
      20: {n_local: 1024}
    dynamic_layers: "0-15"                    # optional: TriangleMix + XAttention layers
    dynamic:                                  # optional, their parameters (defaults below)
      method: xattention
      block_size: 128
      stride: 8
      threshold: 0.9
      max_density: 0.2                        # optional fixed budget
    notes: "where the numbers come from"      # optional, free text

Every error names the file and the field, so a bad map stops the engine at
start with a message the user can act on.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vllm_trianglemix.pattern import DynamicParams, TriangleParams

ADDITIONAL_CONFIG_KEY = "trianglemix_config"
"""``--additional-config '{"trianglemix_config": "/path/map.yaml"}'``."""

RESOLVED_KEY = "trianglemix_resolved_map"
"""Where the front end puts the validated map for the engine and its workers,
so that workers on other nodes need no access to the file."""

PARAM_KEYS = ("n_init", "n_local", "n_last")
REQUIRED_KEYS = PARAM_KEYS + ("min_prompt_len",)
OPTIONAL_KEYS = (
    "triangle_layers", "model", "match", "num_hidden_layers", "layer_overrides", "dynamic_layers", "dynamic", "notes",
)

DYNAMIC_METHODS = ("xattention",)
DYNAMIC_DEFAULTS = {"method": "xattention", "block_size": 128, "stride": 8, "threshold": 0.9,
                    "max_density": None}
"""XAttention's settings for language models (Xu et al., arXiv 2503.16428, and the
defaults of its reference code's ``xattn_estimate``): block 128, stride 8, threshold 0.9."""


class TriangleMixConfigError(ValueError):
    """A layer map that cannot be used, with the file and field named."""

    def __init__(self, source: str, field_name: str | None, problem: str):
        where = f"field '{field_name}': " if field_name else ""
        super().__init__(f"TriangleMix layer map {source}: {where}{problem}")
        self.source = source
        self.field = field_name


@dataclass(frozen=True)
class LayerMap:
    """A validated layer map."""

    source: str
    min_prompt_len: int
    defaults: TriangleParams
    layers: dict[int, TriangleParams]
    dynamic_layers: dict[int, DynamicParams] = field(default_factory=dict)
    model: str | None = None
    match: tuple[str, ...] = ()
    num_hidden_layers: int | None = None
    notes: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def params_for(self, layer_index: int) -> TriangleParams | DynamicParams | None:
        """The layer's parameters (triangle or dynamic), or ``None`` for a dense layer."""
        if layer_index in self.dynamic_layers:
            return self.dynamic_layers[layer_index]
        return self.layers.get(layer_index)

    @property
    def param_sets(self) -> list[TriangleParams]:
        """The distinct parameter sets of the triangle layers, in a fixed order."""
        return sorted(set(self.layers.values()), key=lambda p: (p.n_init, p.n_local, p.n_last))

    @property
    def dynamic_param_sets(self) -> list[DynamicParams]:
        """The distinct parameter sets of the dynamic layers, in a fixed order."""
        return sorted(set(self.dynamic_layers.values()), key=repr)

    @property
    def min_n_last(self) -> int:
        values = list(self.layers.values()) + list(self.dynamic_layers.values())
        return min(p.n_last for p in values)

    def check_model(self, num_layers: int, allowed_layers: list[int] | None = None) -> None:
        """Refuse layer ids the served model does not have, or (``allowed_layers``:
        a hybrid's full-attention layers) that do not run softmax attention."""
        if self.num_hidden_layers is not None and self.num_hidden_layers != num_layers:
            raise TriangleMixConfigError(
                self.source,
                "num_hidden_layers",
                f"the map is for a model with {self.num_hidden_layers} layers, "
                f"the served model has {num_layers}",
            )
        for name, layers in (("triangle_layers", self.layers), ("dynamic_layers", self.dynamic_layers)):
            for layer in sorted(layers):
                if layer >= num_layers:
                    raise TriangleMixConfigError(
                        self.source,
                        name,
                        f"layer {layer} is outside the model "
                        f"({num_layers} layers: 0-{num_layers - 1})",
                    )
        if allowed_layers is None:
            return
        for name, layers in (("triangle_layers", self.layers), ("dynamic_layers", self.dynamic_layers)):
            others = sorted(set(layers) - set(allowed_layers))
            if others:
                kind = name.split("_")[0]
                raise TriangleMixConfigError(
                    self.source,
                    name,
                    f"layers {others} are not full-attention layers; only full-attention "
                    f"layers can be {kind} layers (this model's: "
                    f"{', '.join(map(str, sorted(allowed_layers)))})",
                )

    def describe(self) -> str:
        """One line: which layers run triangle, with their parameters."""
        groups: dict[TriangleParams, list[int]] = {}
        for layer in sorted(self.layers):
            groups.setdefault(self.layers[layer], []).append(layer)
        parts = [
            f"layers {format_layer_ranges(ids)} (n_init={p.n_init}, "
            f"n_local={p.n_local}, n_last={p.n_last})"
            for p, ids in groups.items()
        ]
        dyn: dict[DynamicParams, list[int]] = {}
        for layer in sorted(self.dynamic_layers):
            dyn.setdefault(self.dynamic_layers[layer], []).append(layer)
        parts += [
            f"dynamic layers {format_layer_ranges(ids)} ({p.method}: block_size={p.block_size}, "
            f"stride={p.stride}, threshold={p.threshold}"
            + (f", max_density={p.max_density}" if p.max_density is not None else "")
            + f", n_last={p.n_last})"
            for p, ids in dyn.items()
        ]
        return (
            f"{'; '.join(parts)}; prompts shorter than {self.min_prompt_len} "
            f"tokens run dense; map {self.source}"
        )


def format_layer_ranges(ids: list[int]) -> str:
    """[16, 17, 18, 20] -> '16-18,20'."""
    out, run = [], []
    for i in sorted(ids):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def unknown_key_problem(key: str, known: tuple[str, ...]) -> str:
    """'unknown key; did you mean 'n_local'? (known keys: ...)' for a misspelt key."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key{hint} (known keys: {', '.join(known)})"


def _int_field(source: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TriangleMixConfigError(
            source, name, f"must be an integer, got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise TriangleMixConfigError(source, name, f"must be >= {minimum}, got {value}")
    return value


_MINIMUM = {"n_init": 0, "n_local": 1, "n_last": 0, "min_prompt_len": 0}
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def _layer_ids(source: str, value: Any, name: str = "triangle_layers",
               may_be_empty: bool = False) -> list[int]:
    if value is None and may_be_empty:
        return []
    if isinstance(value, str):
        items: list[Any] = [s for s in value.split(",")] if value.strip() else []
    elif isinstance(value, list):
        items = value
    else:
        raise TriangleMixConfigError(
            source, name, f"must be a list of layer ids or ranges like '16-31', got {value!r}"
        )
    if not items:
        if may_be_empty:
            return []
        raise TriangleMixConfigError(source, name, "names no layer")
    ids: list[int] = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if isinstance(item, bool):
            raise TriangleMixConfigError(source, where, f"not a layer id: {item!r}")
        if isinstance(item, int):
            if item < 0:
                raise TriangleMixConfigError(source, where, f"layer ids are >= 0, got {item}")
            ids.append(item)
            continue
        if isinstance(item, str):
            text = item.strip()
            if text.isdigit():
                ids.append(int(text))
                continue
            m = _RANGE.match(text)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise TriangleMixConfigError(source, where, f"empty range '{text}'")
                ids.extend(range(lo, hi + 1))
                continue
        raise TriangleMixConfigError(
            source, where, f"not a layer id or a range like '16-31': {item!r}"
        )
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise TriangleMixConfigError(source, name, f"layers listed twice: {dup}")
    return sorted(ids)


def parse_layer_map(data: Any, source: str) -> LayerMap:
    """Validate the parsed YAML of a layer map."""
    if not isinstance(data, dict):
        raise TriangleMixConfigError(
            source, None, f"the top level must be a mapping of keys, got {type(data).__name__}"
        )
    unknown = sorted(str(k) for k in data if k not in REQUIRED_KEYS + OPTIONAL_KEYS)
    if unknown:
        raise TriangleMixConfigError(
            source, unknown[0], unknown_key_problem(unknown[0], REQUIRED_KEYS + OPTIONAL_KEYS)
        )
    for key in REQUIRED_KEYS:
        if key not in data:
            raise TriangleMixConfigError(source, key, "required key is missing")

    values = {k: _int_field(source, k, data[k], _MINIMUM[k]) for k in _MINIMUM}
    defaults = TriangleParams(values["n_init"], values["n_local"], values["n_last"])
    # A map without triangle layers is a dynamic-only map: it must name dynamic layers.
    dynamic_only = "dynamic_layers" in data
    if "triangle_layers" not in data and not dynamic_only:
        raise TriangleMixConfigError(
            source, "triangle_layers", "required key is missing (a map names triangle_layers, "
            "dynamic_layers or both)"
        )
    triangle_ids = _layer_ids(source, data.get("triangle_layers"), may_be_empty=dynamic_only)
    layers = {i: defaults for i in triangle_ids}

    overrides = data.get("layer_overrides") or {}
    if not isinstance(overrides, dict):
        raise TriangleMixConfigError(
            source, "layer_overrides", "must map layer ids to {n_init, n_local, n_last}"
        )
    for layer, params in overrides.items():
        where = f"layer_overrides.{layer}"
        layer_id = layer if isinstance(layer, int) and not isinstance(layer, bool) else None
        if isinstance(layer, str) and layer.strip().isdigit():
            layer_id = int(layer)
        if layer_id is None:
            raise TriangleMixConfigError(source, where, "keys must be layer ids")
        if layer_id not in layers:
            raise TriangleMixConfigError(
                source, where, f"layer {layer_id} is not in triangle_layers"
            )
        if not isinstance(params, dict) or not params:
            raise TriangleMixConfigError(
                source, where, "must be a mapping with some of n_init, n_local, n_last"
            )
        bad = sorted(str(k) for k in params if k not in PARAM_KEYS)
        if bad:
            raise TriangleMixConfigError(
                source, f"{where}.{bad[0]}", unknown_key_problem(bad[0], PARAM_KEYS)
            )
        merged = {k: getattr(defaults, k) for k in PARAM_KEYS}
        for k, v in params.items():
            merged[k] = _int_field(source, f"{where}.{k}", v, _MINIMUM[k])
        layers[layer_id] = TriangleParams(**merged)

    dynamic_layers = _dynamic_layers(source, data, defaults.n_last, set(layers))

    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise TriangleMixConfigError(source, "model", "must be a model name (a string)")
    match = data.get("match") or []
    if isinstance(match, str):
        match = [match]
    if not isinstance(match, list) or not all(isinstance(m, str) for m in match):
        raise TriangleMixConfigError(source, "match", "must be a list of model names")
    num_layers = data.get("num_hidden_layers")
    if num_layers is not None:
        num_layers = _int_field(source, "num_hidden_layers", num_layers, 1)
    notes = data.get("notes")
    if notes is not None and not isinstance(notes, str):
        raise TriangleMixConfigError(source, "notes", "must be text")
    return LayerMap(
        source=source,
        min_prompt_len=values["min_prompt_len"],
        defaults=defaults,
        layers=layers,
        dynamic_layers=dynamic_layers,
        model=model,
        match=tuple(match),
        num_hidden_layers=num_layers,
        notes=notes,
        raw=dict(data),
    )


def _number_field(source: str, name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TriangleMixConfigError(
            source, name, f"must be a number, got {value!r} ({type(value).__name__})"
        )
    if not lo < value <= hi:
        raise TriangleMixConfigError(source, name, f"must be in ({lo}, {hi}], got {value}")
    return float(value)


def _dynamic_layers(source: str, data: dict, n_last: int, triangle: set[int]) -> dict[int, DynamicParams]:
    """``dynamic_layers`` and ``dynamic``: validated, with XAttention's defaults."""
    spec = data.get("dynamic")
    if "dynamic_layers" not in data:
        if spec is not None:
            raise TriangleMixConfigError(
                source, "dynamic", "given without 'dynamic_layers' (which layers use it?)"
            )
        return {}
    ids = _layer_ids(source, data["dynamic_layers"], "dynamic_layers")
    both = sorted(triangle.intersection(ids))
    if both:
        raise TriangleMixConfigError(
            source, "dynamic_layers", f"layers {format_layer_ranges(both)} are also in triangle_layers"
        )
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise TriangleMixConfigError(
            source, "dynamic", "must be a mapping (method, block_size, stride, threshold, max_density)"
        )
    unknown = sorted(str(k) for k in spec if k not in DYNAMIC_DEFAULTS)
    if unknown:
        raise TriangleMixConfigError(
            source, f"dynamic.{unknown[0]}", unknown_key_problem(unknown[0], tuple(DYNAMIC_DEFAULTS))
        )
    values = {**DYNAMIC_DEFAULTS, **spec}
    if values["method"] not in DYNAMIC_METHODS:
        raise TriangleMixConfigError(
            source, "dynamic.method",
            f"unknown method {values['method']!r} (supported: {', '.join(DYNAMIC_METHODS)})",
        )
    block_size = _int_field(source, "dynamic.block_size", values["block_size"], 16)
    if block_size % 16:
        raise TriangleMixConfigError(
            source, "dynamic.block_size", f"must be a multiple of 16, got {block_size}"
        )
    stride = _int_field(source, "dynamic.stride", values["stride"], 1)
    if block_size % stride:
        raise TriangleMixConfigError(
            source, "dynamic.stride", f"must divide block_size ({block_size}), got {stride}"
        )
    threshold = _number_field(source, "dynamic.threshold", values["threshold"], 0.0, 1.0)
    max_density = values["max_density"]
    if max_density is not None:
        max_density = _number_field(source, "dynamic.max_density", max_density, 0.0, 1.0)
    params = DynamicParams(values["method"], block_size, stride, threshold, max_density, n_last)
    return {i: params for i in ids}


def load_layer_map(path: str) -> LayerMap:
    """Read and validate a layer map file."""
    import yaml

    if not os.path.isfile(path):
        raise TriangleMixConfigError(path, None, "no such file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise TriangleMixConfigError(path, None, f"malformed YAML: {e}") from None
    return parse_layer_map(data, path)


def bundled_map_paths() -> list[str]:
    """The maps shipped with the package (configs/*.yaml).

    From a source checkout (installed editable or not), the checkout's configs/;
    installed from a wheel, the subpackage ``vllm_trianglemix.configs``.
    """
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if (checkout / "__init__.py").is_file():
        root = checkout
    else:
        root = resources.files("vllm_trianglemix.configs")
    return sorted(str(p) for p in root.iterdir() if p.name.endswith(".yaml"))


def _model_key(name: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct/' -> 'llama-3.1-8b-instruct'."""
    return os.path.basename(name.rstrip("/")).lower()


def find_bundled_map(model_name: str) -> LayerMap | None:
    """The bundled map whose ``match`` names the served model.

    Bundled maps without ``match`` (the opt-in variants, e.g. ``*-dynamic``)
    are never chosen automatically: select them by name (:func:`bundled_map_by_name`).
    """
    key = _model_key(model_name)
    for path in bundled_map_paths():
        layer_map = load_layer_map(path)
        if key in {_model_key(n) for n in layer_map.match}:
            return layer_map
    return None


def bundled_map_names() -> list[str]:
    return [os.path.basename(p)[: -len(".yaml")] for p in bundled_map_paths()]


def bundled_map_by_name(name: str) -> LayerMap | None:
    """``llama-3.1-8b-instruct-dynamic`` -> that bundled map (None if there is none)."""
    for path in bundled_map_paths():
        if os.path.basename(path) in (name, f"{name}.yaml"):
            return load_layer_map(path)
    return None


def resolve_layer_map(
    additional_config: dict | None, model_name: str, served_name: str | None = None
) -> LayerMap:
    """The map for this engine: the user's file (or a bundled map's name), else
    the bundled one for the model."""
    additional_config = additional_config or {}
    resolved = additional_config.get(RESOLVED_KEY)
    if resolved is not None:
        return parse_layer_map(resolved["map"], resolved["source"])
    path = additional_config.get(ADDITIONAL_CONFIG_KEY)
    if path is not None:
        if not isinstance(path, str):
            raise TriangleMixConfigError(
                f"--additional-config {ADDITIONAL_CONFIG_KEY}", None, "must be a file path"
            )
        path = os.path.expanduser(path)
        if not os.path.exists(path) and os.sep not in path:
            bundled = bundled_map_by_name(path)
            if bundled is None:
                raise TriangleMixConfigError(
                    path, None,
                    "no such file, and no bundled map of that name "
                    f"(bundled: {', '.join(bundled_map_names())})",
                )
            return bundled
        return load_layer_map(path)
    for name in (model_name, served_name):
        if name:
            layer_map = find_bundled_map(name)
            if layer_map is not None:
                return layer_map
    known = ", ".join(
        sorted({m for p in bundled_map_paths() for m in (load_layer_map(p).match or ())})
    )
    raise TriangleMixConfigError(
        "(none given)",
        None,
        f"no bundled layer map matches model '{model_name}' (bundled: {known}). "
        f"Give one with --additional-config "
        f"'{{\"{ADDITIONAL_CONFIG_KEY}\": \"/path/to/map.yaml\"}}' "
        "(write one with `python -m vllm_trianglemix calibrate`, or copy a bundled "
        "map from the package's configs/ folder)",
    )


def to_additional_config(layer_map: LayerMap) -> dict:
    """What the front end stores under :data:`RESOLVED_KEY`."""
    return {"source": layer_map.source, "map": layer_map.raw}
