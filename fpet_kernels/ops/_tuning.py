"""Recorded benchmark results: how the automatic choice ranks the live GPU backends of an op.

The files (``fpet_kernels/tuning/*.json``, format ``RESULTS_FORMAT``, see that folder's README) are
written by ``bench/record_dispatch.py`` on a GPU. For a GPU the file recorded on a GPU of the same
name is used, else one of the same compute capability; the ranking of the candidates is the
geometric mean of their medians over the (mode, dtype, batch) cells every candidate has. Without a
file (or without cells for the op) the default order ``DEFAULT_GPU_ORDER`` decides.

Plain functions of their arguments: which backends are live, the caches and the warnings are
``ops/_backend.py``'s, which calls :func:`choose` once per (op, device) and keeps the answer.
"""
from __future__ import annotations

import json
import math
import os
import warnings

# The automatic choice on CUDA tensors when no results were recorded on this GPU: the CUDA C++
# kernels first (no JIT compilation, smallest launch overhead), then Triton.
DEFAULT_GPU_ORDER = ("cuda", "triton")
TUNING_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tuning")
RESULTS_FORMAT = 1


def load_results(directory: str | None = None) -> list[dict]:
    """The recorded results files of ``directory`` (default ``TUNING_DIR``) that are well formed;
    a malformed file is skipped with a warning (it must never break an op call)."""
    directory = TUNING_DIR if directory is None else directory
    out = []
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
    except OSError:
        return out
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                data = json.load(f)
            check_results(data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            warnings.warn(f"fpet_kernels: ignoring recorded results {path}: {exc}", RuntimeWarning, stacklevel=2)
            continue
        data["_file"] = name
        out.append(data)
    return out


def check_results(data) -> None:
    """Raise ValueError unless ``data`` is a recorded-results document of format ``RESULTS_FORMAT``."""
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"not a format-{RESULTS_FORMAT} results file")
    for key in ("gpu", "capability", "torch", "date", "results"):
        if key not in data:
            raise ValueError(f"missing key {key!r}")
    if not isinstance(data["results"], list) or not data["results"]:
        raise ValueError("no results")
    for row in data["results"]:
        for key in ("op", "mode", "dtype", "batch", "backend", "median_ms"):
            if key not in row:
                raise ValueError(f"a result row lacks {key!r}: {row}")
        ms = row["median_ms"]
        if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not math.isfinite(ms) or ms <= 0:
            raise ValueError(f"median_ms must be a positive number: {row}")


def rank_backends(data: dict, op: str, candidates) -> tuple[list, str] | None:
    """Rank ``candidates`` for ``op`` by the recorded medians: (fastest first, how), or None when
    the file has no cell where every candidate was measured. Score: the geometric mean of the
    medians over the (mode, dtype, batch) cells that all candidates have; ties keep the order of
    ``candidates``."""
    cells: dict = {}
    for row in data["results"]:
        if row["op"] == op and row["backend"] in candidates:
            cells.setdefault((row["mode"], row["dtype"], row["batch"]), {})[row["backend"]] = float(row["median_ms"])
    common = [c for c in cells.values() if all(b in c for b in candidates)]
    if not common:
        return None
    score = {b: sum(math.log(c[b]) for c in common) / len(common) for b in candidates}
    order = sorted(candidates, key=lambda b: (score[b], list(candidates).index(b)))
    if len(order) > 1:
        ratio = math.exp(score[order[0]] - score[order[1]])
        how = f"{order[0]} {ratio:.2f}x the time of {order[1]} (geometric mean of {len(common)} cells)"
    else:
        how = f"{order[0]} ({len(common)} cells)"
    return order, how


def find_results(gpu: str, capability: str, results: list) -> tuple[dict | None, str]:
    """(the file recorded on ``gpu``, else on a GPU of compute capability ``capability``; how it matched)."""
    for data in results:
        if data["gpu"] == gpu:
            return data, "same GPU"
    for data in results:
        if str(data["capability"]) == capability:
            return data, f"same compute capability {capability}"
    return None, ""


def choose(op: str | None, candidates: list, gpu: str, capability: str, results: list) -> tuple[str | None, str]:
    """(the automatic backend of ``op`` among its live GPU backends ``candidates`` (in
    ``DEFAULT_GPU_ORDER``) on GPU ``gpu``, where the choice came from); None when there is none."""
    default = "/".join(DEFAULT_GPU_ORDER)
    if not candidates:
        return None, f"no GPU backend is live for {op or 'this op'}"
    if op is None:
        return candidates[0], f"default order {default} (no op named)"
    data, match = find_results(gpu, capability, results)
    if data is None:
        return candidates[0], f"default order {default}: no recorded results for {gpu} (sm {capability})"
    if len(candidates) == 1:
        return candidates[0], f"only live GPU backend for {op}"
    ranked = rank_backends(data, op, candidates)
    where = (f"{data['_file']} ({data['gpu']}, {match}; torch {data['torch']}, triton "
             f"{data.get('triton') or '-'}, {data['date']})")
    if ranked is None:
        return candidates[0], (f"default order {default}: {where} has no results of "
                               f"{op} for {' and '.join(candidates)}")
    order, how = ranked
    return order[0], f"recorded: {where}: {how}"
