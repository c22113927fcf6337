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
    layer_overrides:                          # optional, per triangle layer
      20: {n_local: 1024}
    notes: "where the numbers come from"      # optional, free text

Every error names the file and the field, so a bad map stops the engine at
start with a message the user can act on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vllm_trianglemix.pattern import TriangleParams

ADDITIONAL_CONFIG_KEY = "trianglemix_config"
"""``--additional-config '{"trianglemix_config": "/path/map.yaml"}'``."""

RESOLVED_KEY = "trianglemix_resolved_map"
"""Where the front end puts the validated map for the engine and its workers,
so that workers on other nodes need no access to the file."""

PARAM_KEYS = ("n_init", "n_local", "n_last")
REQUIRED_KEYS = PARAM_KEYS + ("min_prompt_len", "triangle_layers")
OPTIONAL_KEYS = ("model", "match", "num_hidden_layers", "layer_overrides", "notes")


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
    model: str | None = None
    match: tuple[str, ...] = ()
    num_hidden_layers: int | None = None
    notes: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def params_for(self, layer_index: int) -> TriangleParams | None:
        """The layer's parameters, or ``None`` for a dense layer."""
        return self.layers.get(layer_index)

    @property
    def param_sets(self) -> list[TriangleParams]:
        """The distinct parameter sets of the triangle layers, in a fixed order."""
        return sorted(set(self.layers.values()), key=lambda p: (p.n_init, p.n_local, p.n_last))

    @property
    def min_n_last(self) -> int:
        return min(p.n_last for p in self.layers.values())

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
        for layer in sorted(self.layers):
            if layer >= num_layers:
                raise TriangleMixConfigError(
                    self.source,
                    "triangle_layers",
                    f"layer {layer} is outside the model "
                    f"({num_layers} layers: 0-{num_layers - 1})",
                )
        if allowed_layers is None:
            return
        others = sorted(set(self.layers) - set(allowed_layers))
        if others:
            raise TriangleMixConfigError(
                self.source,
                "triangle_layers",
                f"layers {others} are not full-attention layers; only full-attention "
                f"layers can be triangle layers (this model's: "
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


def _layer_ids(source: str, value: Any) -> list[int]:
    name = "triangle_layers"
    if isinstance(value, str):
        items: list[Any] = [s for s in value.split(",")]
    elif isinstance(value, list):
        items = value
    else:
        raise TriangleMixConfigError(
            source, name, f"must be a list of layer ids or ranges like '16-31', got {value!r}"
        )
    if not items:
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
            source,
            unknown[0],
            f"unknown key (known keys: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)})",
        )
    for key in REQUIRED_KEYS:
        if key not in data:
            raise TriangleMixConfigError(source, key, "required key is missing")

    values = {k: _int_field(source, k, data[k], _MINIMUM[k]) for k in _MINIMUM}
    defaults = TriangleParams(values["n_init"], values["n_local"], values["n_last"])
    layers = {i: defaults for i in _layer_ids(source, data["triangle_layers"])}

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
                source, f"{where}.{bad[0]}", "unknown key (known: n_init, n_local, n_last)"
            )
        merged = {k: getattr(defaults, k) for k in PARAM_KEYS}
        for k, v in params.items():
            merged[k] = _int_field(source, f"{where}.{k}", v, _MINIMUM[k])
        layers[layer_id] = TriangleParams(**merged)

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
        model=model,
        match=tuple(match),
        num_hidden_layers=num_layers,
        notes=notes,
        raw=dict(data),
    )


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
    """The bundled map whose ``model`` or ``match`` names the served model."""
    key = _model_key(model_name)
    for path in bundled_map_paths():
        layer_map = load_layer_map(path)
        names = {_model_key(n) for n in layer_map.match}
        if layer_map.model:
            names.add(_model_key(layer_map.model))
        if key in names:
            return layer_map
    return None


def resolve_layer_map(
    additional_config: dict | None, model_name: str, served_name: str | None = None
) -> LayerMap:
    """The map for this engine: the user's file, else the bundled one for the model."""
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
        return load_layer_map(os.path.expanduser(path))
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
