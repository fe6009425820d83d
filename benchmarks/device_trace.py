"""Where a jitted op's time goes on the GPU, from a JAX profiler trace: the kernels each call launches, their
device time, and how busy the GPU was over the traced window.

Wall-clock timing (gemm.py's time_jax) cannot tell a slow kernel from a GPU waiting for the host between
launches (a Mosaic GPU call builds its TMA descriptors on the host before each launch). The trace can: the
sum of kernel durations per call is the device's share, and busy_fraction = kernel time / traced span says
whether the device idled (near 1: the wall time is device time; well below: launch gaps).

  summary = kernel_summary(trace_kernels(fn, args, runs=20), calls=20)
  summary = kernel_summary(trace(lambda: loop_of_8_steps()), calls=8)     # stateful loops

Kernel events are read from the "/device:GPU:N" planes' "Stream #..." lines (CUPTI's per-stream kernel
timelines); other lines of those planes ("XLA Modules", "XLA Ops", ...) are derived from the same kernels and
are left out, so nothing is counted twice.
"""
import collections
import glob
import os
import tempfile

import jax
from jax.profiler import ProfileData


def trace_kernels(fn, args, runs: int = 20) -> ProfileData:
    """The profile of `runs` back-to-back calls of fn(*args) (compiled and warmed up before the trace)."""
    jax.block_until_ready(fn(*args))

    def calls():
        out = None
        for _ in range(runs):
            out = fn(*args)
        return out

    return trace(calls)


def trace(run) -> ProfileData:
    """The profile of run() (a callable without arguments, e.g. a loop of decode steps that carries its own
    state), waited for on its result. Compile and warm up what it calls beforehand."""
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            jax.block_until_ready(run())
        files = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        if len(files) != 1:
            raise RuntimeError(f"trace_kernels: expected one .xplane.pb under the trace folder, found {files}")
        with open(files[0], "rb") as f:
            return ProfileData.from_serialized_xspace(f.read())


def kernel_events(profile: ProfileData) -> list:
    """(name, start_ns, duration_ns) of every kernel on the GPU planes' stream lines, in start order. Raises,
    naming the planes and lines it saw, when there is none (a CPU run, or a trace laid out otherwise)."""
    events, seen = [], []
    for plane in profile.planes:
        if not plane.name.startswith("/device:GPU:"):
            continue
        for line in plane.lines:
            seen.append(f"{plane.name}: {line.name}")
            if line.name.startswith("Stream #"):
                events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
    if not events:
        planes = [p.name for p in profile.planes]
        raise ValueError(f"kernel_events: no kernels on a GPU plane's 'Stream #' lines; planes {planes}, "
                         f"GPU lines {seen}")
    return sorted(events, key=lambda e: e[1])


def kernel_summary(profile: ProfileData, calls: int) -> dict:
    """Per call of the traced op (calls: how many the trace holds): kernels launched, their summed device
    time in us, and per kernel name its launches and mean us; busy_fraction over the traced span."""
    events = kernel_events(profile)
    busy_ns = sum(d for _, _, d in events)
    span_ns = max(s + d for _, s, d in events) - events[0][1]
    by_name = collections.defaultdict(list)
    for name, _, d in events:
        by_name[name].append(d)
    return {
        "kernels_per_call": len(events) / calls,
        "kernel_us_per_call": busy_ns / calls / 1e3,
        "busy_fraction": busy_ns / span_ns if span_ns > 0 else 1.0,
        "by_kernel": {name: {"per_call": len(ds) / calls, "mean_us": sum(ds) / len(ds) / 1e3}
                      for name, ds in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))},
    }


def host_summary(profile: ProfileData, calls: int, top: int = 15) -> list:
    """Where the host's time goes, per call of the traced op: the `top` event names on the "/host:CPU" plane
    (Python functions, prefixed "$", and XLA / PjRt TraceMe scopes) by summed duration, as (name, events per
    call, us per call). Nested scopes each count their whole span, so a parent and its children both appear:
    read it as a ranking, not a partition. Raises when the profile has no host plane."""
    totals = collections.defaultdict(lambda: [0, 0])
    planes = [p for p in profile.planes if p.name == "/host:CPU"]
    if not planes:
        raise ValueError(f"host_summary: no /host:CPU plane; planes {[p.name for p in profile.planes]}")
    for plane in planes:
        for line in plane.lines:
            for e in line.events:
                totals[e.name][0] += 1
                totals[e.name][1] += e.duration_ns
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return [(name, n / calls, ns / calls / 1e3) for name, (n, ns) in ranked]


def op_summary(op, arg_sets: list, runs: int = 10) -> dict:
    """kernel_summary per call of op over arg_sets (a list of argument tuples, as gemm.py's time_jax takes):
    one jitted executable calls op on every set, traced `runs` times."""
    return kernel_summary(trace_kernels(jax.jit(lambda sets: [op(*a) for a in sets]), (arg_sets,), runs=runs),
                          calls=runs * len(arg_sets))
