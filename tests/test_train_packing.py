"""Padding-free (packed) batches: the same loss and gradients as one example at a time, the token budget,
the batch order, and the guard against attention that ignores the packing.

    PYTHONPATH=src python -m pytest -q tests/test_train_packing.py
"""

import json

import pytest
import torch

import distill.train as tr
from conftest import trace, write_kept
from distill.config import DistillError
from distill.losses import LossSpec
from distill.train import Objective, TrainConfig, collate, encode, packed_order, train


def _student_and_samples(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.train()  # the tiny model has no dropout, so train mode is deterministic
    records = [trace("What is 40 + 2?", "42"), trace("Name a colour.", "Blue, as the sky on a clear day is."),
               trace("What is 7 * 6?", "Seven times six is forty-two.")]
    return model, tok, encode(records, tok, 256)


def _loss_and_grads(model, tok, samples, packed):
    objective = Objective.make(model, None, len(tok))
    model.zero_grad(set_to_none=True)
    loss = objective(LossSpec(), **collate(samples, tok.pad_token_id, len(tok), packed))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_batch_has_the_loss_and_gradients_of_its_examples_one_at_a_time(tiny_model):
    """The summed loss of one packed row = the sum of each example's loss alone (no attention across
    examples, no position predicting the next example's first token), and so are the gradients."""
    model, tok, samples = _student_and_samples(tiny_model)
    batch = collate(samples, tok.pad_token_id, len(tok), packed=True)
    assert batch["input_ids"].shape == (1, sum(map(len, samples))) and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [i for s in samples for i in range(len(s))]

    packed_loss, packed_grads = _loss_and_grads(model, tok, samples, packed=True)
    alone = [_loss_and_grads(model, tok, [s], packed=False) for s in samples]
    torch.testing.assert_close(packed_loss, sum(loss for loss, _ in alone), rtol=1e-5, atol=1e-5)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, sum(g[name] for _, g in alone), rtol=1e-4, atol=1e-5)  # fp32 sums
    # and the padded layout of the same batch agrees too (its own path, same objective)
    padded_loss, _ = _loss_and_grads(model, tok, samples, packed=False)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)


def test_a_leaky_packing_would_be_caught_by_this_comparison(tiny_model):
    """Control for the test above: with the position restarts removed (one long sequence), later examples
    see earlier ones and the loss is no longer the sum of the examples' own losses."""
    model, tok, samples = _student_and_samples(tiny_model)
    objective = Objective.make(model, None, len(tok))
    batch = collate(samples, tok.pad_token_id, len(tok), packed=True)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    with torch.no_grad():
        leaky = objective(LossSpec(), **batch)
        alone = sum(objective(LossSpec(), **collate([s], tok.pad_token_id, len(tok))) for s in samples)
    assert abs(float(leaky - alone)) > 1e-3
    assert tr._keeps_examples_apart(model, samples)


def test_attention_that_ignores_the_packing_falls_back_to_padded_batches(tiny_model, capsys):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    AttentionInterface.register("causal_only_for_test", causal_only)
    model, tok, samples = _student_and_samples(tiny_model)
    model.set_attn_implementation("causal_only_for_test")
    assert not tr._keeps_examples_apart(model, samples)
    assert "using padded batches" in capsys.readouterr().out


def test_packed_order_covers_every_example_once_balanced_or_within_the_budget():
    lengths = [((i * 37) % 200) + 20 for i in range(300)]
    by_count = packed_order(lengths, 4, None, seed=3, epoch=1)  # default: the padded path's number of batches
    assert sorted(i for b in by_count for i in b) == list(range(300)) and len(by_count) == 75
    tokens = [sum(lengths[i] for i in b) for b in by_count]
    assert max(tokens) - min(tokens) <= max(lengths)  # balanced: no batch a whole example above another
    budget = 4 * round(sum(lengths) / len(lengths))
    by_budget = packed_order(lengths, 4, budget, seed=3, epoch=1)
    assert sorted(i for b in by_budget for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= budget for b in by_budget)
    assert len(by_budget) <= 75 * 1.1  # best-fit decreasing leaves little room unused
    assert by_count == packed_order(lengths, 4, None, seed=3, epoch=1)
    assert by_count != packed_order(lengths, 4, None, seed=3, epoch=2)


