"""The plan cache: measured plans remembered across processes, in the user's cache directory.

NOTE: [The plan cache]
- Where: `$JACKET_CACHE_DIR`, else `platformdirs.user_cache_dir("jacket")`, in a `plans/` folder;
  `JACKET_CACHE_DIR=off` turns it off (nothing read, nothing written).
- Key: a SHA-256 of the model's architecture (its layers' classes and configurations, the code
  (its module's file) of any class that is not Keras's own, the variables' shapes and dtypes;
  never the weights: see `jacket.engine.model.architecture`), the input signature, the options
  that change the plan (mode, chunk_size, per_sample, training, memory_budget or "default",
  flatten), the backend, the layer rules that may run on the model (NOTE: [Layer rules] in
  `jacket.engine.rules`), the device (its name and the CPU cores this process may use) and the
  versions of jacket, Keras and the framework. A model jacket cannot describe (a plain function) is never cached.
- Entry: one JSON file per key holding the key's material itself, the chosen plan, the measured
  candidates and the probes' verdicts that are safe to keep (the forward-mode check and the
  coupling probe: both follow from the architecture). It is written under a temporary name in the
  same folder and renamed over the entry (atomic on POSIX and Windows), so a reader sees a whole
  entry or none, and two processes writing at once leave one of their two whole entries.
- A corrupt entry (not JSON, missing fields), one of another format version, or one whose material
  is not this key's (foreign) is ignored with a `JacketWarning` (once per file and process) and
  measured again; its plan is used only if it is one of today's candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import JacketWarning
from .inputs import Inputs
from .model import architecture
from .options import Options
from .plan import Plan

FORMAT = 1
_WARNED: set = set()


@dataclass(frozen=True)
class Key:
    digest: str
    material: dict


@dataclass(frozen=True)
class Stored:
    """A plan read back from the cache."""

    plan: dict
    candidates: list  # [{"plan": {...}, "ms": float | None}]
    verdicts: dict

    def timings(self, plans: list[Plan]) -> dict:
        """Seconds per Jacobian measured for those of `plans` the entry has."""
        out = {}
        for item in self.candidates:
            ms = item.get("ms")
            for p in plans:
                if ms is not None and same_plan(p, item.get("plan", {})):
                    out[p] = float(ms) / 1e3
        return out


def directory() -> Path | None:
    """The cache's folder, or None when it is turned off."""
    chosen = os.environ.get("JACKET_CACHE_DIR")
    if chosen is not None and chosen.strip().lower() in ("off", "0", "false", "none", ""):
        return None
    if chosen:
        return Path(chosen).expanduser() / "plans"
    import platformdirs

    return Path(platformdirs.user_cache_dir("jacket")) / "plans"


def key(state, inputs: Inputs, options: Options) -> Key | None:
    """The cache key of a plan, or None when the model cannot be described (or caching is off)."""
    if directory() is None:
        return None
    described = state_architecture(state)
    if described is None:
        return None
    material = {
        "format": FORMAT,
        "architecture": described,
        "signature": [inputs.batch, [[list(leaf.shape), leaf.dtype] for leaf in inputs.leaves]],
        "options": {
            "mode": options.mode,
            "chunk_size": options.chunk_size,
            "per_sample": options.per_sample,
            "training": options.training,
            # the default budget follows the memory free in each process: keyed as "default"
            # (a cached plan's chunk is then today's for its mode and strategy)
            "memory_budget": "default" if options.default_budget else options.memory_budget,
            "flatten": options.flatten,
        },
        "backend": state.backend.NAME,
        # the layer rules that may run (NOTE: [Layer rules]): another set lists other candidates
        "layer_rules": sorted({rule.name for _, rule in state.rule_layers()}),
        "device": state.backend.device_description(),
        "versions": versions(state.backend),
    }
    text = json.dumps(material, sort_keys=True, default=str)
    return Key(hashlib.sha256(text.encode()).hexdigest(), json.loads(text))


def state_architecture(state) -> str | None:
    """The model's architecture digest, computed once per model state."""
    if not hasattr(state, "_architecture"):
        state._architecture = architecture(state.model)
    return state._architecture


