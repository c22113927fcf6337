"""RULER through lm-eval: its synthetic tasks, generated offline, scored against any OpenAI server.

lm-eval (0.4.13) generates each RULER task's samples itself with the model's
tokenizer, sized to each target length (``max_seq_lengths``); the tasks used
here need no download: ``niah_single_1`` (a needle in a repeated-sentence
haystack), ``niah_multikey_2`` / ``niah_multikey_3`` (needles among needles),
``ruler_vt`` (variable tracking), ``ruler_cwe`` / ``ruler_fwe`` (common /
frequent word extraction). The essay haystacks (``niah_single_2`` etc.) and
the QA tasks download their text, which a machine without internet cannot.

The samples are generated once per length (lm-eval makes 500 per task and
length; ``limit`` takes the first ones) and reused for every server, so every
configuration answers the same prompts. lm-eval draws them from Python's and
NumPy's global random generators without seeding them, so each run would draw
other needles, keys and words; ``load`` seeds both (``seed``, then restores
their state), so every run, and a run against other servers (``--url``), draws
the same samples. lm-eval's ``local-completions`` model
sends them (token ids, greedy, the task's own generation settings) and its
RULER scoring (``string_match_all`` / ``_part``) scores the answers; the score
of a task at a length is the mean over its samples, in percent, as RULER reports.

Generation: greedy, each task's own settings, its length capped by
``max_gen_toks`` when given (``eval`` caps at 48 tokens by default: every
answer these tasks ask for fits, and the small model's rambling after it, up
to 128 tokens of decode per sample, would cost most of the run's time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import sys
from dataclasses import dataclass, field

from vllm_trianglemix.tools.errors import ToolError

logger = logging.getLogger("vllm.trianglemix")

OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3",
                 "ruler_vt", "ruler_cwe", "ruler_fwe")
# The needle tasks: SmolLM2-135M-Instruct retrieves niah_single_1's needle at 1K-4K and
# finds the right key among needles part of the time (niah_multikey_2/3), while
# ruler_vt / ruler_cwe / ruler_fwe are near chance for it and the slowest to generate.
DEFAULT_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")


@dataclass
class RulerSet:
    """The loaded lm-eval tasks of one length (their samples generated)."""

    length: int
    tasks: tuple[str, ...]
    task_dict: dict = field(repr=False)


def _outside_site_packages(path: str) -> bool:
    """Whether dill takes the module file at ``path`` for a third-party one it must pickle by
    value: neither under the interpreter's prefix nor in a ``site-packages`` folder."""
    prefixes = [getattr(sys, name) for name in ("prefix", "base_prefix", "exec_prefix", "base_exec_prefix")]
    real = os.path.realpath(path)
    return "site-packages" not in path and not any(
        path.startswith(p) or real.startswith(os.path.realpath(p)) for p in prefixes)


def _unfingerprintable(error: Exception) -> str | None:
    """Why lm-eval's samples could not be built, where ``datasets`` cannot fingerprint them
    because pyarrow is installed into a folder (``pip install --target``); ``None`` otherwise.

    ``datasets`` fingerprints every new dataset by pickling it with dill, which pickles a
    module by value, not by name, when its file lies neither under the interpreter's prefix
    nor in a ``site-packages`` folder: pyarrow's types then fail to pickle.
    """
    import pyarrow

    if not _outside_site_packages(pyarrow.__file__):
        return None
    return (f"lm-eval could not build the RULER samples: datasets fingerprints them with dill, "
            f"which pickles pyarrow by value because {os.path.dirname(pyarrow.__file__)} is outside "
            f"the interpreter's prefix and any site-packages folder ({error}); install the accuracy "
            f"extra into a virtual environment, or into a folder whose path contains 'site-packages'")


