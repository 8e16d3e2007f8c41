import pytest
import yaml

from distill.config import DistillError, load_recipe, parse_overrides


def _recipe(tmp_path, data) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_defaults_then_yaml_then_set(tmp_path):
    path = _recipe(tmp_path, {"generate": {"temperature": 0.3, "max_tokens": 20}})
    r = load_recipe(path, ["generate.max_tokens=99"])
    assert r.generate.temperature == 0.3  # recipe beats default
    assert r.generate.max_tokens == 99  # --set beats recipe
    assert r.generate.samples_per_prompt == 4  # default
    assert r.name == "r"  # name defaults to the file stem


def test_set_values_are_yaml(tmp_path):
    r = load_recipe(_recipe(tmp_path, {}), ["train.keep_layers=[0, 2]", "generate.system=be brief"])
    assert r.train.keep_layers == [0, 2]
    assert r.generate.system == "be brief"


@pytest.mark.parametrize("override, message", [
    ("generate.nope=1", "--set generate.nope: unknown key"),
    ("nope.x=1", "--set nope.x: unknown section"),
    ("generate", "--set generate: expected stage.field=value"),
    ("generate.max_tokens=abc", "generate.max_tokens: expected int, got 'abc'"),
    ("generate.max_tokens=0", "generate.max_tokens: must be >= 1"),
    ("task.source=csv", "task.source: 'csv' is not one of"),
    ("train.method=dpo", "train.method: 'dpo' is not supported"),
    ("export.quantize=[q3_weird]", "export.quantize: unknown type 'q3_weird'"),
])
def test_bad_overrides_name_the_flag_or_field(tmp_path, override, message):
    with pytest.raises(DistillError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_recipe(_recipe(tmp_path, {}), [override])


def test_bad_recipe_files(tmp_path):
    with pytest.raises(DistillError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(DistillError, match="unknown section 'genrate'"):
        load_recipe(_recipe(tmp_path, {"genrate": {}}))
    with pytest.raises(DistillError, match=r"unknown field 'verify.strict'"):
        load_recipe(_recipe(tmp_path, {"verify": {"strict": True}}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed")
    with pytest.raises(DistillError, match="not valid YAML"):
        load_recipe(bad)


def test_float_fields_accept_ints_but_not_bools(tmp_path):
    assert load_recipe(_recipe(tmp_path, {"generate": {"temperature": 1}})).generate.temperature == 1
    with pytest.raises(DistillError, match="generate.max_tokens: expected int"):
        load_recipe(_recipe(tmp_path, {"generate": {"max_tokens": True}}))


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "a.c=x y"]) == [("a", "b", 1), ("a", "c", "x y")]


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads `3e-3` as a string; a float field takes it as the number it means.
    r = load_recipe(_recipe(tmp_path, {"train": {"learning_rate": "1e-4"}}), ["generate.temperature=5e-1"])
    assert r.train.learning_rate == 1e-4 and r.generate.temperature == 0.5
