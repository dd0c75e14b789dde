"""The run report: `report.md` (tables written from `results.json`) and PNG plots."""

from __future__ import annotations

from pathlib import Path

from factorllm.serialization import atomic_write_text


def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def report_markdown(results: dict) -> str:
    dense, configs = results["dense"], results["configs"]
    domains = list(dense["ppl"])
    tasks = list(dense["accuracy"])
    cloze = list(dense["cloze"])
    head = ["configuration", "FFN compute", *[f"ppl {d}" for d in domains], *[f"oracle ppl {d}" for d in domains],
            *[f"cloze {d}" for d in cloze], *tasks, "decode speed-up", "prefill speed-up"]
    lines = [f"# factorllm report: {results['model']}", "",
             "Held-out perplexity (lower is better) on CPython's documentation (`pydoc`, never trained on) and on "
             "held-out KJV books (`kjv`); cloze: last-word accuracy on held-out text; task columns: accuracy on "
             "the fixture tasks; speed-ups: whole-model wall clock against dense in the same process.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("dense", dense, None)] + [(f"{c['experts']} experts, top-{c['top_k']} ({c['partition']}, "
                                        f"{c['gating']})", c, c.get("oracle_ppl")) for c in configs]
    for name, r, oracle in rows:
        cells = [name, f"{r['ffn_compute_fraction']:.0%}", *[_fmt(r["ppl"][d]) for d in domains],
                 *[_fmt(None if oracle is None else oracle[d]) for d in domains],
                 *[_fmt(r["cloze"].get(d), 3) for d in cloze], *[_fmt(r["accuracy"].get(t), 3) for t in tasks],
                 f"{r['decode_speedup']:.2f}x", f"{r['prefill_speedup']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![quality against compute and speed](pareto.png)", "", "![expert load per layer](load.png)", ""]
    for c in configs:
        lines.append(f"Training for {c['name']}: {c['train_minutes']:.1f} min.")
    return "\n".join(lines) + "\n"


def write_report(results: dict, folder: str | Path) -> None:
    folder = Path(folder)
    atomic_write_text(folder / "report.md", report_markdown(results))
    plot_pareto(results, folder / "pareto.png")
    plot_load(results, folder / "load.png")


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("plots need matplotlib: pip install 'factorllm[eval]'") from err
    return plt


def plot_pareto(results: dict, path: Path) -> None:
    """Held-out perplexity against FFN compute and against measured decode speed-up; oracle dotted."""
    plt = _plt()
    dense, configs = results["dense"], results["configs"]
    domains = list(dense["ppl"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xkey, xlabel in ((axes[0], "ffn_compute_fraction", "FFN compute (share of dense)"),
                             (axes[1], "decode_speedup", "decode speed-up over dense (measured)")):
        for d, color in zip(domains, ("tab:blue", "tab:orange", "tab:green"), strict=False):
            points = sorted([(dense[xkey], dense["ppl"][d], dense["ppl"][d])] +
                            [(c[xkey], c["ppl"][d], c["oracle_ppl"][d]) for c in configs])  # joined left to right
            xs, trained, oracle = zip(*points, strict=True)
            ax.plot(xs, trained, "o-", color=color, label=f"{d} trained")
            ax.plot(xs, oracle, "o:", color=color, alpha=0.6, label=f"{d} oracle router")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out perplexity")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['model']}: quality against compute and speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load(results: dict, path: Path) -> None:
    """Heat map of each layer's expert load for every configuration."""
    plt = _plt()
    configs = [c for c in results["configs"] if c.get("routing")]
    fig, axes = plt.subplots(1, max(1, len(configs)), figsize=(5 * max(1, len(configs)), 5), squeeze=False)
    for ax, c in zip(axes[0], configs, strict=False):
        load = [r["load"] for r in c["routing"]]
        im = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set_title(f"top-{c['top_k']} of {c['experts']}: share of routed slots")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
