"""The `distill` command: `run` for the whole pipeline, and one command per stage.

    distill --help
    distill run recipes/demo.yaml --out runs/demo --set generate.samples_per_prompt=2

Every command takes the same recipe file, `--out DIR` (default `runs/<recipe name>`) and repeatable
`--set stage.field=value` overrides. A `DistillError` is printed as one line and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from distill.config import DistillError, Recipe, load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill a big teacher model into a small offline student for one task.")
# Commands: run (every stage), one per stage (STAGES below), and provenance (lineage of a run or model).


def _generate(r: Recipe, run_dir: Path):
    from distill.generate import generate

    return generate(r.generate, r.task, run_dir, r.path.parent, r.provenance.terms)


def _verify(r: Recipe, run_dir: Path):
    from distill.verify import verify

    return verify(r.verify, r.task, run_dir, r.path.parent)


def _train(r: Recipe, run_dir: Path):
    from distill.train import train

    return train(r.train, run_dir, r.generate.teacher, r.provenance.accept_terms)


def _evaluate(r: Recipe, run_dir: Path):
    from distill.evaluate import evaluate

    return evaluate(r.evaluate, r.task, run_dir, r.generate, r.path.parent)


def _export(r: Recipe, run_dir: Path):
    from distill.export import export

    return export(r.export, r.task, run_dir, r.path.parent)


# The whole pipeline, in the order `run` takes it: one entry per stage, each a thin call into the stage's
# own module. export runs before evaluate so that evaluate can score the exported files (student-f16,
# student-q4_k_m) with llama.cpp; the directories keep their numbers (04_evaluate, 05_export).
STAGES = {"generate": _generate, "verify": _verify, "train": _train, "export": _export, "evaluate": _evaluate}

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file (see recipes/demo.yaml).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Run directory (default: runs/<recipe name>).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: stage.field=value.")]


def _console():
    from rich.console import Console

    # Piped output (logs, CI) would otherwise wrap the results table at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 120)


def _run_stage(name: str, r: Recipe, run_dir: Path) -> Path:
    try:
        return STAGES[name](r, run_dir)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted in {name}: finished records and stages are kept; run the same command "
                   "to resume", err=True)
        raise typer.Exit(130) from None


def _print_results(run_dir: Path) -> None:
    import json

    from distill.evaluate import results_table
    from distill.report import headline
    from distill.rundir import stage_dir

    path = stage_dir(run_dir, "evaluate") / "results.json"
    _console().print(results_table(path))
    if (line := headline(json.loads(path.read_text()))) is not None:
        _console().print(line)


def _load(recipe: Path, out: Optional[Path], overrides: Optional[list[str]]) -> tuple[Recipe, Path]:
    r = load_recipe(recipe, overrides or [])
    return r, out or Path("runs") / r.name


@app.command()
def run(recipe: RecipeArg, out: OutOpt = None, set_: SetOpt = None):
    """Run every stage in order: generate, verify, train, export, evaluate."""
    r, run_dir = _load(recipe, out, set_)
    for name in STAGES:
        _run_stage(name, r, run_dir)
    _print_results(run_dir)
    typer.echo(f"done: {run_dir}")


def _stage_command(name: str):
    def command(recipe: RecipeArg, out: OutOpt = None, set_: SetOpt = None):
        r, run_dir = _load(recipe, out, set_)
        typer.echo(str(_run_stage(name, r, run_dir)))
        if name == "evaluate":
            _print_results(run_dir)

    command.__doc__ = {
        "generate": "Sample the teacher on the task's training prompts into traces.jsonl.",
        "verify": "Keep the traces the task's verifier accepts (kept.jsonl, rejected.jsonl).",
        "train": "Train the student on the kept traces (method: sft, kd or on_policy).",
        "evaluate": "Score teacher and student on held-out prompts (results.json).",
        "export": "Convert the student to GGUF (f16, quantized) and load it back in llama.cpp.",
    }[name]
    return command


for _name in STAGES:
    if _name != "verify":  # verify also has a standalone form: its own command below
        app.command(_name)(_stage_command(_name))


@app.command()
def provenance(
    target: Annotated[Path, typer.Argument(help="A run directory, a student directory or a .gguf file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the lineage as JSON.")] = False,
):
    """Print the lineage: teachers, licences and terms, counts, dates, file hashes, training config."""
    import json

    from distill.provenance import lineage, print_lineage

    data = lineage(target)
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        print_lineage(data, _console())


@app.command("verify")
def verify_command(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML file (the recipe form).")] = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    traces: Annotated[Optional[Path], typer.Option("--traces", help="Any traces.jsonl (the standalone form).")] = None,
    task: Annotated[Optional[str], typer.Option(
        "--task", help="With --traces: humaneval, reasoning_gym:<name>, or a .jsonl/.parquet task file.")] = None,
):
    """Keep the traces the task's verifier accepts, deduplicated and decontaminated (kept.jsonl, rejected.jsonl,
    report.json). Either RECIPE [--out RUN] or --traces FILE --task NAME --out DIR."""
    standalone = traces is not None or task is not None
    if recipe is not None and standalone:
        raise DistillError("verify: give either a RECIPE or --traces FILE --task NAME, not both")
    if recipe is None and not standalone:
        raise DistillError("verify: give a RECIPE, or --traces FILE --task NAME --out DIR")
    if recipe is not None:
        r, run_dir = _load(recipe, out, set_)
        typer.echo(str(_run_stage("verify", r, run_dir)))
        return
    if traces is None or task is None or out is None:
        missing = [flag for flag, v in (("--traces", traces), ("--task", task), ("--out", out)) if v is None]
        raise DistillError(f"verify: the standalone form needs --traces, --task and --out (missing "
                           f"{', '.join(missing)})")
    from distill.verify import config_from_overrides, verify_file

    cfg, task_overrides = config_from_overrides(set_ or [])
    typer.echo(str(verify_file(cfg, traces, task, out, task_overrides)))


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="A .gguf file, a model directory, a run directory or pkg:<package>.")],
    host: Annotated[str, typer.Option(help="Interface to bind; beyond loopback an API key is required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key_file: Annotated[Optional[Path], typer.Option(help="File whose first line is the API key "
                                                         "(default: $DISTILL_API_KEY, else no key).")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Model id shown to clients.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Cap on a request's max_tokens.")] = 1024,
    max_n: Annotated[int, typer.Option(help="Cap on choices per request.")] = 4,
    queue: Annotated[int, typer.Option(help="Requests that may wait while one runs (more: 503).")] = 16,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take, waiting included.")] = 120.0,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (more: 413).")] = 1 << 20,
    ctx: Annotated[int, typer.Option(help="Context length in tokens (llama.cpp).")] = 4096,
    drain: Annotated[float, typer.Option(help="On SIGTERM, seconds running requests may take to finish.")] = 30.0,
):
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from distill.serve import ServeConfig, read_api_key
    from distill.serve import serve as run_server

    run_server(ServeConfig(model, host, port, read_api_key(api_key_file), model_name, max_tokens, max_n, queue,
                           timeout, max_body, ctx, drain))


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="A .gguf file, a model directory, a run directory or pkg:<package>.")],
    system: Annotated[Optional[str], typer.Option(help="A system message to start the chat with.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 for greedy answers.")] = 0.0,
):
    """Chat with a local model in the terminal (/reset starts over, /exit or Ctrl-D quits)."""
    from distill.chat import chat as run_chat

    run_chat(model, system, max_tokens, temperature)


def main() -> None:
    try:
        app()
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
