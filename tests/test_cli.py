"""The command line: help, and one clear line plus a non-zero exit for each kind of bad input, with
nothing already written lost."""

import hashlib

import pytest

from conftest import run_cli


def test_help_lists_every_stage():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("run", "generate", "verify", "train", "evaluate", "export"):
        assert cmd in res.stdout


def _one_error_line(res, message):
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr


def test_missing_recipe(tmp_path):
    _one_error_line(run_cli("run", tmp_path / "nope.yaml"), "nope.yaml: no such file")


@pytest.mark.parametrize("override, message", [
    ("generate.temprature=0.5", "--set generate.temprature: unknown key"),
    ("task.name=no_such_task", "task.name: unknown reasoning-gym task 'no_such_task'"),
    ("generate.teacher=./no/such/model", "generate.teacher: './no/such/model' does not resolve"),
    ("generate.teacher=SomeOrg/some-model", "generate.teacher: 'SomeOrg/some-model' looks like a hub id"),
])
def test_bad_input_is_one_line_and_keeps_earlier_work(tiny_recipe, tmp_path, override, message):
    run_dir = tmp_path / "run"
    assert run_cli("generate", tiny_recipe, "--out", run_dir).returncode == 0
    traces = run_dir / "01_generate" / "traces.jsonl"
    before = hashlib.sha256(traces.read_bytes()).hexdigest()
    extra = ["--set", "task.source=reasoning_gym"] if override.startswith("task.name") else []
    _one_error_line(run_cli("run", tiny_recipe, "--out", run_dir, "--set", override, *extra), message)
    assert hashlib.sha256(traces.read_bytes()).hexdigest() == before


def test_empty_prompt_file(tiny_recipe, prompts_file, tmp_path):
    prompts_file.write_text("\n")
    _one_error_line(run_cli("run", tiny_recipe, "--out", tmp_path / "run"), "sums.jsonl has no examples")
    assert not (tmp_path / "run").exists()


def test_malformed_prompt_file(tiny_recipe, prompts_file, tmp_path):
    prompts_file.write_text('{"prompt": "What is 1 + 1?"}\n')
    _one_error_line(run_cli("generate", tiny_recipe, "--out", tmp_path / "run"),
                    "sums.jsonl line 1: expected an object with 'prompt' and 'answer'")
