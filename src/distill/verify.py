"""Stage 2, verify: keep only right, clean, non-leaking traces.

    distill verify recipes/demo.yaml --out runs/demo
    distill verify --traces traces.jsonl --task humaneval --out verified/

The first form reads the run's `01_generate/traces.jsonl` and writes to `02_verify/`; the second works on
any `traces.jsonl` (see DESIGN.md; `completion` and a prompt are required: `prompt_id`, `task_id` or the
question as the last user turn of `messages`) against a task named `humaneval`, `reasoning_gym:<name>`
or a `.jsonl` / `.parquet` file. Both write `kept.jsonl`, `rejected.jsonl` and `report.json`.

Each trace goes through, in order, and is rejected with the first reason that applies:
unknown prompt → length limits → decontamination (an n-gram shared with an evaluation prompt) →
the verifier (truncated, unclosed `<think>`, no answer, wrong answer, tests failed, …) → exact and
near-duplicate removal among the prompt's kept completions → the per-prompt cap.

`kept.jsonl` loads as it is with `datasets.load_dataset("json", data_files=...)`; its `messages` column
is a TRL conversational example (the student's prompt, then the assistant's answer with its reasoning
in `<think>…</think>`), the teacher's own prompt moves to `teacher_messages`. `rejected.jsonl` keeps
each rejected trace with its `reason`; `report.json` counts kept traces and every rejection reason.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import DistillError, TaskConfig
from distill.rundir import atomic_write_json, atomic_write_jsonl, begin, stage_dir


@dataclass
class VerifyConfig:
    verifier: str = "auto"  # auto (the task's own) or a name in distill.verifiers.VERIFIERS
    require_tags: list[str] = field(default_factory=list)  # e.g. [think, answer]: tags every completion needs
    dedupe: bool = True  # drop exact and near-duplicate completions of the same prompt
    near_duplicate: float = 0.9  # MinHash Jaccard similarity at which two completions count as one
    decontaminate: bool = True  # drop traces whose prompt shares an n-gram with an evaluation prompt
    ngram: int = 8  # as s1 and open-r1 do
    # More evaluation sets to decontaminate against, beside the task's held-out split: task names as for
    # `--task` (humaneval, reasoning_gym:<name>, a .jsonl/.parquet file), every example of which counts.
    decontaminate_against: list[str] = field(default_factory=list)
    min_completion_tokens: int = 0  # completion tokens (usage.completion_tokens, else words)
    max_completion_tokens: int | None = None
    max_per_prompt: int | None = None  # kept traces per prompt, first come first kept
    workers: int = 4  # sandboxes at once for the code verifier

    def __post_init__(self):
        from distill.verifiers import VERIFIERS

        if self.verifier != "auto" and self.verifier not in VERIFIERS:
            raise DistillError(f"verify.verifier: unknown '{self.verifier}' (known: auto, {', '.join(VERIFIERS)})")
        if not 0 < self.near_duplicate <= 1:
            raise DistillError(f"verify.near_duplicate: must be in (0, 1], got {self.near_duplicate}")
        for name in ("ngram", "workers"):
            if getattr(self, name) < 1:
                raise DistillError(f"verify.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_per_prompt is not None and self.max_per_prompt < 1:
            raise DistillError(f"verify.max_per_prompt: must be >= 1 (or null for no cap), got {self.max_per_prompt}")
        if self.max_completion_tokens is not None and self.max_completion_tokens < self.min_completion_tokens:
            raise DistillError("verify.max_completion_tokens: below verify.min_completion_tokens")
        for tag in self.require_tags:
            if not re.fullmatch(r"[A-Za-z_][\w-]*", tag):
                raise DistillError(f"verify.require_tags: '{tag}' is not a tag name (e.g. think, answer)")


def verifier_name(cfg_verifier: str, task) -> str:
    return task.default_verifier if cfg_verifier == "auto" else cfg_verifier


def verify(cfg: VerifyConfig, task_cfg: TaskConfig, run_dir: Path, base_dir: Path | None = None) -> Path:
    """The recipe form: verify the run's traces; return the stage directory."""
    from distill.tasks import load_task, task_file

    out = stage_dir(run_dir, "verify")
    src = stage_dir(run_dir, "generate") / "traces.jsonl"
    if not src.is_file():
        raise DistillError(f"verify: {src} not found; run `distill generate` first")
    data_file = task_file(task_cfg, base_dir)
    stage = begin(out, {"verify": cfg, "task": task_cfg}, [src] + ([data_file] if data_file else []))
    if stage is None:
        return out
    _run(cfg, load_task(task_cfg, base_dir), src, stage, f"{src}")
    return out


