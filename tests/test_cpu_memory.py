"""keep_freed_memory: large blocks come from the heap and stay mapped after free (in fresh processes)."""

import ctypes
import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, json, re, sys, torch
    from goyal_recipe.cpu_memory import keep_freed_memory, release_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    if sys.argv[1] == "keep":
        assert keep_freed_memory() is True
        assert keep_freed_memory() is True  # idempotent

    def update():
        # Like an update's activations: several large blocks live at once, then all freed.
        blocks = [torch.empty(30 << 20, dtype=torch.uint8).fill_(1) for _ in range(3)]
        alive = mallinfo2()
        del blocks
        return alive

    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) << 10

    alive = update()
    freed = mallinfo2()
    rss_kept = rss()
    assert release_freed_memory() is True
    print(json.dumps({"mapped_alive": alive.hblkhd, "heap_freed": freed.arena, "released": rss_kept - rss()}))
""")
MB = 1 << 20


def probe(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="needs glibc >= 2.33 (mallopt, mallinfo2)")
def test_keep_freed_memory_serves_blocks_from_the_heap_and_keeps_them():
    default = probe("default")
    # glibc's default maps each 30 MB block on its own and unmaps it on free.
    assert default["mapped_alive"] >= 90 * MB
    kept = probe("keep")
    # Kept: the blocks come from the heap, which keeps them mapped after free for the next update.
    # (Page-fault counts are not asserted: where the heap places the next update's blocks, and so
    # whether some of them land on pages not yet touched, varies from run to run.)
    assert kept["mapped_alive"] < 30 * MB
    assert kept["heap_freed"] >= 90 * MB
    # Released once training is over: the kept blocks leave the process's resident memory.
    assert kept["released"] >= 80 * MB
    assert default["released"] < 10 * MB  # nothing was kept
