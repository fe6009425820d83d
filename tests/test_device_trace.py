"""benchmarks/device_trace.py: kernel time per call from a profiler trace's GPU stream lines (derived lines
not counted twice, host planes ignored), the busy fraction over the traced span, and a clear error when a
trace holds no GPU kernels (a real CPU trace); the host's costliest events per call (host_summary)."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax.profiler import ProfileData

_SPEC = importlib.util.spec_from_file_location(
    "device_trace", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "device_trace.py")
dt = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dt)


def _event(metadata_id, start_us, duration_us):
    return f"events {{ metadata_id: {metadata_id} offset_ps: {start_us * 10**6} duration_ps: {duration_us * 10**6} }}"


def _profile():
    """Two calls, each a 20 us 'gemm' and a 3 us 'reduce' on stream 13, 5 us idle between launches; an
    'XLA Ops' line repeating the same kernels and a host plane that must not count."""
    stream = " ".join([_event(1, 0, 20), _event(2, 25, 3), _event(1, 33, 20), _event(2, 58, 3)])
    derived = " ".join([_event(1, 0, 20), _event(2, 25, 3), _event(1, 33, 20), _event(2, 58, 3)])
    return ProfileData.from_text_proto(f"""
planes {{ id: 1 name: "/device:GPU:0"
  lines {{ id: 1 name: "Stream #13(Compute)" timestamp_ns: 1000 {stream} }}
  lines {{ id: 2 name: "XLA Ops" timestamp_ns: 1000 {derived} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "gemm" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "reduce" }} }} }}
planes {{ id: 2 name: "/host:CPU"
  lines {{ id: 1 name: "python" timestamp_ns: 0 {_event(1, 0, 500)} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "dispatch" }} }} }}
""")


def test_kernel_time_per_call_and_busy_fraction():
    s = dt.kernel_summary(_profile(), calls=2)
    assert s["kernels_per_call"] == 2
    assert s["kernel_us_per_call"] == pytest.approx(23.0)
    assert s["busy_fraction"] == pytest.approx(46 / 61)          # 46 us of kernels over a 61 us span
    assert list(s["by_kernel"]) == ["gemm", "reduce"]            # costliest first
    assert s["by_kernel"]["gemm"] == {"per_call": 1.0, "mean_us": pytest.approx(20.0)}
    assert s["by_kernel"]["reduce"]["mean_us"] == pytest.approx(3.0)


def test_a_trace_without_gpu_kernels_names_what_it_saw():
    f = jax.jit(lambda a: (a @ a).sum())
    profile = dt.trace_kernels(f, (jnp.ones((64, 64)),), runs=2)
    assert any(p.name.startswith("/host:") for p in profile.planes)
    with pytest.raises(ValueError, match="no kernels on a GPU plane.*planes \\[.*/host:"):
        dt.kernel_summary(profile, calls=2)
    with pytest.raises(ValueError, match="no kernels on a GPU plane"):       # op_summary: the same, per op
        dt.op_summary(lambda a: a @ a, [(jnp.ones((8, 8)),), (jnp.ones((8, 8)),)], runs=2)


def test_trace_profiles_a_loop_that_carries_its_own_state():
    """trace(run) for stateful loops (decode steps over a donated cache): run() executes once, under the
    profiler, and what it returns is waited for."""
    step = jax.jit(lambda s: s * 2.0 + 1.0)
    state = {"s": jnp.ones((8,)), "calls": 0}

    def three_steps():
        state["calls"] += 1
        for _ in range(3):
            state["s"] = step(state["s"])
        return state["s"]

    profile = dt.trace(three_steps)
    assert state["calls"] == 1 and float(state["s"][0]) == 15.0
    assert any(p.name.startswith("/host:") for p in profile.planes)


def test_host_summary_ranks_the_host_planes_events_per_call():
    """host_summary reads only /host:CPU (the GPU plane's kernels are not host time) and divides by calls."""
    assert dt.host_summary(_profile(), calls=2) == [("dispatch", 0.5, pytest.approx(250.0))]


def test_host_summary_of_a_real_cpu_trace_finds_the_jitted_call_and_needs_a_host_plane():
    f = jax.jit(lambda a: (a @ a).sum())
    ranked = dt.host_summary(dt.trace_kernels(f, (jnp.ones((64, 64)),), runs=3), calls=3)
    assert any("PjitFunction" in name for name, _, _ in ranked)
    assert [us for _, _, us in ranked] == sorted((us for _, _, us in ranked), reverse=True)
    gpu_only = ProfileData.from_text_proto('planes { id: 1 name: "/device:GPU:0" }')
    with pytest.raises(ValueError, match="no /host:CPU plane"):
        dt.host_summary(gpu_only, calls=1)