def versions(backend) -> dict:
    from importlib import metadata

    import keras

    from .. import __version__

    out = {"jacket": __version__, "keras": keras.__version__}
    try:
        out[backend.NAME] = metadata.version(backend.NAME)
    except metadata.PackageNotFoundError:  # pragma: no cover - a framework without metadata
        out[backend.NAME] = "unknown"
    return out


def _path(k: Key) -> Path:
    return directory() / k.digest[:2] / f"{k.digest}.json"


def load(k: Key | None) -> Stored | None:
    """The stored entry of `k`, or None (missing, or ignored with a warning)."""
    if k is None:
        return None
    path = _path(k)
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None  # a miss (a file where a folder should be is reported when writing)
    except OSError as error:
        _warn(path, f"it cannot be read ({error})")
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format") != FORMAT:
            _warn(path, f"it is of format {data.get('format')!r}, not {FORMAT} (stale)")
            return None
        if data.get("material") != k.material:
            _warn(path, "its key material is not this model's (foreign)")
            return None
        plan, candidates, verdicts = data["plan"], data["candidates"], data["verdicts"]
        if not (
            isinstance(plan, dict)
            and isinstance(candidates, list)
            and isinstance(verdicts, dict)
            and {"mode", "strategy", "chunk", "rows", "per_sample"} <= set(plan)
        ):
            raise ValueError("fields missing or of the wrong type")
    except (ValueError, KeyError, TypeError) as error:
        _warn(path, f"it is corrupt ({error})")
        return None
    return Stored(plan, candidates, verdicts)


def store(k: Key, state, inputs: Inputs, chosen: Plan, source: str, trials: list) -> None:
    """Write the measured plan of `k` (atomically; a failure to write is a warning, never an
    error). `trials` are the candidates measured (`jacket.engine.trials.Trial`)."""
    if directory() is None:
        return
    path = _path(k)
    verdicts = {}
    shapes = inputs.signature[1]
    if shapes in state.forward:
        verdicts["forward"] = state.forward[shapes]
    if inputs.signature in state.independent:
        verdicts["independent"] = state.independent[inputs.signature]
    data = {
        "format": FORMAT,
        "material": k.material,
        "plan": _plan_fields(chosen),
        "source": source,
        "candidates": [
            {
                "plan": _plan_fields(t.plan),
                "ms": None if t.seconds is None else t.seconds * 1e3,
                "failure": t.failure,
            }
            for t in trials
        ],
        "verdicts": verdicts,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False
        ) as handle:
            temporary = handle.name
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        _warn(path, f"it could not be written ({error})")


def restore_verdicts(state, inputs: Inputs, stored: Stored) -> None:
    """The probes' verdicts kept with a cached plan, where this process has none yet."""
    verdicts = stored.verdicts
    shapes = inputs.signature[1]
    forward = verdicts.get("forward", "missing")
    if shapes not in state.forward and (forward is None or isinstance(forward, str)):
        if forward is None or forward in state.backend.JVPS:
            state.forward[shapes] = forward
    independent = verdicts.get("independent")
    if inputs.signature not in state.independent and isinstance(independent, bool):
        state.independent[inputs.signature] = independent


def same_plan(plan: Plan, fields: dict) -> bool:
    return _plan_fields(plan) == {k: fields.get(k) for k in _plan_fields(plan)}


def same_choice(plan: Plan, fields: dict) -> bool:
    """The same mode and strategy (the chunk may follow another memory budget)."""
    return all(
        getattr(plan, k) == fields.get(k)
        for k in ("mode", "strategy", "rows", "per_sample", "rules")
    )


def _plan_fields(plan: Plan) -> dict:
    return {
        "mode": plan.mode,
        "strategy": plan.strategy,
        "chunk": plan.chunk,
        "rows": plan.rows,
        "per_sample": plan.per_sample,
        "rules": plan.rules,
    }


def _warn(path: Path, why: str) -> None:
    if str(path) in _WARNED:
        return
    _WARNED.add(str(path))
    warnings.warn(
        f"jacket: the plan cache entry {path} is ignored: {why}. The plan is measured again "
        "and the entry rewritten. Set JACKET_CACHE_DIR=off to turn the plan cache off.",
        JacketWarning,
        stacklevel=3,
    )
