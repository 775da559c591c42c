"""Host overhead of an eager op call at B=1: the public function against the bare kernel call.

    python bench/bench_overhead.py [--repeat 2000] [--rounds 7] [--clock wall|cpu]

For each op (ToMe merge, FPET merge, unmerge) at a tiny shape, where the kernel itself costs a few
microseconds, it times (no gradient, one thread):
  public   ``fk.tome_merge(...)`` etc.: argument checks, backend choice, the registered op through
           the dispatcher (``torch.ops.fpet.*``; below the autograd key when nothing needs a gradient);
  op       ``torch.ops.fpet.<op>(...)`` called directly (through the Python autograd formula);
  kernel   the C++ kernel alone: the same op entered below the autograd key.
Medians of ``--rounds`` rounds of ``--repeat`` calls, with the spread (min-max) of the rounds.
Run it in a checkout of an older commit (its own build) to compare releases: on a tree where the
C++ kernels still live in ``torch.ops.fpet_C`` the ``kernel`` row calls them there.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fpet_kernels as fk


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time(fn, repeat: int, rounds: int, clock=time.perf_counter):
    for _ in range(max(50, repeat // 10)):
        fn()
    per = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(repeat):
            fn()
        per.append((clock() - t0) / repeat * 1e6)
    return statistics.median(per), min(per), max(per)


def _raw_namespace():
    """The namespace holding the C++ kernels' own entry points: ``fpet`` (this tree) or ``fpet_C`` (older)."""
    try:
        if torch._C._dispatch_has_kernel_for_dispatch_key("fpet_C::tome_merge", "CPU"):
            return torch.ops.fpet_C, True
    except RuntimeError:
        pass
    return torch.ops.fpet, False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="wall: perf_counter; cpu: the process's CPU time (steadier on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not fk.backends()["live"]["cpu"]:
        print("the C++ extension is not live: nothing to compare (pip install --no-build-isolation -e .)")
        return 1
    ns, legacy = _raw_namespace()
    x, metric = torch.randn(1, 17, 8), torch.randn(1, 17, 4)
    _, _, m = fk.tome_merge(x, metric, 4, class_token=True)
    y = torch.randn(1, 13, 8)

    def below(fn):
        def run():
            with torch._C._AutoDispatchBelowAutograd():
                return fn()
        return run

    rows = {
        "tome_merge": (lambda: fk.tome_merge(x, metric, 4, None, True, False),
                       None if legacy else (lambda: torch.ops.fpet.tome_merge(x, metric, 4, None, True, False)),
                       lambda: ns.tome_merge(x, metric, 4, None, True, False)),
        "fpet_merge": (lambda: fk.fpet_merge(x, metric, class_token=True),
                       None if legacy else (lambda: torch.ops.fpet.fpet_merge(x, metric, None, 1, 4, 4)),
                       lambda: ns.fpet_merge(x, metric, None, 1, 4, 4)),
        "unmerge": (lambda: fk.unmerge(y, m),
                    None if legacy else (lambda: torch.ops.fpet.unmerge(y, m.token_map)),
                    lambda: ns.unmerge(y, m.token_map)),
    }
    print(f"torch {torch.__version__}, kernels in torch.ops.{'fpet_C' if legacy else 'fpet'}; "
          f"microseconds ({args.clock} clock) a call, median [min-max] of {args.rounds} rounds x {args.repeat} calls, no grad, 1 thread")
    print(f"{'op':<12} {'public':>22} {'op':>22} {'kernel':>22} {'public - kernel':>16}")
    with torch.no_grad():
        for name, (public, op, kernel) in rows.items():
            clock = CLOCKS[args.clock]
            p = _time(public, args.repeat, args.rounds, clock)
            o = _time(op, args.repeat, args.rounds, clock) if op is not None else None
            k = _time(below(kernel) if not legacy else kernel, args.repeat, args.rounds, clock)
            fmt = lambda t: "-" if t is None else f"{t[0]:7.1f} [{t[1]:.1f}-{t[2]:.1f}]"  # noqa: E731
            print(f"{name:<12} {fmt(p):>22} {fmt(o):>22} {fmt(k):>22} {p[0] - k[0]:16.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
