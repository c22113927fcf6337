"""The tables and the plot of ``vllm-trianglemix eval`` (from its results.json)."""

from __future__ import annotations


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _samples(report: dict) -> str:
    """'8 samples per task and length; dynamic-only, triangle+dynamic: the first 2'."""
    fewer = [c for c, r in report["configs"].items() if r.get("limit", report["limit"]) < report["limit"]]
    text = f"{report['limit']} samples per task and length"
    if fewer:
        n = min(report["configs"][c]["limit"] for c in fewer)
        text += f"; {', '.join(fewer)}: the first {n}"
    return text


def markdown(report: dict) -> str:
    configs = list(report["configs"])
    res = report["configs"]
    scored = [c for c in configs if res[c]["ruler"]]  # triangle-full: log-likelihoods only
    lines = [f"Model {report['model']}, vLLM {report.get('vllm') or '?'}, {report['machine']}, "
             f"{report['date']}; {_samples(report)}.", ""]
    lines += ["RULER score (lm-eval, percent):", "",
              "| task | length | " + " | ".join(scored) + " |",
              "|---|---:|" + "---:|" * len(scored)]
    for task in report["tasks"]:
        for length in report["lengths"]:
            cells = [_f(res[c]["ruler"].get(task, {}).get(str(length), {}).get("score"), ".1f")
                     for c in scored]
            lines.append(f"| {task} | {length} | " + " | ".join(cells) + " |")
    means = []
    for c in scored:
        vals = [s["score"] for by_len in res[c]["ruler"].values() for s in by_len.values()]
        means.append(_f(sum(vals) / len(vals) if vals else None, ".1f"))
    lines.append("| mean | | " + " | ".join(means) + " |")
    with_ll = [c for c in configs if "loglik" in res[c]]
    if with_ll:
        ll = report["loglik"]
        lines += ["", f"Log-likelihood agreement with dense on natural text ({ll['docs']} x "
                      f"{ll['length']} tokens of {ll['text']}); KL(dense || configuration) over "
                      f"dense's top-{ll['top_k']} + rest, nats. End: the last {ll['tail']} "
                      "positions of each window (dense rows, read after the long beginning); "
                      "all: every position.", "",
                  "| configuration | top-1 agreement, end | mean KL, end | max KL, end | "
                  "perplexity, end (dense) | top-1 agreement, all | mean KL, all |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for c in with_ll:
            x = res[c]["loglik"]
            a = x["all_positions"]
            lines.append(f"| {c} | {_f(x['top1_agreement'], '.4f')} | {_f(x['kl'], '.3g')} | "
                         f"{_f(x['max_kl'], '.3g')} | {_f(x['ppl'], '.3f')} "
                         f"({_f(x['ppl_dense'], '.3f')}) | {_f(a['top1_agreement'], '.4f')} | "
                         f"{_f(a['kl'], '.3g')} |")
    dens = [(c, res[c]["density"]) for c in configs if res[c].get("density")]
    if dens:
        lines += ["", "Dynamic layers: key blocks XAttention kept (mean over layers; min-max):", "",
                  "| configuration | " + " | ".join(map(str, report["lengths"])) + " |",
                  "|---|" + "---:|" * len(report["lengths"])]
        for c, by_len in dens:
            cells = []
            for length in report["lengths"]:
                d = by_len.get(str(length)) or {}
                cells.append(f"{100 * sum(d.values()) / len(d):.1f}% "
                             f"({100 * min(d.values()):.0f}-{100 * max(d.values()):.0f}%)"
                             if d else "-")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    times = " ".join(f"{c} {res[c]['seconds'].get('total', 0):.0f} s;" for c in configs)
    lines += ["", f"Time: {report['seconds']['total']:.0f} s in all (sample generation "
                  f"{report['seconds']['sample_generation']:.0f} s; per configuration, server "
                  f"start excluded: {times.rstrip(';')})."]
    if report.get("checks"):
        lines += ["", "Checks:"]
        lines += [f"- {'PASS' if c['passed'] else 'FAIL'}: {c['check']}: {c['detail']}"
                  for c in report["checks"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> bool:
    """Score vs length, one panel per task, one line per configuration (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks, lengths = report["tasks"], report["lengths"]
    n = len(tasks) + (1 if any("loglik" in r for r in report["configs"].values()) else 0)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    styles = {"dense": ("black", "o", "-"), "triangle": ("tab:blue", "s", "-"),
              "triangle-bad": ("tab:red", "x", "--"), "dynamic-only": ("tab:green", "^", ":"),
              "triangle+dynamic": ("tab:purple", "d", "-."), "triangle-full": ("tab:gray", "v", ":")}
    for i, task in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        for config, res in report["configs"].items():
            if not res["ruler"]:
                continue
            ys = [res["ruler"].get(task, {}).get(str(L), {}).get("score") for L in lengths]
            color, marker, line = styles.get(config, (None, "o", "-"))
            ax.plot(lengths, ys, marker=marker, linestyle=line, color=color, label=config)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths])
        ax.set_ylim(-3, 103)
        ax.set_title(task)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("score (%)")
        ax.grid(alpha=0.3)
    if n > len(tasks):
        ax = axes[len(tasks) // cols][len(tasks) % cols]
        for config, res in report["configs"].items():
            if "loglik" not in res:
                continue
            by_pos = res["loglik"]["by_position"]
            color, marker, line = styles.get(config, (None, "o", "-"))
            ax.plot([b["from"] for b in by_pos], [b["kl"] for b in by_pos], marker=marker,
                    linestyle=line, color=color, label=config)
        ax.set_yscale("log")
        ax.legend(fontsize=7)  # its configurations may include a log-likelihood-only one
        ax.set_title("KL vs dense on text, by position")
        ax.set_xlabel("position (tokens)")
        ax.set_ylabel("mean KL (nats)")
        ax.grid(alpha=0.3)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=8)
    samples = _samples(report).replace(" per task and length", " per point")
    fig.suptitle(f"{report['model']}: accuracy vs dense, {samples}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
