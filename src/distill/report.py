"""The evaluation report: `report.html` (self-contained, opens offline), `report.md` and `plots/*.png`.

    python -c "from distill.report import write_report; write_report('runs/demo/04_evaluate', 'runs/demo')"

Built from `results.json`, `samples.jsonl` and, when there is one, the train stage's `metrics.jsonl`.
Each PNG carries its axis labels in its text metadata (`xlabel`, `ylabel`), so tests and tools can
check a plot without reading pixels.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from distill.rundir import atomic_write_text, read_jsonl, read_meta, stage_dir

# Columns of the results table: (results.json key, header, format).
COLUMNS = [
    ("name", "model", "{}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("ci95_low", "95% CI low", "{:.1%}"),
    ("ci95_high", "95% CI high", "{:.1%}"),
    ("n", "prompts", "{}"),
    ("prompt_tokens_per_answer", "prompt tokens / answer", "{:.0f}"),
    ("completion_tokens_per_answer", "completion tokens / answer", "{:.1f}"),
    ("compute_per_answer", "compute / answer (params × tokens)", "{:.3g}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("latency_p50_s", "latency p50 (s)", "{:.3f}"),
    ("latency_p95_s", "latency p95 (s)", "{:.3f}"),
    ("seconds_per_1k_answers", "s per 1k answers (this machine)", "{:.0f}"),
    ("usd_per_1k_answers", "USD per 1k answers (API price)", "{:.4f}"),
    ("prefill_tokens_per_s", "prefill tokens/s", "{:.0f}"),
    ("decode_tokens_per_s", "decode tokens/s", "{:.0f}"),
    ("peak_rss_bytes", "peak RSS (bytes)", "{:,}"),
    ("truncation_rate", "truncated", "{:.1%}"),
    ("params", "parameters", "{:,}"),
    ("size_bytes", "file size (bytes)", "{:,}"),
]


def write_report(out: Path, run_dir: Path) -> dict[str, Path]:
    """Write plots, report.html and report.md into `out` (the evaluate stage directory)."""
    out = Path(out)
    data = json.loads((out / "results.json").read_text())
    samples = read_jsonl(out / "samples.jsonl")
    metrics_path = stage_dir(run_dir, "train") / "metrics.jsonl"
    metrics = read_jsonl(metrics_path) if metrics_path.is_file() else []
    plots = _plots(data["models"], samples, metrics, out / "plots")
    atomic_write_text(out / "report.html", _html(data, plots))
    atomic_write_text(out / "report.md", _markdown(data, plots))
    return plots


def _plots(models: list[dict], samples: list[dict], metrics: list[dict], folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = [m["name"] for m in models]
    acc = [m["accuracy"] for m in models]
    err = [[m["accuracy"] - m["ci95_low"] for m in models], [m["ci95_high"] - m["accuracy"] for m in models]]
    plots = {}

    def save(fig, ax, name: str) -> None:
        path = folder / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110, metadata={"Title": name, "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel()})
        plt.close(fig)
        plots[name] = path

    # Quality against cost, one point per model with its interval: against the hardware-independent
    # compute per answer (left; servers have none) and against time on this machine (right).
    fig, (ax, ax_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    by_compute = all(m.get("compute_per_answer") for m in models)
    for i, m in enumerate(models):
        yerr = [[err[0][i]], [err[1][i]]]
        x = m["compute_per_answer"] if by_compute else m["seconds_per_1k_answers"]
        ax.errorbar([x], [m["accuracy"]], yerr=yerr, fmt="o", capsize=4, label=m["name"])
        ax_time.errorbar([m["seconds_per_1k_answers"]], [m["accuracy"]], yerr=yerr, fmt="o", capsize=4)
    for a in (ax, ax_time):
        a.set_xscale("log")
        a.margins(x=0.2)
    ax.set_xlabel("compute per answer (parameters × tokens)" if by_compute else "seconds per 1,000 answers")
    ax_time.set_xlabel("seconds per 1,000 answers (this machine)")
    ax.set_ylabel("accuracy on held-out prompts")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    save(fig, ax, "quality_vs_cost")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, acc, yerr=err, capsize=6, color="#4c72b0")
    ax.set_xlabel("model")
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.set_ylim(0, 1)
    save(fig, ax, "accuracy")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.boxplot([[s["latency_s"] for s in samples if s["model"] == n] for n in names], tick_labels=names)
    ax.set_xlabel("model")
    ax.set_ylabel("latency per answer (s)")
    save(fig, ax, "latency")

    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if losses:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*losses, strict=True), marker=".")
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss")
        save(fig, ax, "training")
    return plots


def headline(data: dict) -> str | None:
    """The distillation story in one sentence, from `results.json`'s `distillation` summary: how much of the
    teacher's accuracy the student keeps, at what fraction of its compute, and what the shipped file costs."""
    d = data.get("distillation")
    if not d:
        return None
    rows = {r["name"]: r for r in data["models"]}
    teacher, s = rows["teacher"], d["students"]
    main = "student" if "student" in s else next(iter(s))

    def frac(x):
        return "?" if x is None else f"1/{1 / x:.0f}" if x < 0.5 else f"{x:.2f}×"

    def pct(x):
        return "–" if x is None else f"{x:.0%}"  # the teacher scored 0: there is no fraction to keep

    text = (f"The student keeps {pct(s[main]['accuracy_kept'])} of the teacher's accuracy "
            f"({pct(rows[main]['accuracy'])} against {pct(teacher['accuracy'])}, n={teacher['n']}) with "
            f"{frac(s[main]['params_ratio'])} of its parameters, at {frac(s[main]['compute_ratio'])} of its "
            "compute per answer")
    if (ship := d.get("shipped")) is not None:
        f = rows[ship]
        text += (f"; the shipped file {ship} ({f['size_bytes'] / 1e6:.0f} MB, {frac(s[ship]['size_ratio'])} of the "
                 f"teacher's size) scores {pct(f['accuracy'])} ({pct(s[ship]['accuracy_kept'])} of the teacher) and "
                 f"answers in {f['latency_p50_s'] * 1000:.0f} ms at the median (teacher "
                 f"{teacher['latency_p50_s'] * 1000:.0f} ms)")
    if d.get("untrained_accuracy") is not None:
        text += f". Before training the student scored {pct(d['untrained_accuracy'])}"
    return text + "."


