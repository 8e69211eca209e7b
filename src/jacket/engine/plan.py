"""The plan: which passes compute a Jacobian, how many seeds go through each, and how they are batched.

This module is pure arithmetic on sizes and verdicts (no tensors, no timing): `candidates` lists the
plans that may compute a Jacobian, in the order the backend's prior prefers them; which one runs is
decided by measurement (`jacket.engine.tuning`).

NOTE: [How the plan decides]
- Mode. A Jacobian with `m` outputs and `n` inputs per sample costs `m` reverse passes (VJPs, one per
  output row) or `n` forward passes (JVPs, one per input column). `mode="auto"` takes reverse when
  `m <= n`, forward otherwise, and also lets the other mode compete when the two sizes are within
  `MODE_RATIO` of each other (their passes then cost about the same, and which is faster depends
  on the model). A forward mode that failed its check (NOTE: [Checked forward mode]) never runs.
- Per-sample Jacobians use the batch-sum trick: sample `b`'s output depends on sample `b`'s input only,
  so one pass whose seed is the same one-hot for every sample gives row (column) `i` of every `J_b` at
  once: `m` passes over the batch instead of `batch * m`. That is only true when samples do not
  interact, which `jacket.engine.probes` checks before trusting it.
- Strategy. "replicate": the batch is tiled `k` times and `k` seeds go through one ordinary forward and
  backward pass of batch `k * batch`: big matrix products, no vectorising map. "vmap": one forward
  pass on the batch as given and `k` pullbacks (or pushforwards) mapped over it. "loop": the same,
  one seed after the other (unrolled or a while loop on TensorFlow, `lax.map` on JAX, a Python loop
  on PyTorch). No strategy wins everywhere (measured on keras.applications models at batch 2, the
  best and the worst differed by up to 26x, in either direction by backend and model), so the
  planner measures (`jacket.engine.tuning`); the backend's `PRIOR` orders the candidates, and the
  first is what the first call runs. Whenever the forward pass must see the batch exactly as given
  (`per_sample=False`, where samples may interact; `training=True`, where dropout masks and batch
  statistics must be the same for every seed) the plan never replicates, nor does it at batch 1 on
  a model that mixes its samples (the tiling probe).
- Layer rules. Where some of the model's layers have a rule on this backend (NOTE: [Layer rules] in
  `jacket.engine.rules`), each plan runs with them, and the fastest such plan is measured once more
  without them. Where the rules write a large program (NOTE: [A rule's program]), the first call
  runs the plain plan of the model's kind (every layer counted) instead, and later calls try
  the plans with the rules.
- Chunk. The number of seeds per pass `k` is `chunk_size` when given, else the largest that keeps the
  estimated working memory (`k * batch` copies of the model's activations and of the result rows)
  within `memory_budget`; the chunks run one after the other through one compiled kernel. The
  default budget is a fraction of the free memory (NOTE: [Memory] in `jacket.engine.memory`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

STRATEGIES = ("replicate", "vmap", "loop")
MAX_UNROLLED = 32  # seeds per pass of a "loop" plan (TensorFlow unrolls up to 16 of them)
MODE_RATIO = 4  # both modes compete when out_size and in_size are within this factor


@dataclass(frozen=True)
class Plan:
    mode: str  # "reverse" pushes output rows (VJPs); "forward" pushes input columns (JVPs)
    per_sample: bool
    strategy: str  # "replicate", "vmap" or "loop"
    chunk: int  # seeds per pass
    rows: int  # seeds in all: out_size or in_size, times batch when not per-sample
    rules: bool = False  # the model's layers with a rule run through it (NOTE: [Layer rules])

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.rows / self.chunk)

    def describe(self) -> str:
        return (
            f"{self.mode} mode, {self.rows} seeds in {self.n_chunks} pass(es) of {self.chunk}, "
            f"{self.strategy}, {'per-sample' if self.per_sample else 'full'}"
            + (", layer rules" if self.rules else "")
        )


@dataclass(frozen=True)
class Problem:
    """What the planner knows of one Jacobian: sizes, options and the probes' verdicts."""

    batch: int
    in_size: int  # per sample, all inputs
    out_size: int  # per sample, all outputs
    itemsize: int  # bytes per element of the result
    activation_size: int | None  # elements of all intermediate activations of one sample
    per_sample: bool
    training: bool
    memory_budget: int
    mode: str = "auto"  # as requested
    chunk_size: int | None = None  # as requested
    strategy: str = "auto"  # as requested: one of STRATEGIES, "auto" or "autotune"
    forward_ok: bool = True  # a forward mode passed its check
    tiling_ok: bool = True  # the batch may be repeated (NOTE: [How the plan decides])
    prior: tuple[str, ...] = STRATEGIES  # the backend's order of preference
    rules: bool = False  # some layers of the model have a rule here (NOTE: [Layer rules])
    plain_prior: tuple[str, ...] | None = None  # the order without the rules (None: `prior`)
    plain_first: bool = False  # the rules' program is large: the first call runs without them


