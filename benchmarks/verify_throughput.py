"""Throughput of `distill verify` on 10,000 synthetic math traces, against a naive verifier loop.

    PYTHONPATH=src python benchmarks/verify_throughput.py [--traces 10000]

Builds a 2,500-prompt word-problem task (answers: integers, decimals, `\\frac{}`) and 4 traces per prompt
(right, wrong, right in another form such as 0.5 for \\frac{1}{2}, duplicated, truncated) and a 315-prompt
benchmark to decontaminate against (15 of them reworded training prompts), then runs the real command
line on it with the math verifier and every curation step on: decontamination, exact and near-duplicate
removal, length limits, per-prompt cap.

Baseline, measured in the same run on a sample of the same traces: the loop one writes first, math-verify's
`parse` on the whole completion and on the gold answer, then `verify`, for every trace. The stage is
faster because plain numbers are compared exactly without sympy, and each distinct answer is parsed once.
Last line: RESULT {"traces_per_s": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
ITEMS = ["apples", "marbles", "stamps", "books", "coins", "shells", "pencils", "cards"]


def make_task(n_prompts: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n_prompts):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(2, 99), rng.randint(2, 12)
        kind = i % 3
        # Short, with the varying numbers spread out: two different problems rarely share 8 words.
        if kind == 0:
            q = f"{name} packs {a} boxes of {b} {item}, then {i} more. How many {item}?"
            ans = str(a * b + i)
        elif kind == 1:
            q = f"{name} shares {a} {item} among {b} friends, game {i}. How many each?"
            ans = str(a // b) if a % b == 0 else f"\\frac{{{a}}}{{{b}}}"
        else:
            q = f"{name} walks {a} km in {b * 2} hours, trip {i}. Speed in km/h?"
            ans = f"{a / (b * 2):g}" if (a * 10) % (b * 2) == 0 else f"\\frac{{{a}}}{{{b * 2}}}"
        rows.append({"prompt": q, "answer": ans})
    return rows


def make_benchmark(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """An evaluation set of other problems, plus copies of a few training prompts with their question
    reworded: what decontamination must find."""
    out = [{"prompt": f"A train leaves at {h} o'clock and travels {h * 7 + k} miles at a steady pace of "
                      f"{k + 3} miles per hour until it stops. When does it arrive?", "answer": "0"}
           for h, k in zip(range(n), range(5, 5 + n), strict=True)]
    for row in rng.sample(rows, n // 20):
        out.append({"prompt": row["prompt"].rsplit(".", 1)[0] + ". Answer briefly.", "answer": row["answer"]})
    return out


def other_form(ans: str) -> str:
    """The same value written differently: \\frac{a}{b} as a/b or a decimal, 12 as 12.0."""
    if ans.startswith("\\frac"):
        a, b = ans[6:-1].split("}{")
        return f"{a}/{b}" if int(a) % 7 else f"{int(a) / int(b):.10g}"
    return f"{float(ans):.1f}"


def make_traces(rows: list[dict], per_prompt: int, rng: random.Random) -> list[dict]:
    from distill.tasks import make_id

    traces = []
    for row in rows:
        pid = make_id("task.jsonl", row["prompt"])
        for k in range(per_prompt):
            roll = rng.random()
            ans = row["answer"]
            if roll < 0.3:
                ans = str(rng.randint(1, 999))  # wrong
            elif roll < 0.5:
                ans = other_form(row["answer"])
            reasoning = " ".join(rng.choice(ITEMS + NAMES + ["so", "then", "we", "add", "divide"]) for _ in range(40))
            text = f"Let us work it out. {reasoning}. So the answer is \\boxed{{{ans}}}."
            if k == 3 and roll > 0.8:
                text = traces[-1]["completion"]  # a duplicate sample
            finish = "length" if roll > 0.97 else "stop"
            traces.append({"id": f"{pid}-{k}", "prompt_id": pid, "sample_index": k,
                           "messages": [{"role": "user", "content": row["prompt"]}], "completion": text,
                           "reasoning": None, "finish_reason": finish, "error": None,
                           "teacher": {"model": "synthetic", "backend": "none", "revision": "0", "licence": None,
                                       "terms": {"id": None, "training_on_outputs": "unknown"}},
                           "sampling": {"temperature": 0.7, "top_p": 1.0, "max_tokens": 256, "seed": k, "n": 4},
                           "usage": {"prompt_tokens": 30, "completion_tokens": len(text.split()), "cost": 0.0},
                           "latency_s": 0.0, "logprobs_ref": None})
    return traces


def naive_rate(traces: list[dict], answers: dict[str, str], n: int) -> tuple[float, float]:
    """Traces per second of the first loop one writes (math-verify on every completion and gold), and how
    often the stage's math verifier agrees with it on the same traces."""
    from math_verify import parse, verify

    from distill.tasks import Example
    from distill.verifiers import VERIFIERS

    sample = [t for t in traces[:n] if t["finish_reason"] == "stop"]
    start = time.perf_counter()
    naive = [verify(parse(f"${answers[t['prompt_id']]}$"), parse(t["completion"])) for t in sample]
    rate = len(sample) / (time.perf_counter() - start)
    ours = [VERIFIERS["math"](Example(t["prompt_id"], "", answers[t["prompt_id"]]), t["completion"]).passed
            for t in sample]
    return rate, sum(a == b for a, b in zip(naive, ours, strict=True)) / len(sample)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=10_000)
    ap.add_argument("--naive-sample", type=int, default=1_000)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from distill.tasks import make_id

    rng = random.Random(0)
    rows = make_task(args.traces // 4, rng)
    traces = make_traces(rows, 4, rng)
    answers = {make_id("task.jsonl", r["prompt"]): r["answer"] for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
        bench = make_benchmark(rows, 300, rng)
        (tmp / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench))
        exe = Path(sys.executable).with_name("distill")
        cmd = [str(exe), "verify", "--traces", str(tmp / "traces.jsonl"), "--task", str(tmp / "task.jsonl"),
               "--out", str(tmp / "out"), "--set", "verify.verifier=math",
               "--set", f"verify.decontaminate_against=[{tmp / 'bench.jsonl'}]",
               "--set", "verify.max_per_prompt=3", "--set", "verify.max_completion_tokens=200"]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        start = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if res.returncode:
            sys.exit(f"distill verify failed: {res.stderr}")
        report = json.loads((tmp / "out" / "report.json").read_text())
    naive, agree = naive_rate(traces, answers, args.naive_sample)
    rate = len(traces) / wall
    print(f"distill verify: {len(traces)} traces in {wall:.1f} s wall (process start included; the stage "
          f"itself {report['seconds']:.1f} s): {rate:.0f} traces/s")
    print(f"  kept {report['kept']}, rejected {report['rejection_reasons']}")
    print(f"naive loop (math-verify on every trace, {args.naive_sample} traces): {naive:.0f} traces/s; "
          f"the stage's math verifier agrees with it on {agree:.1%} of them")
    print(f"speed-up: {rate / naive:.1f}x")
    print("RESULT " + json.dumps({"traces": len(traces), "traces_per_s": round(rate, 1),
                                  "stage_traces_per_s": round(len(traces) / report["seconds"], 1),
                                  "wall_s": round(wall, 2), "naive_traces_per_s": round(naive, 1),
                                  "speedup": round(rate / naive, 2), "agreement_with_naive": round(agree, 4),
                                  "kept": report["kept"]}))


if __name__ == "__main__":
    main()
