"""Parity of an exported GGUF with the Hugging Face model it came from: does llama.cpp compute the same thing?

    python -m distill.parity runs/demo/03_train/student runs/demo/05_export/student-f16.gguf

For each probe prompt the HF model writes its greedy continuation; both models are then run
teacher-forced on prompt + that continuation, so every position lines up, and compared position by
position on the next-token distribution:

- `token_agreement`: fraction of positions where the GGUF's argmax is the HF model's greedy token;
- `mean_kl`: mean KL(p_hf ‖ p_gguf) in nats, over the same positions.

An f16 file should agree almost everywhere (f16 rounding only flips near-ties); a large gap there is a
conversion bug (wrong rope, tokenizer or tensor layout), while the loss of q8_0 / q4_k_m is what
quantization costs. The token ids are the HF tokenizer's, fed to both models, and `tokenizer_match`
says whether llama.cpp tokenizes the same prompt text to the same ids.
"""

from __future__ import annotations

import sys
from pathlib import Path

from distill.llama_load import load_llama
from distill.models import llama_threads


def reference(model_dir: Path, prompts: list[list[dict]], max_new_tokens: int = 32) -> list[dict]:
    """The HF model's greedy continuation of each chat and its next-token log-probabilities (float64)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                               trust_remote_code=False).eval()
    out = []
    for messages in prompts:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False).input_ids
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            row = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, temperature=None, top_p=None, top_k=None,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            cont = row[0, len(prompt):].tolist()
            # Teacher-forced pass over prompt + continuation: position t predicts token t+1.
            logits = net(row).logits[0, len(prompt) - 1 : len(prompt) + len(cont) - 1]  # (len(cont), V)
        out.append({"text": text, "prompt": prompt, "continuation": cont,
                    "logprobs": torch.log_softmax(logits.double(), dim=-1).numpy()})
    return out


def compare(gguf_path: Path, refs: list[dict]) -> dict:
    """Agreement and mean KL of `gguf_path` against `reference(...)` rows, through llama.cpp's logits."""
    import numpy as np

    n_ctx = max(len(r["prompt"]) + len(r["continuation"]) for r in refs) + 8
    llm = load_llama(gguf_path, n_ctx=n_ctx, logits_all=True, n_threads=llama_threads())
    agree = total = 0
    kls, tokenizer_match = [], True
    try:
        for r in refs:
            prompt, cont, ref = r["prompt"], r["continuation"], r["logprobs"]
            tokenizer_match &= llm.tokenize(r["text"].encode(), add_bos=False, special=True) == prompt
            llm.reset()
            llm.eval(prompt + cont)
            scores = llm.scores[len(prompt) - 1 : len(prompt) + len(cont) - 1].astype(np.float64)  # (T, V')
            vocab = min(scores.shape[1], ref.shape[1])  # an HF embedding may be padded past the real vocab
            q = scores[:, :vocab] - np.logaddexp.reduce(scores[:, :vocab], axis=1, keepdims=True)
            p = ref[:, :vocab]
            agree += int((q.argmax(axis=1) == np.asarray(cont)).sum())
            total += len(cont)
            kls.extend((np.exp(p) * (p - q)).sum(axis=1).tolist())
    finally:
        llm.close()
    return {"token_agreement": round(agree / total, 4) if total else None,
            "mean_kl": round(float(np.mean(kls)), 6) if kls else None,
            "positions": total, "tokenizer_match": bool(tokenizer_match)}


if __name__ == "__main__":
    from distill.tasks import student_messages

    model_dir, *files = sys.argv[1:]
    rows = reference(Path(model_dir), [student_messages(q) for q in ("What is 2 + 3?", "Name a colour.")])
    for f in files:
        print(f, compare(Path(f), rows))