def check_installed() -> None:
    try:
        import lm_eval  # noqa: F401
        import nltk  # noqa: F401
        import wonderwords  # noqa: F401
    except ImportError as e:
        raise ToolError(f"lm-eval's RULER tasks need {e.name}: install the accuracy extra, "
                        "`pip install -r requirements/accuracy.txt` (or "
                        "`pip install \"vllm-trianglemix[accuracy]\"`)") from None


@contextlib.contextmanager
def _without_nltk_downloads():
    """lm-eval's RULER module asks nltk to fetch its sentence splitter (punkt_tab) from GitHub
    when it is imported; only the essay haystacks split sentences, so the tasks used here never
    need it: the fetch is skipped and nothing leaves the machine."""
    import nltk

    def skipped(info_or_id=None, *args, **kwargs):
        logger.debug("RULER: nltk download of %s skipped (the offline tasks do not use it)", info_or_id)
        return False

    saved, nltk.download = nltk.download, skipped
    try:
        yield
    finally:
        nltk.download = saved


@contextlib.contextmanager
def _seeded(seed: int):
    """Python's and NumPy's global random generators seeded, their state restored after."""
    import numpy as np

    saved, np_saved = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)
        np.random.set_state(np_saved)


def load(tasks, length: int, tokenizer_dir: str, max_gen_toks: int | None = None,
         seed: int = 0) -> RulerSet:
    """Generate the samples of ``tasks`` at ``length`` tokens (lm-eval's own generators,
    seeded with ``seed``: the same samples every run); ``max_gen_toks`` caps each task's own
    generation length (as lm-eval's --gen_kwargs)."""
    check_installed()
    # Nothing from a hub: the tokenizer is a local folder, the generators need no data.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(metadata={"tokenizer": tokenizer_dir, "max_seq_lengths": [length]})
    try:
        with _without_nltk_downloads(), _seeded(seed):
            task_dict = manager.load(list(tasks))
    except pickle.PicklingError as e:
        why = _unfingerprintable(e)
        if why is None:
            raise
        raise ToolError(why) from None
    if max_gen_toks is not None:
        for task in task_dict["tasks"].values():
            own = task.get_config("generation_kwargs") or {}
            cap = min(max_gen_toks, own.get("max_gen_toks", max_gen_toks))
            task.set_config(key="generation_kwargs", value={"max_gen_toks": cap}, update=True)
    return RulerSet(length, tuple(tasks), task_dict)


def make_lm(base_url: str, model: str, tokenizer_dir: str, max_length: int,
            num_concurrent: int = 1, timeout: int = 600):
    """lm-eval's ``local-completions`` model on ``base_url`` (an OpenAI server)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        base_url=base_url.rstrip("/") + "/v1/completions", model=model,
        tokenizer_backend="huggingface", tokenizer=tokenizer_dir, tokenized_requests=True,
        max_length=max_length, num_concurrent=num_concurrent, max_retries=3, timeout=timeout,
    )


def evaluate(lm, ruler: RulerSet, limit: int | None) -> dict[str, dict]:
    """Score ``lm`` on ``ruler``'s tasks: {task: {"score": percent, "n": samples,
    "answers": [...]}}, from lm-eval's per-sample RULER scores."""
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    results = lm_eval_evaluate(lm=lm, task_dict=ruler.task_dict, limit=limit,
                               log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    out = {}
    for task in ruler.tasks:
        samples = results["samples"][task]
        scores, answers = [], []
        for sample in samples:
            key = str(sample["doc"]["max_length"])
            value = sample.get(key)
            if value is None:  # lm-eval keeps per-sample metrics under the metric name
                value = (sample.get("metrics") or {}).get(key)
            scores.append(float(value))
            resp = sample.get("filtered_resps") or sample.get("resps") or [""]
            while isinstance(resp, list) and resp:
                resp = resp[0]
            answers.append(resp if isinstance(resp, str) else str(resp))
        out[task] = {"score": 100.0 * sum(scores) / len(scores) if scores else None,
                     "n": len(scores), "scores": scores, "answers": answers,
                     "references": [list(s["doc"].get("outputs") or []) for s in samples]}
    return out
