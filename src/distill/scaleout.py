"""Generation across a Ray cluster: actors that each hold a teacher (one per server URL, or one in-process
engine per GPU), fed batches of requests, behind one `Teacher` whose `stream` yields results as they come.

    distill generate recipe.yaml --set 'generate.ray={address: local, teachers: [http://127.0.0.1:8000/v1#m, http://127.0.0.1:8001/v1#m]}'

Every teacher listed must be the same model as `generate.teacher`: the records carry that one identity,
and their resume keys do not depend on which worker answered. A worker that dies (a node lost) fails its
batch; generate records those samples as failed and the next run retries them. See docs/scale-out.md for
a real cluster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

from distill.config import DistillError, check_types
from distill.models import ModelRef
from distill.teachers import Request, Result, Sampling, TeacherOptions, complete_via_stream


@dataclass
class RayOptions:
    """`generate.ray`: where the cluster is and how to spread the teachers over it."""

    # local: start a Ray instance in this process; auto: join the cluster this machine is a node of
    # (`ray start --head` / `ray start --address=…` ran here); ray://head:10001: connect as a Ray Client.
    address: str = "local"
    teachers: list[str] = field(default_factory=list)  # model references; default: [generate.teacher]
    workers: int | None = None  # actors in all, dealt round-robin over `teachers`; default: one per teacher
    num_cpus: float = 1.0  # reserved per actor
    num_gpus: float = 0.0  # per actor: 1 for an in-process engine (vllm, hf) on a GPU node
    batch: int | None = None  # requests per call to an actor; default: 2 × generate.concurrency
    runtime_env: dict | None = None  # for ray.init, e.g. {pip: [...], env_vars: {...}} (see Ray's docs)

    @classmethod
    def parse(cls, data) -> RayOptions:
        if not isinstance(data, dict):
            raise DistillError(f"generate.ray: expected a mapping such as {{address: local}}, got {data!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DistillError(f"generate.ray.{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
        data = dict(data)
        check_types(cls, data, "generate.ray")
        opts = cls(**data)
        if not (opts.address in ("local", "auto") or opts.address.startswith("ray://")):
            raise DistillError(f"generate.ray.address: '{opts.address}' is not local, auto or ray://host:port")
        if opts.workers is not None and opts.workers < 1:
            raise DistillError(f"generate.ray.workers: must be >= 1, got {opts.workers}")
        if opts.batch is not None and opts.batch < 1:
            raise DistillError(f"generate.ray.batch: must be >= 1, got {opts.batch}")
        return opts


class _Worker:
    """Runs inside a Ray actor: one teacher, answering one batch at a time (`max_concurrency=1`, so an
    in-process engine is never entered twice; the teacher's own `stream` does the concurrency)."""

    def __init__(self, ref: str, main: ModelRef, backend: str, seed: int, api_key: str | None,
                 options: TeacherOptions):
        from distill.models import resolve
        from distill.teachers import load_teacher

        self.error = None
        try:  # kept, not raised: Ray would turn it into a dead actor and a page of traceback
            model = main if ref == main.ref else resolve(ref, "generate.ray.teachers")
            self.teacher = load_teacher(model, backend if ref == main.ref else "auto", seed, api_key, options)
        except DistillError as e:
            self.error = str(e)

    def ready(self) -> str | None:
        return self.error

    def answer(self, requests: list[Request], sampling: Sampling):
        """[(completions | exception)] in the order of `requests`, or the message of a DistillError."""
        by_key = {}
        try:
            for req, result in self.teacher.stream(requests, sampling):
                if isinstance(result, Exception):
                    # Exceptions of other libraries may not unpickle on the driver; their text is enough.
                    result = RuntimeError(f"{type(result).__name__}: {result}")
                by_key[id(req)] = result
        except DistillError as e:
            return str(e)
        return [by_key[id(r)] for r in requests]

    def close(self) -> None:
        self.teacher.close()


class RayTeacher:
    backend = "ray"

    def __init__(self, model: ModelRef, backend: str, seed: int, api_key: str | None, options: TeacherOptions):
        import ray

        self.opts = RayOptions.parse(options.ray)
        self.batch = self.opts.batch or 2 * options.concurrency
        refs = self.opts.teachers or [model.ref]
        workers = self.opts.workers or len(refs)
        self._started = not ray.is_initialized()
        if self._started:
            if self.opts.address == "local":
                ray.init(num_cpus=max(1, int(workers * self.opts.num_cpus + 0.999)), include_dashboard=False,
                         log_to_driver=False, runtime_env=self.opts.runtime_env)
            else:
                ray.init(address=self.opts.address, runtime_env=self.opts.runtime_env, log_to_driver=False)
        actor = ray.remote(num_cpus=self.opts.num_cpus, num_gpus=self.opts.num_gpus, max_concurrency=1)(_Worker)
        local = dataclasses.replace(options, ray=None)
        self.actors = [actor.remote(refs[i % len(refs)], model, backend, seed, api_key, local)
                       for i in range(workers)]
        try:
            errors = [e for e in ray.get([a.ready.remote() for a in self.actors]) if e]
        except ray.exceptions.RayError as e:  # e.g. distill not installed on a node (docs/scale-out.md)
            errors = [f"generate.ray: a worker could not start ({str(e).strip().splitlines()[0][:200]})"]
        if errors:
            self.close()
            raise DistillError(errors[0])

    def complete(self, messages: list[dict], seeds: list[int], sampling: Sampling):
        return complete_via_stream(self, messages, seeds, sampling)

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Result]:
        import ray

        todo = iter(requests)
        inflight = {}  # ObjectRef -> (actor, its batch)
        alive = list(self.actors)

        def submit(actor) -> None:
            batch = list(islice(todo, self.batch))
            if batch:
                inflight[actor.answer.remote(batch, sampling)] = (actor, batch)

        try:
            for actor in alive:  # two batches per actor: the next is queued while one runs
                submit(actor)
                submit(actor)
            while inflight:
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                actor, batch = inflight.pop(ref)
                try:
                    results = ray.get(ref)
                except ray.exceptions.RayError as e:  # the actor or its node died: this batch failed
                    if actor in alive:
                        alive.remove(actor)
                    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    for req in batch:
                        yield req, RuntimeError(f"ray worker lost: {reason}")
                    if not alive and next(todo, None) is not None:
                        raise DistillError("generate.ray: every worker died; run the same command again to "
                                           "resume") from None
                    continue
                if isinstance(results, str):
                    raise DistillError(results)
                submit(actor)
                yield from zip(batch, results, strict=True)
        finally:
            for ref in inflight:
                ray.cancel(ref)

    def close(self) -> None:
        """Stop the actors (freeing their engines, dropping their connections) and a Ray we started."""
        import ray

        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []
        if self._started:
            ray.shutdown()
            self._started = False