def test_token_budget_below_max_length_is_refused():
    with pytest.raises(DistillError, match=r"train.max_tokens_per_batch: 100 is less than train.max_length \(256\)"):
        TrainConfig(max_tokens_per_batch=100)


def test_padding_free_sft_trains_in_fewer_padded_tokens_and_records_it(tiny_model, tmp_path):
    """Both layouts train; the padding-free run says so in meta.json and keeps the step count of the
    padded run (by default a padding-free batch holds batch_size examples on average)."""
    records = [trace(f"What is {i} + 1?", "The answer is " + "one more " * (i % 5) + str(i + 1), f"p{i}")
               for i in range(16)]
    meta = {}
    for packed in (True, False, None):
        run_dir = tmp_path / str(packed)
        write_kept(run_dir, records)
        train(TrainConfig(student=str(tiny_model), epochs=1, batch_size=4, eval_fraction=0.0, padding_free=packed),
              run_dir, str(tiny_model))
        meta[packed] = json.loads((run_dir / "03_train" / "meta.json").read_text())
    assert meta[True]["padding_free"] is True and meta[False]["padding_free"] is False
    assert meta[True]["steps"] == meta[False]["steps"] == 4
    # the default (auto) pads under sdpa, which has no variable-length kernel to make packing pay
    assert meta[None]["padding_free"] is False


def test_auto_packs_only_for_attention_with_a_variable_length_kernel():
    from types import SimpleNamespace

    def model(impl):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl))

    assert tr._varlen_attention(model("flash_attention_2")) and tr._varlen_attention(model("flash_attention_3"))
    assert tr._varlen_attention(model("kernels-community/flash-attn"))
    assert not any(tr._varlen_attention(model(x)) for x in ("sdpa", "eager", "flex_attention", None))


def test_an_attention_kernel_that_cannot_load_is_one_line_naming_the_field(tiny_model, tmp_path):
    write_kept(tmp_path, [trace("What is 1 + 1?", "2")])
    one_line = r"^train.attn_implementation: 'no_such_kernel' cannot be used here: [^\n]+$"
    with pytest.raises(DistillError, match=one_line):
        train(TrainConfig(student=str(tiny_model), epochs=1, eval_fraction=0.0, attn_implementation="no_such_kernel"),
              tmp_path, str(tiny_model))
    assert not (tmp_path / "03_train" / "student").exists()


def _flash_attention_2() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _flash_attention_2(), reason="needs a CUDA GPU and the flash-attn package")
def test_flash_attention_varlen_packing_matches_padded_batches_on_gpu(tiny_model):
    """The GPU path padding_free: auto takes: flash-attention's variable-length kernel keeps the packed
    examples apart, so a packed row's loss equals the padded batch's (bf16, the dtype flash-attention runs in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda()
    records = [trace("What is 40 + 2?", "42"), trace("Name a colour.", "Blue, as the sky on a clear day is.")]
    samples = encode(records, tok, 256)
    assert tr._varlen_attention(model) and tr._keeps_examples_apart(model, samples)
    objective = Objective.make(model, None, len(tok))
    with torch.no_grad():
        batches = [collate(samples, tok.pad_token_id, len(tok), packed) for packed in (True, False)]
        losses = [objective(LossSpec(), **{k: v.cuda() for k, v in b.items()}) for b in batches]
    torch.testing.assert_close(losses[0].float(), losses[1].float(), rtol=2e-2, atol=2e-2)


def test_gradient_checkpointing_keeps_the_packed_loss_and_gradients(tiny_model):
    """train.gradient_checkpointing recomputes activations in backward; with packed position_ids passed
    through the checkpointed layers the numbers must not change."""
    model, tok, samples = _student_and_samples(tiny_model)
    plain_loss, plain_grads = _loss_and_grads(model, tok, samples, packed=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ckpt_loss, ckpt_grads = _loss_and_grads(model, tok, samples, packed=True)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad)
