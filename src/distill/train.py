"""Stage 3, train: the student learns from the verified traces by SFT, logit distillation or on-policy.

    distill train recipes/demo.yaml --out runs/demo --set train.epochs=1
    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml $(which distill) train recipes/demo.yaml

Methods (`train.method`):
  - sft: cross-entropy on the completion only (R1-Distill style: SFT on verified traces).
  - kd: (1−α)·CE + α·T²·D(teacher ‖ student), D one of `losses.DIVERGENCES`; the teacher's distribution
    comes from the top-k logprobs `distill generate` cached (`logprobs_ref`), or from the teacher's
    weights run here (white-box, same process). Only for teacher and student with the same vocabulary.
  - on_policy: GKD (Agarwal et al. 2024): with probability λ a step's batches are sampled from the student
    itself and scored by the live teacher (divergence only: there is no reference answer); otherwise the
    kd loss on the traces.

The student sees the bare question (no few-shot demonstrations) rendered with its own chat template,
whose assistant turn ends with the tokenizer's EOS (`<|im_end|>` for SmolLM2), and the loss includes
that EOS, so the trained student stops by itself in transformers, llama.cpp and ollama alike.

Student: `student: teacher` copies the teacher, optionally keeping only `keep_layers` (depth pruning) and
`intermediate_size` MLP channels (width pruning), as Minitron does; or `student: <model reference>`.
`lora_r > 0` trains LoRA adapters (PEFT), saved in `adapter/` and merged into `student/`.

Why a loop of our own rather than TRL's SFTTrainer (see benchmarks/train_throughput.py): logits are
made only at completion positions and a chunk at a time (`losses.chunked_loss`), batches are grouped by
length so little is padding (or padding-free, several examples in one row with `position_ids` restarting
per example, where flash-attention's varlen kernel makes that pay; `collate`), and there is no per-step
metric pass over the logits. The loop is
plain PyTorch; accelerate supplies devices, DDP/FSDP/DeepSpeed and bf16 autocast.

Outputs in 03_train/: student/ (safetensors, tokenizer, provenance.json, model card), adapter/ (LoRA),
metrics.jsonl (one line per logged step: step, epoch, loss, lr, grad_norm, tokens_per_s; eval_loss),
tensorboard/, checkpoints/step-N/ while running (resumed automatically by a rerun with the same
config and inputs, or from `resume_from`), config.yaml, meta.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import DistillError
from distill.losses import DIVERGENCES, LossSpec
from distill.rundir import atomic_dir, atomic_write_json, atomic_write_jsonl, begin, read_jsonl, stage_dir

METHODS = ("sft", "kd", "on_policy")
_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    student: str = "teacher"  # "teacher" (a copy of generate.teacher) or a model reference
    keep_layers: list[int] | None = None  # decoder layers of the student's source to keep (None: all)
    intermediate_size: int | None = None  # width pruning: MLP channels to keep per layer (None: all)
    method: str = "sft"  # sft | kd | on_policy
    teacher: str | None = None  # kd/on_policy teacher weights (None: generate.teacher)
    teacher_logits: str = "auto"  # auto (cached when every trace has them, else live) | cached | live
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd | skew_kl | skew_rkl
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha goes to CE
    temperature: float = 1.0
    beta: float = 0.5  # generalized JSD's mixture weight, 0 < beta < 1
    skew: float = 0.1  # skew KL's mixture weight, 0 < skew < 1
    on_policy_fraction: float = 0.5  # GKD's lambda: share of steps trained on the student's own samples
    max_new_tokens: int = 64  # on_policy: tokens the student samples per prompt
    epochs: float = 3.0
    learning_rate: float = 5e-5
    batch_size: int = 8  # examples per micro-batch (padding-free: on average, see max_tokens_per_batch)
    grad_accum: int = 1
    max_length: int = 256  # tokens per example, prompt + completion
    # sft and kd from cached logits: true puts the examples of a micro-batch into one row, back to back, with
    # no padding (see `collate`); false: one right-padded row per example, batches grouped by length. None
    # (auto): padding-free where the attention has a variable-length kernel (flash-attention), which skips
    # both the padding and the cross-example pairs; padded elsewhere, since sdpa and eager attention compute
    # the whole packed row under a block-diagonal mask (on this CPU padded batches of ~135-token examples
    # trained 1.2x as fast, benchmarks/train_throughput.py). Live teachers always pad.
    padding_free: bool | None = None
    # padding-free micro-batches hold at most this many tokens (None: batch_size examples per batch on
    # average, as many batches as the padded path, each with about the same number of tokens)
    max_tokens_per_batch: int | None = None
    # recompute each decoder layer's activations in backward instead of keeping them: far less memory for
    # about a third more compute (TRL's SFTConfig turns it on by default)
    gradient_checkpointing: bool = False
    # transformers' attention kernel for the student (and a live teacher): None is its default (sdpa);
    # "flash_attention_2" needs a GPU and the flash-attn package, and turns padding-free batches on (auto)
    attn_implementation: str | None = None
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # None: use bf16 autocast where the hardware runs it natively
    lora_r: int = 0  # 0: train all weights; > 0: LoRA rank
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(_LINEAR))
    eval_fraction: float = 0.05  # share of prompts held out for eval loss (none with fewer than 20 prompts)
    eval_steps: int = 0  # evaluate every N steps (0: only at the end)
    save_steps: int = 0  # checkpoint every N steps (0: never)
    logging_steps: int = 10
    resume_from: str | None = None  # a checkpoint directory (03_train/checkpoints/step-N) to continue from
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise DistillError(f"train.method: '{self.method}' is not supported (one of {', '.join(METHODS)})")
        if self.loss not in DIVERGENCES:
            raise DistillError(f"train.loss: '{self.loss}' is not one of {', '.join(DIVERGENCES)}")
        if self.teacher_logits not in ("auto", "cached", "live"):
            raise DistillError(f"train.teacher_logits: '{self.teacher_logits}' is not one of auto, cached, live")
        for name in ("epochs", "learning_rate", "batch_size", "grad_accum", "max_length", "temperature",
                     "logging_steps", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise DistillError(f"train.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("alpha", "on_policy_fraction", "eval_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise DistillError(f"train.{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("beta", "skew"):
            if not 0 < getattr(self, name) < 1:
                raise DistillError(f"train.{name}: must be in (0, 1), got {getattr(self, name)}")
        for name in ("lora_r", "eval_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise DistillError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < self.max_length:
            raise DistillError(f"train.max_tokens_per_batch: {self.max_tokens_per_batch} is less than train.max_length "
                               f"({self.max_length}); a batch must hold the longest example")

    def spec(self) -> LossSpec:
        alpha = 0.0 if self.method == "sft" else self.alpha
        return LossSpec(alpha, self.temperature, self.loss, self.beta, self.skew)


def train(cfg: TrainConfig, run_dir: Path, teacher: str, accept_terms: list[str] = ()) -> Path:
    """Train the student on `02_verify/kept.jsonl`; return the stage directory (student in `student/`).

    Traces whose teacher's terms restrict training on outputs are refused unless their terms id is in
    `accept_terms` (the recipe's `provenance.accept_terms`)."""
    out = stage_dir(run_dir, "train")
    src = stage_dir(run_dir, "verify") / "kept.jsonl"
    if not src.is_file():
        raise DistillError(f"train: {src} not found; run `distill verify` first")
    records = read_jsonl(src)
    if not records:
        raise DistillError(f"train: {src} has no kept traces, nothing to train on (see rejected.jsonl)")

    from distill.models import resolve
    from distill.provenance import check_training

    accepted = check_training([r.get("teacher") for r in records], list(accept_terms), str(src))
    field_ = "generate.teacher" if cfg.student == "teacher" else "train.student"
    source = resolve(teacher if cfg.student == "teacher" else cfg.student, field_)
    if source.kind == "openai":
        raise DistillError(f"{field_}: '{source.ref}' is a server; a student needs local weights "
                           "(set train.student to a model directory, .gguf file or pkg:<package>)")
    mode = _teacher_mode(cfg, records)
    teacher_ref = None
    if mode != "none":
        t_field = "train.teacher" if cfg.teacher else "generate.teacher"
        teacher_ref = resolve(cfg.teacher or teacher, t_field)
        if teacher_ref.kind == "openai":
            raise DistillError(f"{t_field}: '{teacher_ref.ref}' is a server; logit distillation needs the teacher's "
                               "weights or tokenizer locally (set train.teacher to a local copy, or method: sft)")
    shards = sorted((stage_dir(run_dir, "generate") / "logprobs").glob("*.safetensors")) if mode == "cached" else []
    stage = begin(out, {"train": cfg, "teacher": teacher, "accept_terms": sorted(accept_terms)},
                  [src] + source.files + (teacher_ref.files if teacher_ref else []) + shards)
    if stage is None:
        return out
    stage.start()
    result = _Run(cfg, out, records, source, teacher_ref, mode, run_dir, stage.fingerprint).run()
    if result["main"]:
        from distill.provenance import summarize

        provenance = summarize([r.get("teacher") for r in records], accepted)
        _write_student(result, out, provenance, source.name, run_dir)
        stage.finish(cfg.seed, provenance, traces=len(records), base_model=source.name,
                     **{k: v for k, v in result.items() if k not in ("main", "model", "tokenizer", "adapter")})
        named = (("last step", "last_loss"), ("eval", "eval_loss"), ("mean over the run", "train_loss"))
        losses = [f"{name} {result[key]:.4f}" for name, key in named if result[key] is not None]
        print(f"train: {result['steps']} steps, loss: {', '.join(losses)} -> {out / 'student'}")
    return out


def _teacher_mode(cfg: TrainConfig, records: list[dict]) -> str:
    """'none' (sft), 'cached' (top-k logprobs from generate) or 'live' (teacher weights in this process)."""
    if cfg.method == "sft":
        return "none"
    cached = all(r.get("logprobs_ref") for r in records)
    if cfg.method == "on_policy" or cfg.teacher_logits == "live":
        return "live"
    if cfg.teacher_logits == "cached" and not cached:
        n = sum(not r.get("logprobs_ref") for r in records)
        raise DistillError(f"train.teacher_logits: cached, but {n} of {len(records)} kept traces have no logprobs_ref "
                           "(run generate with generate.logprobs: 20, or use teacher_logits: live)")
    return "cached" if cached else "live"


# ---------------------------------------------------------------------------------------------------
# Data: each trace → token ids of the student's prompt and completion (+ the teacher's view of them).


@dataclass
class Sample:
    prompt: list[int]  # the student's prompt, chat template applied, ending with the assistant header
    completion: list[int]  # the answer, the end-of-turn EOS and whatever the template puts after it
    teacher_prompt: list[int] | None = None  # live teacher: the chat the teacher saw, in its template
    topk: tuple | None = None  # cached teacher: (ids (T, k), logprobs (T, k)) for the first T completion tokens

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


def encode(records: list[dict], tokenizer, max_length: int, teacher_tokenizer=None, reader=None) -> list[Sample]:
    """Tokenize traces for training. The completion is what the chat template adds after the prompt with
    the assistant's message, so it ends with the template's end-of-turn token (the EOS)."""
    from distill.tasks import student_messages

    samples = []
    for rec in records:
        question = next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "user")
        prompt_msgs = student_messages(question)
        p_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt_msgs + [{"role": "assistant", "content": rec["completion"]}],
                                             tokenize=False)
        if not full.startswith(p_text):
            raise DistillError("train.student: the tokenizer's chat template does not render the prompt as a "
                               "prefix of the conversation; completion-only training needs it to")
        prompt = tokenizer(p_text, add_special_tokens=False).input_ids
        c_text = full[len(p_text):]
        completion = tokenizer(c_text, add_special_tokens=False).input_ids
        topk = None
        if reader is not None and rec.get("logprobs_ref"):
            completion, topk = _with_topk(rec, c_text, tokenizer, reader.read(rec["logprobs_ref"]), completion)
        keep = max_length - len(prompt)
        if keep <= 0:
            continue  # the prompt alone is too long: nothing of the answer would be learned
        completion = completion[:keep]
        if topk is not None:
            topk = (topk[0][:keep], topk[1][:keep])
        t_prompt = None
        if teacher_tokenizer is not None:
            # verify's kept.jsonl carries the teacher's own prompt (few-shot turns included) in
            # `teacher_messages` and the student's conversation, answer included, in `messages`.
            t_msgs = [m for m in (rec.get("teacher_messages") or rec["messages"])]
            while t_msgs and t_msgs[-1]["role"] == "assistant":
                t_msgs.pop()
            t_text = teacher_tokenizer.apply_chat_template(t_msgs, tokenize=False, add_generation_prompt=True)
            t_prompt = teacher_tokenizer(t_text, add_special_tokens=False).input_ids
        samples.append(Sample(prompt, completion, t_prompt, topk))
    return samples