def verify_file(cfg: VerifyConfig, traces: Path, task: str, out: Path, task_overrides: dict | None = None) -> Path:
    """The standalone form: verify any traces file against the task named `task`; return `out`."""
    from distill.tasks import task_from_spec

    traces = Path(traces)
    if not traces.is_file():
        raise DistillError(f"--traces {traces}: no such file")
    task_obj = task_from_spec(task, task_overrides)
    inputs = [traces] + ([Path(task)] if Path(task).is_file() else [])
    stage = begin(Path(out), {"verify": cfg, "task": {"spec": task, **(task_overrides or {})}}, inputs)
    if stage is None:
        return Path(out)
    _run(cfg, task_obj, traces, stage, f"--traces {traces}")
    return Path(out)


def _run(cfg: VerifyConfig, task, src: Path, stage, where: str) -> None:
    from distill.provenance import summarize

    started = time.perf_counter()
    records = _read(src, where)
    name = verifier_name(cfg.verifier, task)
    eval_prompts = [ex.question for ex in task.eval]
    for spec in cfg.decontaminate_against:
        eval_prompts += _questions(spec)
    kept, rejected = curate(cfg, task, records, name, eval_prompts)

    out = stage.start()
    atomic_write_jsonl(out / "kept.jsonl", kept)
    atomic_write_jsonl(out / "rejected.jsonl", rejected)
    total = len(records)
    report = {
        "task": task.name,
        "verifier": name,
        "traces": total,
        "kept": len(kept),
        "rejected": len(rejected),
        "pass_rate": round(len(kept) / total, 4) if total else 0.0,
        "prompts": len({r.get("prompt_id") for r in kept + rejected}),
        "prompts_with_kept": len({r["prompt_id"] for r in kept}),
        "rejection_reasons": dict(Counter(r["reason"] for r in rejected).most_common()),
        "eval_prompts_checked": len(eval_prompts) if cfg.decontaminate else 0,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(out / "report.json", report)
    stage.finish(None, summarize([r.get("teacher") for r in kept]), **report)
    print(f"verify: kept {len(kept)} of {total} traces ({report['prompts_with_kept']} prompts) -> {out}")


def _read(src: Path, where: str) -> list[dict]:
    records = []
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DistillError(f"{where} line {n}: not JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("completion"), str):
            raise DistillError(f"{where} line {n}: expected a trace object with a string 'completion'")
        if not isinstance(rec.get("messages", []), list):
            raise DistillError(f"{where} line {n}: 'messages' must be a list of chat turns")
        records.append(rec)
    return records


def _questions(spec: str) -> list[str]:
    from distill.tasks import task_from_spec

    task = task_from_spec(spec)
    return [ex.question for ex in task.train + task.eval + task.shots]


def curate(cfg: VerifyConfig, task, records: list[dict], verifier: str,
           eval_prompts: list[str]) -> tuple[list[dict], list[dict]]:
    """Split trace records into kept and rejected (each rejected one with its `reason`), in input order."""
    from distill.verifiers import CONCURRENT, check

    by_id = task.by_id()
    by_question = {ex.question: ex for ex in by_id.values()}
    leaks = NgramIndex(eval_prompts, cfg.ngram) if cfg.decontaminate else None
    leak_cache: dict[str, str | None] = {}
    verdicts: list[dict | None] = [None] * len(records)
    examples, todo = [None] * len(records), []
    for i, rec in enumerate(records):
        ex = by_id.get(str(rec.get("prompt_id"))) or by_id.get(str(rec.get("task_id"))) \
            or by_question.get(_question(rec))
        examples[i] = ex
        if ex is None:
            verdicts[i] = _rejection(verifier, "unknown prompt", "prompt not in this task (traces of another task?)")
            continue
        tokens = (rec.get("usage") or {}).get("completion_tokens") or len(rec["completion"].split())
        if tokens < cfg.min_completion_tokens:
            verdicts[i] = _rejection(verifier, "too short", f"{tokens} completion tokens")
            continue
        if cfg.max_completion_tokens is not None and tokens > cfg.max_completion_tokens:
            verdicts[i] = _rejection(verifier, "too long", f"{tokens} completion tokens")
            continue
        if leaks is not None:
            if ex.id not in leak_cache:
                leak_cache[ex.id] = leaks.find(ex.question)
            if leak_cache[ex.id]:
                verdicts[i] = _rejection(verifier, "contaminated", leak_cache[ex.id])
                continue
        todo.append(i)

    def run(i: int) -> dict:
        rec = records[i]
        return check(verifier, examples[i], rec["completion"], rec.get("finish_reason") or "stop",
                     rec.get("reasoning"), tuple(cfg.require_tags)).as_dict(verifier)

    if verifier in CONCURRENT and cfg.workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(cfg.workers) as pool:  # each run waits on its sandbox process
            for i, verdict in zip(todo, pool.map(run, todo), strict=True):
                verdicts[i] = verdict
    else:  # in this thread: math-verify's timeouts need the main thread
        for i in todo:
            verdicts[i] = run(i)

    kept, rejected = [], []
    dedupe = Deduper(cfg.near_duplicate)
    per_prompt: Counter = Counter()
    for rec, ex, verdict in zip(records, examples, verdicts, strict=True):
        if verdict["passed"] and cfg.dedupe:
            dup = dedupe.check(ex.id, rec["completion"])
            if dup:
                verdict = {**verdict, "passed": False, "reason": dup, "detail": f"{dup} of a kept completion"}
        if verdict["passed"] and cfg.max_per_prompt is not None and per_prompt[ex.id] >= cfg.max_per_prompt:
            verdict = {**verdict, "passed": False, "reason": "over per-prompt cap",
                       "detail": f"{cfg.max_per_prompt} already kept for this prompt"}
        if verdict["passed"]:
            per_prompt[ex.id] += 1
            if cfg.dedupe:
                dedupe.add(ex.id, rec["completion"])
            kept.append(kept_record(rec, ex, verdict))
        else:
            rejected.append({**rec, "prompt_id": ex.id if ex else rec.get("prompt_id"),
                             "reason": verdict["reason"] or "rejected", "verdict": verdict})
    return kept, rejected


def _rejection(verifier: str, reason: str, detail: str) -> dict:
    return {"verifier": verifier, "passed": False, "score": 0.0, "detail": detail, "reason": reason}


def _question(rec: dict) -> str | None:
    """The last user turn the teacher saw: the task's question."""
    for m in reversed(rec.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            return m.get("content") if isinstance(m.get("content"), str) else None
    return rec.get("prompt") if isinstance(rec.get("prompt"), str) else None


def kept_record(rec: dict, ex, verdict: dict) -> dict:
    """The trace with its verdict, `messages` in TRL's conversational form (the student's prompt, then the
    answer with its reasoning), and the teacher's prompt, few-shot turns included, in `teacher_messages`."""
    from distill.tasks import student_messages

    prompt = [dict(m) for m in ex.entry.get("prompt_messages") or student_messages(ex.question)]
    reasoning = rec.get("reasoning")
    answer = f"<think>\n{reasoning}\n</think>\n\n{rec['completion']}" if reasoning else rec["completion"]
    return {**rec, "prompt_id": ex.id, "messages": prompt + [{"role": "assistant", "content": answer}],
            "teacher_messages": rec.get("messages"), "verdict": verdict}


_WORDS = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


class NgramIndex:
    """Word n-grams of the evaluation prompts, to find training prompts that share one (decontamination
    as in s1 and open-r1: 8-grams by default). An n-gram found in more than a tenth of the evaluation
    prompts (and in at least two) is the task's template, not its content, and is ignored: otherwise
    every prompt of a templated task would share it. A prompt equal to an evaluation prompt (after
    normalization) is contaminated whatever its length."""

    def __init__(self, prompts: list[str], n: int):
        self.n = n
        self.exact = {" ".join(words(p)) for p in prompts}
        counts: Counter = Counter()
        for p in prompts:
            counts.update(set(self._grams(words(p))))
        limit = max(1, len(prompts) // 10)
        self.grams = {g for g, c in counts.items() if c <= limit}

    def _grams(self, toks: list[str]):
        return (" ".join(toks[i:i + self.n]) for i in range(len(toks) - self.n + 1))

    def find(self, prompt: str) -> str | None:
        """Why `prompt` leaks an evaluation prompt, or None."""
        toks = words(prompt)
        if " ".join(toks) in self.exact:
            return "equal to an evaluation prompt"
        for g in self._grams(toks):
            if g in self.grams:
                return f"shares the {self.n}-gram '{g}' with an evaluation prompt"
        return None


class Deduper:
    """Exact (normalized text) and near-duplicate (MinHash over word 3-grams, datasketch) completions of one
    prompt. Near duplicates are only looked for among the same prompt's completions: across prompts, a
    templated task's different answers would look alike. A MinHash is computed only once a prompt has a
    second candidate, and with crc32 as its base hash (a C call; datasketch's default sha1 costs more than
    everything else the stage does)."""

    def __init__(self, threshold: float, num_perm: int = 64):
        self.threshold, self.num_perm = threshold, num_perm
        self.exact: set[tuple[str, str]] = set()
        self.kept: dict[str, list] = {}  # prompt id -> [text, MinHash or None] of each kept completion
        self._proto = None

    def _minhash(self, norm: str):
        import zlib

        from datasketch import MinHash

        toks = norm.split()
        shingles = {" ".join(toks[i:i + 3]).encode() for i in range(max(1, len(toks) - 2))}
        if self._proto is None:  # the same permutations for every MinHash: built once, not per instance
            self._proto = MinHash(num_perm=self.num_perm, seed=1)
        scheme = {"scheme": self._proto.scheme} if hasattr(self._proto, "scheme") else {}  # datasketch >= 2
        m = MinHash(num_perm=self.num_perm, seed=1, hashfunc=zlib.crc32, permutations=self._proto.permutations,
                    **scheme)
        m.update_batch(list(shingles))
        return m

    def check(self, prompt_id: str, text: str) -> str | None:
        norm = " ".join(words(text))
        if (prompt_id, norm) in self.exact:
            return "duplicate"
        if self.threshold < 1 and self.kept.get(prompt_id):
            m = self._minhash(norm)
            for entry in self.kept[prompt_id]:
                if entry[1] is None:
                    entry[1] = self._minhash(entry[0])
                if m.jaccard(entry[1]) >= self.threshold:
                    return "near duplicate"
        return None

    def add(self, prompt_id: str, text: str) -> None:
        norm = " ".join(words(text))
        self.exact.add((prompt_id, norm))
        self.kept.setdefault(prompt_id, []).append([norm, None])


def config_from_overrides(items: list[str]) -> tuple[VerifyConfig, dict]:
    """`--set verify.x=…` / `--set task.x=…` of the standalone form → (VerifyConfig, TaskConfig fields)."""
    from distill.config import check_types, parse_overrides

    data: dict[str, dict] = {"verify": {}, "task": {}}
    for section, name, value in parse_overrides(items):
        if section not in data:
            raise DistillError(f"--set {section}.{name}: only verify.* and task.* apply to `verify --traces`")
        data[section][name] = value
    known = {f.name for f in dataclasses.fields(VerifyConfig)}
    for name in data["verify"]:
        if name not in known:
            raise DistillError(f"--set verify.{name}: unknown key (fields of verify: {', '.join(sorted(known))})")
    check_types(VerifyConfig, data["verify"], "verify")
    return VerifyConfig(**data["verify"]), data["task"]