def _cell(model: dict, key: str, fmt: str) -> str:
    value = model.get(key)
    return "–" if value is None else fmt.format(value)


def _paired_lines(data: dict) -> list[str]:
    p = data.get("paired")
    if not p:
        return []
    a, b = p["models"]
    return [f"Paired on the same prompts: both right {p['both_right']}, both wrong {p['both_wrong']}, "
            f"only {a} right {len(p[f'only_{a}'])}, only {b} right {len(p[f'only_{b}'])}."]


def results_markdown(data: dict) -> str:
    """The results table and the paired comparison as Markdown (for report.md and model cards)."""
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    rows = ["| " + " | ".join(_cell(m, k, f) for k, _, f in COLUMNS) + " |" for m in data["models"]]
    return "\n".join([head, rule, *rows, "", *_paired_lines(data)])


def _markdown(data: dict, plots: dict[str, Path]) -> str:
    images = [f"![{name}](plots/{path.name})" for name, path in plots.items()]
    top = [f"**{line}**", ""] if (line := headline(data)) else []
    return "\n".join([f"# Evaluation: {data['task']}", "", *top, f"Verifier: `{data['verifier']}`.", "",
                      results_markdown(data), "", *images, ""])


def student_card(run_dir: Path, data: dict) -> str:
    """The student's model card once it has been evaluated: lineage, task, data counts and results."""
    from distill.provenance import model_card

    gen, ver, train = (read_meta(stage_dir(run_dir, s)) for s in ("generate", "verify", "train"))
    body = (f"\n## Task\n\n`{data['task']}`, scored by the `{data['verifier']}` verifier on held-out prompts that "
            f"training never saw.\n\n## Data\n\n- Teacher traces generated: {gen.get('records')} for "
            f"{gen.get('prompts')} training prompts.\n- Kept by the verifier: {ver.get('kept')} "
            f"({ver.get('prompts_with_kept')} prompts).\n- Trained on: {train.get('traces')} traces, "
            f"{train.get('steps')} steps.\n\n## Results\n\n{results_markdown(data)}\n")
    return model_card(f"{Path(run_dir).resolve().name}-student", train.get("provenance") or {},
                      base_model=train.get("base_model"), extra=body)


def _html(data: dict, plots: dict[str, Path]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{esc(_cell(m, k, f))}</td>" for k, _, f in COLUMNS) + "</tr>"
                   for m in data["models"])
    images = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{esc(name)}</figcaption></figure>'
        for name, path in plots.items())
    paired = "".join(f"<p>{esc(line)}</p>" for line in _paired_lines(data))
    top = f'<p class="headline">{esc(line)}</p>' if (line := headline(data)) else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>distill evaluation: {esc(data['task'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 1rem; }}
img {{ max-width: 560px; }}
.headline {{ font-size: 1.15rem; font-weight: 600; max-width: 60rem; }}
</style></head>
<body>
<h1>Evaluation: {esc(data['task'])}</h1>
{top}
<p>Held-out prompts never seen in training; verifier <code>{esc(data['verifier'])}</code>.</p>
<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
{paired}
{images}
</body></html>
"""
