"""The native encoder layer's helper threads are kept off the CPU the calling thread runs on
(csrc/encoder_layer.cpp keep_off_caller_cpu): the kernel's wake-up placement put a woken helper on
its waker's CPU, where the two shared one core while the other idled (docs/CPU_INFERENCE.md).

Each case runs in a fresh process: the helper pool is process-wide, and the caller's CPU is set by
pinning the calling thread. Linux only (affinity through /proc and sched_setaffinity)."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs Linux and at least 2 CPUs this process may run on")

# Prints, after each step, the CPU sets of the process's threads other than the caller that differ
# from the process's whole set: the helpers once they have been moved (torch's OpenMP workers keep
# the set they were created with, the whole one).
DRIVER = textwrap.dedent("""
    import ctypes, os, sys, threading, torch
    sys.path.insert(0, os.path.join({root!r}, "python"))
    from forkattn import _native
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)
    H, I = 48, 37
    args = dict(x=r(1, 9, H), qkv_w=r(3 * H, H), qkv_b=r(3 * H), attn_out_w=r(H, H), attn_out_b=r(H),
                ln1_w=r(H), ln1_b=r(H), ln1_eps=1e-12, inter_w=r(I, H), inter_b=r(I), out_w=r(H, I),
                out_b=r(H), ln2_w=r(H), ln2_b=r(H), ln2_eps=1e-12, heads=3, packed=False, chunks=2, threads=2)
    main = threading.get_native_id()
    full = sorted(os.sched_getaffinity(0))
    def helper_sets():
        sets = set()
        for t in os.listdir("/proc/self/task"):
            if int(t) != main:
                cpus = tuple(sorted(os.sched_getaffinity(int(t))))
                if cpus != tuple(full):
                    sets.add(cpus)
        return sorted(sets)
    want = _native._C.encoder_layer_cpu(**args)
    print("FULL", full, "HELPERS", helper_sets(), flush=True)
    getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu
    for cpu in full[:2] * 2:  # the caller moved to one CPU, then another (its CPU set stays whole)
        os.sched_setaffinity(0, {{cpu}})
        os.sched_setaffinity(0, full)
        before = getcpu()
        assert torch.equal(_native._C.encoder_layer_cpu(**args), want)
        print("CALLER", before, getcpu(), "HELPERS", helper_sets(), flush=True)
    os.sched_setaffinity(0, {{full[0]}})  # a caller with one CPU: the helpers are left where they were
    prev = helper_sets()
    assert torch.equal(_native._C.encoder_layer_cpu(**args), want)
    print("PINNED", full[0], prev == helper_sets(), "HELPERS", helper_sets(), flush=True)
    os.sched_setaffinity(0, full)
    assert torch.equal(_native._C.encoder_layer_cpu(**args), want)
    before = helper_sets()
    pid = os.fork()
    if pid == 0:  # the child has the pool's objects but not its threads: it must leave the parent's alone
        code = 0
        try:
            for cpu in full[:2]:  # move, so that the child's pool wants to re-place its helpers
                os.sched_setaffinity(0, {{cpu}})
                os.sched_setaffinity(0, full)
                code |= not torch.equal(_native._C.encoder_layer_cpu(**args), want)
            # nor re-pin itself: a dead helper's handle reads as the calling thread here (glibc)
            code |= 4 * (os.sched_getaffinity(0) != set(full))
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print("FORK", os.waitstatus_to_exitcode(status), before == helper_sets(), "HELPERS", helper_sets(), flush=True)
""")


def _run(env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    res = subprocess.run([sys.executable, "-c", DRIVER.format(root=ROOT)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return [line.split() for line in res.stdout.splitlines()]


def _sets(line):
    """The helper CPU sets printed on one line of the driver, as a list of tuples."""
    return eval(" ".join(line[line.index("HELPERS") + 1:]))  # printed by the driver above: lists of tuples


def test_helpers_leave_the_callers_cpu():
    lines = _run()
    full = tuple(eval(" ".join(lines[0][1:lines[0].index("HELPERS")])))
    first = _sets(lines[0])  # unpinned caller: the helper avoids whichever CPU the caller was on
    assert len(first) == 1 and len(first[0]) == len(full) - 1 and set(first[0]) < set(full)
    followed = 0
    for line in lines[1:-2]:  # the caller moved: the helper follows, off the caller's new CPU
        before, after = int(line[1]), int(line[2])
        assert len(_sets(line)) == 1 and len(_sets(line)[0]) == len(full) - 1, line
        if before == after:  # else the scheduler moved the caller during the call: which CPU it saw is unknown
            assert _sets(line) == [tuple(c for c in full if c != before)], line
            followed += 1
    assert followed >= 2, lines  # four moves; the scheduler will not have moved the caller in three of them
    assert lines[-2][0] == "PINNED" and lines[-2][2] == "True", lines[-2]
    # a forked child computes the same layer (on its calling thread) and leaves the parent's helpers be
    assert lines[-1][:3] == ["FORK", "0", "True"], lines[-1]


def test_helper_affinity_can_be_turned_off():
    lines = _run({"FORKATTN_CPU_HELPER_AFFINITY": "0"})
    # the helper keeps the CPU set it was created with (the caller's, unpinned): no set differs
    assert all(_sets(line) == [] for line in lines), lines