def _with_topk(rec, c_text, tokenizer, topk, fallback):
    """The completion as the teacher's own sampled tokens (so the cached top-k rows line up with it) plus
    the template's suffix (EOS, newline); rows without a teacher distribution are left to CE."""
    ids = [int(t) for t in topk.token_ids]
    end = ids.pop() if ids and ids[-1] in tokenizer.all_special_ids else None  # the teacher's end token, if kept
    content = rec["completion"]
    if not c_text.startswith(content) or tokenizer.decode(ids) != content:
        return fallback, None  # the stored tokens are not this text (post-processed): CE only
    suffix = tokenizer(c_text[len(content):], add_special_tokens=False).input_ids
    # The end token's row teaches the student where to stop, when it is the token the template ends the turn
    # with; a different end token (e.g. <|endoftext|> for <|im_end|>) would pull the student towards it.
    n = len(ids) + (1 if end is not None and suffix and suffix[0] == end else 0)
    return ids + suffix, (topk.ids[:n], topk.logprobs[:n])


def split_eval(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole prompts (all samples of a prompt on one side), so eval loss is on unseen questions."""
    prompts = sorted({r["prompt_id"] for r in records})
    n = round(fraction * len(prompts)) if len(prompts) >= 20 else 0
    held = set(random.Random(seed).sample(prompts, n))
    return [r for r in records if r["prompt_id"] not in held], [r for r in records if r["prompt_id"] in held]


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches: shuffle, sort within groups of 32 batches by length (little padding), then
    shuffle the batches. Deterministic in (seed, epoch), which is what lets a resume continue the order."""
    rng, groups = _length_groups(lengths, batch_size, seed, epoch)
    batches = [chunk[k:k + batch_size] for chunk in groups for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _length_groups(lengths: list[int], batch_size: int, seed: int, epoch: int) -> tuple[random.Random, list[list[int]]]:
    """The shuffled examples in groups of 32 batches' worth, each group longest first, and the (seed, epoch)
    RNG that shuffled them, which then shuffles the batches made from them: batch_order and packed_order
    share both, so either is deterministic in (seed, epoch)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * 32
    return rng, [sorted(order[i:i + group], key=lambda j: lengths[j], reverse=True)
                 for i in range(0, len(order), group)]


def packed_order(lengths: list[int], batch_size: int, max_tokens: int | None, seed: int,
                 epoch: int) -> list[list[int]]:
    """One epoch's padding-free batches. Shuffle, then within groups of 32 batches' worth of examples:
    without `max_tokens`, deal the examples, longest first, each to the batch with the fewest tokens so far
    (longest-processing-time scheduling), into as many batches as the padded path makes, so the number of
    steps stays and every batch gets about the same number of tokens; with `max_tokens`, best-fit decreasing
    into batches of at most that many tokens. Then shuffle the batches. Deterministic in (seed, epoch),
    which is what lets a resume continue the order."""
    import heapq

    rng, groups = _length_groups(lengths, batch_size, seed, epoch)
    batches: list[list[int]] = []
    for longest_first in groups:
        if max_tokens is None:
            heap = [(0, k) for k in range(math.ceil(len(longest_first) / batch_size))]  # (tokens, batch)
            bins: list[list[int]] = [[] for _ in heap]
            for j in longest_first:
                tokens, k = heapq.heappop(heap)
                bins[k].append(j)
                heapq.heappush(heap, (tokens + lengths[j], k))
            batches += bins
            continue
        free: list[int] = []  # tokens left in each batch of this group; few batches, so a linear scan
        bins = []
        for j in longest_first:
            fits = [k for k, left in enumerate(free) if left >= lengths[j]]
            if fits:
                k = min(fits, key=lambda k: free[k])
                free[k] -= lengths[j]
                bins[k].append(j)
            else:
                free.append(max_tokens - lengths[j])
                bins.append([j])
        batches += bins
    rng.shuffle(batches)
    return batches


def collate(samples: list[Sample], pad_id: int, vocab: int, packed: bool = False):
    """Tensors for one micro-batch plus the (row, column) of every position whose next token is learned.

    Padded: one right-padded row per example and an attention mask. Packed (padding-free, as TRL's
    `padding_free=True` and transformers' `DataCollatorWithFlattening` do): all examples back to back in
    one row, no attention mask, and `position_ids` that restart at 0 for each example. Transformers reads
    the restarts as example boundaries (`masking_utils.find_packed_sequence_indices`): sdpa and eager
    attention get a block-diagonal causal mask, flash-attention its variable-length kernel. The last
    token of an example is never a learned position, so nothing predicts the next example's first token.
    """
    import torch

    rows, cols, labels, t_rows, t_cols = [], [], [], [], []
    if packed:
        seqs = [s.prompt + s.completion for s in samples]
        ids = torch.tensor([[t for seq in seqs for t in seq]])  # (1, N)
        batch = {"input_ids": ids, "position_ids": torch.cat([torch.arange(len(seq)) for seq in seqs])[None]}
        offset = 0
        for s, seq in zip(samples, seqs, strict=True):
            cols += range(offset + len(s.prompt) - 1, offset + len(seq) - 1)  # hidden state at t predicts t+1
            labels += s.completion
            offset += len(seq)
        rows = [0] * len(cols)
    else:
        width = max(map(len, samples))
        ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for b, s in enumerate(samples):
            seq = s.prompt + s.completion
            ids[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(seq)] = 1
            n = len(s.completion)
            rows += [b] * n
            cols += range(len(s.prompt) - 1, len(seq) - 1)  # hidden state at t predicts token t+1
            labels += s.completion
        batch = {"input_ids": ids, "attention_mask": mask}
    batch.update(rows=torch.tensor(rows), cols=torch.tensor(cols), labels=torch.tensor(labels))
    if samples[0].teacher_prompt is not None:
        if packed:
            raise ValueError("a live teacher's batches are padded (its prompts differ from the student's)")
        t_width = max(len(s.teacher_prompt) + len(s.completion) for s in samples)
        t_ids = torch.full((len(samples), t_width), pad_id, dtype=torch.long)
        t_mask = torch.zeros_like(t_ids)
        for b, s in enumerate(samples):
            seq = s.teacher_prompt + s.completion
            t_ids[b, :len(seq)] = torch.tensor(seq)
            t_mask[b, :len(seq)] = 1
            t_rows += [b] * len(s.completion)
            t_cols += range(len(s.teacher_prompt) - 1, len(seq) - 1)
        batch.update(t_input_ids=t_ids, t_attention_mask=t_mask, t_rows=torch.tensor(t_rows),
                     t_cols=torch.tensor(t_cols))
    elif any(s.topk is not None for s in samples):
        k = min(s.topk[0].shape[1] for s in samples if s.topk is not None)  # top-k is sorted: a prefix is a top-k
        has, top_ids, top_lp = [], [], []
        for s in samples:
            n, got = len(s.completion), 0 if s.topk is None else len(s.topk[0])
            ti = torch.zeros((n, k), dtype=torch.long)
            tl = torch.zeros((n, k), dtype=torch.float32)
            if got:
                # Ids past the student's vocabulary are padding rows of a larger embedding: no mass.
                raw = torch.from_numpy(s.topk[0][:, :k].astype("int64"))
                lp = torch.from_numpy(s.topk[1][:, :k].astype("float32"))
                ti[:got] = raw.clamp(max=vocab - 1)
                tl[:got] = lp.masked_fill(raw >= vocab, -1e4)
            has += [True] * got + [False] * (n - got)
            top_ids.append(ti)
            top_lp.append(tl)
        batch.update(topk_ids=torch.cat(top_ids), topk_logprobs=torch.cat(top_lp), has_teacher=torch.tensor(has))
    return batch


# ---------------------------------------------------------------------------------------------------
# Model side.


class Objective:
    """Builds the `torch.nn.Module` whose forward is the loss: the student (and a frozen teacher held
    outside the module's parameters, so DDP neither syncs nor checks it)."""

    @staticmethod
    def make(student, teacher, vocab: int):
        import torch

        class _Objective(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.student = student
                self.__dict__["teacher"] = teacher  # not a submodule on purpose

            def forward(self, spec, input_ids, rows, cols, labels, attention_mask=None, position_ids=None,
                        t_input_ids=None, t_attention_mask=None, t_rows=None, t_cols=None, topk_ids=None,
                        topk_logprobs=None, has_teacher=None):
                from distill.losses import Teacher, chunked_loss

                decoder = self.student.get_decoder()  # the model without its output layer: hidden states
                hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state  # (B, L, H); packed: (1, N, H)
                weight = _rows(self.student.get_output_embeddings().weight, vocab)  # (V, H)
                t = None
                if t_input_ids is not None:
                    with torch.no_grad():
                        th = self.teacher.get_decoder()(input_ids=t_input_ids, attention_mask=t_attention_mask,
                                                        use_cache=False).last_hidden_state
                        t = Teacher(hidden=th[t_rows, t_cols],
                                    weight=_rows(self.teacher.get_output_embeddings().weight, vocab))
                elif topk_ids is not None:
                    t = Teacher(topk_ids=topk_ids, topk_logprobs=topk_logprobs, has_teacher=has_teacher)
                return chunked_loss(hidden[rows, cols], weight, labels, spec, t)  # sum over tokens

        return _Objective()


def _rows(weight, vocab: int):
    """The first `vocab` rows; the matrix itself when that is all of it (a slice would cost a full-size
    zero gradient in backward)."""
    return weight if weight.shape[0] == vocab else weight[:vocab]


def check_vocab(student_tok, teacher_tok, student_vocab: int, teacher_vocab: int) -> int:
    """The vocabulary both models share, or a one-line error: logit distillation compares distributions
    token by token, so the tokens must be the same. Padded embeddings (e.g. Qwen2.5 0.5B's 151,936 rows
    vs 7B's 152,064 for the same 151,665 tokens) are aligned by cutting both to the shorter matrix."""
    a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
    if a != b:
        only = sorted(set(a.items()) ^ set(b.items()), key=lambda x: x[1])[:3]
        raise DistillError(f"train.method: teacher and student tokenizers differ ({len(b)} vs {len(a)} tokens; "
                           f"e.g. {only}); logit distillation needs the same vocabulary: use method: sft")
    vocab = min(student_vocab, teacher_vocab)
    if vocab < len(a):
        raise DistillError(f"train.student: embedding has {vocab} rows for {len(a)} tokens")
    return vocab


def _load_student(cfg: TrainConfig, source, records):
    from distill.models import load_hf, prune_layers, prune_width

    model, tokenizer = load_hf(source, "float32", cfg.attn_implementation)  # fp32 master weights; bf16 autocast
    n_layers = model.config.num_hidden_layers
    if cfg.keep_layers is not None:
        model = prune_layers(model, cfg.keep_layers)
    if cfg.intermediate_size is not None:
        calib = encode(records[:64], tokenizer, cfg.max_length)
        model = prune_width(model, cfg.intermediate_size, [s.prompt + s.completion for s in calib])
    model.train()
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and with the packed position_ids as keyword arguments.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    print(f"train: student from {source.name}: {model.config.num_hidden_layers} of {n_layers} layers, "
          f"{model.num_parameters() / 1e6:.1f}M parameters")
    if cfg.lora_r:
        import torch
        from peft import LoraConfig, get_peft_model

        linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        missing = [t for t in cfg.lora_target_modules if t not in linear]
        if missing or not cfg.lora_target_modules:
            raise DistillError(f"train.lora_target_modules: {missing or '[]'} not in the student (its linear "
                               f"modules: {', '.join(sorted(linear))})")
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout,
                                                 target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM"))
    return model, tokenizer


def model_signature(model) -> str:
    """What a checkpoint must match to be resumed into `model`: trainable tensors' names and shapes."""
    items = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _varlen_attention(model) -> bool:
    """Whether the student's attention has a variable-length kernel (FlashAttention 2/3, also through the
    kernels hub), for which one packed row costs what its examples cost apart: `padding_free: auto`."""
    return "flash" in str(model.config._attn_implementation)


def _keeps_examples_apart(model, samples: list[Sample]) -> bool:
    """Whether this student's attention honours packed `position_ids` (block-diagonal, no attention across
    examples): the hidden states of an example must be the same after another example in the same row as
    alone. Transformers' own attention functions do; a model or attention kernel that ignores the restarts
    would silently mix examples, so it gets padded batches instead (printed)."""
    import torch

    a, b = (samples * 2)[:2]
    first, second = a.prompt + a.completion, b.prompt + b.completion
    decoder = model.get_decoder()
    was_training = model.training
    model.eval()  # no dropout
    with torch.no_grad():
        device = next(model.parameters()).device
        alone = decoder(input_ids=torch.tensor([second], device=device), use_cache=False).last_hidden_state[0]
        pos = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
        both = decoder(input_ids=torch.tensor([first + second], device=device), position_ids=pos,
                       use_cache=False).last_hidden_state[0, len(first):]
    model.train(was_training)
    ok = torch.allclose(both.float(), alone.float(), atol=1e-3, rtol=1e-3)
    if not ok:
        print(f"train: attention '{model.config._attn_implementation}' lets packed examples see each other; "
              "using padded batches (set train.padding_free: false to skip this check)")
    return ok


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup, then cosine decay to 0 (the schedule of transformers' `get_cosine_schedule_with_warmup`).
    A function of the step, so a resumed run needs no scheduler state."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------------
# The loop.


class _Run:
    def __init__(self, cfg, out, records, source, teacher_ref, mode, run_dir, fingerprint):
        self.cfg, self.out, self.records, self.source = cfg, out, records, source
        self.teacher_ref, self.mode, self.run_dir, self.fingerprint = teacher_ref, mode, run_dir, fingerprint

    def run(self) -> dict:
        import torch
        from accelerate import Accelerator

        from distill.models import bf16_supported, inference_dtype, load_hf

        cfg = self.cfg
        use_bf16 = bf16_supported() if cfg.bf16 is None else cfg.bf16
        acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if use_bf16 else "no")
        torch.manual_seed(cfg.seed)
        train_recs, eval_recs = split_eval(self.records, cfg.eval_fraction, cfg.seed)
        model, tok = _load_student(cfg, self.source, train_recs)
        teacher = t_tok = reader = None
        vocab = model.get_output_embeddings().weight.shape[0]
        if self.mode != "none":
            from transformers import AutoTokenizer

            from distill.models import hf_dir

            t_tok = AutoTokenizer.from_pretrained(hf_dir(self.teacher_ref), trust_remote_code=False)
            t_vocab = None
            if self.mode == "live":
                teacher, t_tok = load_hf(self.teacher_ref, inference_dtype(), cfg.attn_implementation)
                teacher.requires_grad_(False)
                t_vocab = teacher.get_output_embeddings().weight.shape[0]
            vocab = check_vocab(tok, t_tok, vocab, t_vocab or vocab)
            if self.mode == "cached":
                from distill.logprobs import ShardReader

                reader = ShardReader(stage_dir(self.run_dir, "generate"))
        live_tok = t_tok if self.mode == "live" else None
        train_set = encode(train_recs, tok, cfg.max_length, live_tok, reader)
        eval_set = encode(eval_recs, tok, cfg.max_length, live_tok, reader)
        if not train_set:
            raise DistillError(f"train.max_length: {cfg.max_length} tokens leaves no room for any answer")

        world, rank, per_step = acc.num_processes, acc.process_index, cfg.grad_accum * acc.num_processes
        lengths = [len(s) for s in train_set]
        # Padding-free needs one prompt per example for both models: not so for a live teacher (its own prompt).
        want = _varlen_attention(model) if cfg.padding_free is None else cfg.padding_free
        packed = want and self.mode in ("none", "cached") and _keeps_examples_apart(model, train_set)
        stream = []  # every micro-batch of the run, in order; rank r of step s takes its own slice
        for epoch in range(math.ceil(cfg.epochs)):
            batches = (packed_order(lengths, cfg.batch_size, cfg.max_tokens_per_batch, cfg.seed, epoch) if packed
                       else batch_order(lengths, cfg.batch_size, cfg.seed, epoch))
            stream += batches[: math.ceil(len(batches) * min(1.0, cfg.epochs - epoch))]
        total = max(1, len(stream) // per_step)
        warmup = int(cfg.warmup_ratio * total)

        signature = model_signature(model)
        start = self._resume(model, signature)
        params = [p for p in model.parameters() if p.requires_grad]
        # fused AdamW: what transformers' Trainer picks by default on torch >= 2.8, on CPU as on GPU.
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
        if start:
            _load_optimizer(opt, self._ckpt)
        objective, opt = acc.prepare(Objective.make(model, teacher, vocab), opt)
        if teacher is not None:
            teacher.to(acc.device)
        spec, on_policy_spec = cfg.spec(), LossSpec(1.0, cfg.temperature, cfg.loss, cfg.beta, cfg.skew)

        main = acc.is_main_process
        metrics_path = self.out / "metrics.jsonl"
        if main:
            old = read_jsonl(metrics_path) if start and metrics_path.is_file() else []
            kept = [m for m in old if m["step"] <= start]
            atomic_write_jsonl(metrics_path, kept)  # a resumed run continues the log from its checkpoint
        tb = _tensorboard(self.out / "tensorboard") if main else None
        if main:
            shape = f"≤{cfg.max_tokens_per_batch} tokens" if packed and cfg.max_tokens_per_batch else cfg.batch_size
            print(f"train: {cfg.method}, {len(train_set)} traces ({len(eval_set)} held out), {total} steps of "
                  f"{shape}×{cfg.grad_accum}×{world}, {'padding-free' if packed else 'padded'}, bf16 {use_bf16}"
                  + (f", resumed at step {start}" if start else ""))
        window, tokens_seen, t0, run_t0 = [], 0, time.perf_counter(), time.perf_counter()
        cpu_t0 = time.process_time()  # CPU seconds of this process (all threads): steadier than wall on a shared host
        losses_all, ev = [], None
        for step in range(start, total):
            lr = lr_at(step, total, warmup, cfg.learning_rate)
            for group in opt.param_groups:
                group["lr"] = lr
            micro = [[train_set[i] for i in stream[(step * per_step + rank * cfg.grad_accum + j) % len(stream)]]
                     for j in range(cfg.grad_accum)]
            draw = random.Random(cfg.seed * 7919 + step).random()  # per step, so a resume draws the same
            on_policy = cfg.method == "on_policy" and draw < cfg.on_policy_fraction
            if on_policy:
                micro = [self._sample(acc.unwrap_model(objective).student, tok, mb, step) for mb in micro]
            n_tok = sum(len(s.completion) for mb in micro for s in mb)
            step_loss = 0.0
            for j, mb in enumerate(micro):
                batch = {k: v.to(acc.device) for k, v in collate(mb, tok.pad_token_id, vocab, packed).items()}
                sync = nullcontext() if j == len(micro) - 1 else acc.no_sync(objective)
                with sync:
                    loss = objective(on_policy_spec if on_policy else spec, **batch) / n_tok
                    acc.backward(loss)
                step_loss += loss.item()
                tokens_seen += sum(len(s) for s in mb)
            grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            window.append(step_loss)
            losses_all.append(step_loss)
            done = step + 1
            if main and (done % cfg.logging_steps == 0 or done == total):
                elapsed = time.perf_counter() - t0
                row = {"step": done, "epoch": round(done * per_step / max(1, len(stream)) * cfg.epochs, 4),
                       "loss": sum(window) / len(window), "lr": lr,
                       "grad_norm": None if grad_norm is None else float(grad_norm),
                       "tokens_per_s": round(tokens_seen * world / elapsed, 1)}
                self._log(row, metrics_path, tb)
                print(f"train: step {done}/{total} loss {row['loss']:.4f} lr {lr:.2e} {row['tokens_per_s']} tok/s")
                window, tokens_seen, t0 = [], 0, time.perf_counter()
            if eval_set and ((cfg.eval_steps and done % cfg.eval_steps == 0) or done == total):
                ev = self._evaluate(objective, eval_set, spec, tok.pad_token_id, vocab, acc, packed)
                if main:
                    self._log({"step": done, "eval_loss": ev}, metrics_path, tb)
                    print(f"train: step {done} eval loss {ev:.4f}")
            if cfg.save_steps and done % cfg.save_steps == 0 and done < total:
                acc.wait_for_everyone()
                if main:
                    save_checkpoint(self.out / "checkpoints", done, acc.unwrap_model(objective).student, opt,
                                    signature, self.fingerprint, self.source.name)
        runtime, cpu = time.perf_counter() - run_t0, time.process_time() - cpu_t0
        acc.wait_for_everyone()
        if tb is not None:
            tb.close()
        student = acc.unwrap_model(objective).student
        train_loss = sum(losses_all) / len(losses_all) if losses_all else None
        return {"main": main, "model": student, "tokenizer": tok, "adapter": bool(cfg.lora_r),
                "method": cfg.method, "teacher_logits": self.mode, "steps": total, "resumed_from_step": start,
                "train_loss": train_loss, "last_loss": losses_all[-1] if losses_all else None, "eval_loss": ev,
                "train_runtime_s": round(runtime, 3), "train_cpu_s": round(cpu, 3),
                "world_size": world,
                "train_tokens": sum(lengths), "eval_traces": len(eval_set), "bf16": use_bf16, "padding_free": packed,
                "params": student.num_parameters(), "layers": student.config.num_hidden_layers}

    def _resume(self, model, signature: str) -> int:
        """The step to start at: a checkpoint named by `resume_from`, or the latest one a previous attempt
        of this very stage (same fingerprint) left; 0 otherwise."""
        self._ckpt = None
        if self.cfg.resume_from:
            path = Path(self.cfg.resume_from).expanduser()
            if not (path / "state.json").is_file():
                raise DistillError(f"train.resume_from: {path} is not a checkpoint (no state.json)")
        else:
            found = sorted((self.out / "checkpoints").glob("step-*/state.json"))
            if not found or json.loads(found[-1].read_text()).get("fingerprint") != self.fingerprint:
                shutil.rmtree(self.out / "checkpoints", ignore_errors=True)  # another config's leftovers
                return 0
            path = found[-1].parent
        state = json.loads((path / "state.json").read_text())
        if state["signature"] != signature:
            raise DistillError(f"train.resume_from: {path} is a checkpoint of another model ({state['base_model']}, "
                               f"signature {state['signature']}), not of this student (signature {signature})")
        from safetensors.torch import load_file

        weights = load_file(path / "model.safetensors")
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data.copy_(weights[name])
        self._ckpt = path
        return int(state["step"])

    def _sample(self, student, tok, samples: list[Sample], step: int) -> list[Sample]:
        """On-policy batch: the student answers the same prompts itself (temperature 1); the teacher scores
        these tokens in the loss."""
        import torch

        pad = tok.pad_token_id
        width = max(len(s.prompt) for s in samples)
        ids = torch.full((len(samples), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(samples):  # left padding for generation
            ids[b, width - len(s.prompt):] = torch.tensor(s.prompt)
            mask[b, width - len(s.prompt):] = 1
        device = next(student.parameters()).device
        torch.manual_seed(self.cfg.seed * 104_729 + step)  # the same samples after a resume
        student.eval()
        with torch.no_grad():
            out = student.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                   temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=self.cfg.max_new_tokens,
                                   pad_token_id=pad, eos_token_id=tok.eos_token_id)
        student.train()
        result = []
        for s, row in zip(samples, out[:, width:].tolist(), strict=True):
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            result.append(Sample(s.prompt, row or [tok.eos_token_id], s.teacher_prompt))
        return result

    def _evaluate(self, objective, eval_set, spec, pad_id, vocab, acc, packed: bool) -> float:
        import torch

        total, count = 0.0, 0
        objective.eval()
        with torch.no_grad():
            size = self.cfg.batch_size
            for i in range(acc.process_index * size, len(eval_set), size * acc.num_processes):
                mb = eval_set[i:i + size]
                batch = {k: v.to(acc.device) for k, v in collate(mb, pad_id, vocab, packed).items()}
                total += float(objective(spec, **batch))
                count += sum(len(s.completion) for s in mb)
        objective.train()
        sums = acc.reduce(torch.tensor([total, float(count)], device=acc.device), reduction="sum")
        return float(sums[0] / max(1.0, float(sums[1])))

    @staticmethod
    def _log(row: dict, path: Path, tb) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(f"train/{k}" if not k.startswith("eval") else f"eval/{k[5:]}", v, row["step"])


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency, but a trimmed install may lack it
        return None
    return SummaryWriter(str(folder))


# ---------------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors (never pickles), JSON for the rest.


def save_checkpoint(folder: Path, step: int, model, opt, signature: str, fingerprint: str, base_model: str) -> Path:
    """Trainable weights, optimizer state and the step, written whole under a temporary name."""
    import torch
    from safetensors.torch import save_file

    final = folder / f"step-{step:07d}"
    state = opt.state_dict()
    tensors, plain = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.contiguous()
            else:
                plain[f"{idx}.{key}"] = value
    with atomic_dir(final) as tmp:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "optimizer.json", {"param_groups": state["param_groups"], "plain": plain})
        atomic_write_json(tmp / "state.json", {"step": step, "signature": signature, "fingerprint": fingerprint,
                                               "base_model": base_model})
    for old in sorted(folder.glob("step-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_optimizer(opt, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(path / "optimizer.safetensors")
    extra = json.loads((path / "optimizer.json").read_text())
    state: dict = {}
    for key, value in list(tensors.items()) + list(extra["plain"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": extra["param_groups"]})


def _write_student(result: dict, out: Path, provenance: dict, base_model: str, run_dir: Path) -> None:
    """student/ (full model, merged when LoRA) and adapter/, each written under a temporary name first."""
    from distill.provenance import model_card

    model, tok = result["model"], result["tokenizer"]
    if result["adapter"]:
        with atomic_dir(out / "adapter") as tmp:
            model.save_pretrained(tmp)
        model = model.merge_and_unload()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    with atomic_dir(out / "student") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(f"{Path(run_dir).resolve().name}-student", provenance,
                                                  base_model=base_model))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