def prior(backend, kind: str) -> tuple[str, ...]:
    """The backend's order of strategies for this kind of model (`backend.PRIOR`)."""
    return tuple(backend.PRIOR.get(kind, backend.PRIOR["other"]))


def choose_mode(mode: str, out_size: int, in_size: int) -> str:
    if mode == "auto":
        return "reverse" if out_size <= in_size else "forward"
    return mode


def modes(problem: Problem) -> list[str]:
    """The modes that may run, the preferred first."""
    first = choose_mode(problem.mode, problem.out_size, problem.in_size)
    out = [first]
    small, large = sorted((problem.out_size, problem.in_size))
    if problem.mode == "auto" and large <= MODE_RATIO * small:
        out.append("forward" if first == "reverse" else "reverse")
    if not problem.forward_ok:
        out = ["reverse"]  # no forward mode passed its check: forward plans run in reverse
    return out


def strategies(problem: Problem) -> list[str]:
    """The strategies that may run: the backend's prior ones in its order (a forced one alone)."""
    if problem.strategy in STRATEGIES:
        return [problem.strategy]
    allowed = [s for s in problem.prior if s in STRATEGIES]
    if not replicable(problem) and "replicate" in allowed:
        allowed.remove("replicate")
    return allowed or ["vmap"]


def replicable(problem: Problem) -> bool:
    """Whether tiling the batch leaves the Jacobian as it is (NOTE: [How the plan decides])."""
    return problem.per_sample and not problem.training and problem.tiling_ok


def plan_for(problem: Problem, mode: str, strategy: str) -> Plan:
    """The plan of `mode` and `strategy`, with the chunk `chunk_size` or the memory budget gives."""
    seeds = problem.out_size if mode == "reverse" else problem.in_size
    other = problem.in_size if mode == "reverse" else problem.out_size
    rows = seeds if problem.per_sample else problem.batch * seeds
    if problem.chunk_size is not None:
        chunk = min(problem.chunk_size, rows)
    else:
        activations = problem.activation_size or 4 * (problem.in_size + problem.out_size)
        # forward activations kept for the backward pass, their cotangents, and the result rows
        per_seed = (
            problem.batch
            * problem.itemsize
            * (2 * activations + problem.in_size + problem.out_size + other)
        )
        if strategy == "replicate":
            # every seed also keeps its own copy of the forward pass's saved tensors (PyTorch's
            # autograd went 20% past the plain estimate on the memory benchmark)
            per_seed = per_seed * 3 // 2
        chunk = max(1, min(rows, problem.memory_budget // max(per_seed, 1)))
        if strategy == "loop":
            chunk = min(chunk, MAX_UNROLLED)
        chunk = math.ceil(rows / math.ceil(rows / chunk))  # even passes: no mostly-empty last one
    return Plan(mode=mode, per_sample=problem.per_sample, strategy=strategy, chunk=chunk, rows=rows)


def candidates(problem: Problem) -> list[Plan]:
    """Every plan that may compute this Jacobian, the prior's choice first.

    With one seed per sample (a scalar output in reverse mode, say) the strategies are the same
    computation, so only the first is listed.
    """
    plans = []
    for mode in modes(problem):
        for strategy in strategies(problem):
            plan = plan_for(problem, mode, strategy)
            if plan not in plans:
                plans.append(plan)
    if plans[0].rows == 1:
        plans = [p for p in plans if p.mode == plans[0].mode][:1]
    if problem.rules:
        # each plan with the layer rules, then their winner's twin without them (NOTE: [Measured
        # plans] in `jacket.engine.tuning`); where the rules' program is large, the first call
        # runs the plain plan of the model's kind (NOTE: [A rule's program])
        ruled = [replace(p, rules=True) for p in plans]
        plain = candidates(replace(problem, rules=False, prior=_plain(problem)))
        forced = problem.strategy in STRATEGIES  # runs as asked: with the rules
        opening = [plain[0]] if problem.plain_first and not forced else []
        plans = opening + ruled + [p for p in plain if p not in opening and p not in ruled]
    return plans


def _plain(problem: Problem) -> tuple[str, ...]:
    return problem.plain_prior if problem.plain_prior is not None else problem.prior


def with_chunk(plan: Plan, chunk: int) -> Plan:
    """`plan` with `chunk` seeds per pass (after running out of memory)."""
    return replace(plan, chunk=max(1, min(chunk, plan.rows)))
