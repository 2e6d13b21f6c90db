"""keep_freed_memory: a freed block is reused without new page faults (in a fresh process)."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from goyal_recipe.cpu_memory import keep_freed_memory

    def faults(size_bytes, times=4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(times):
            torch.empty(size_bytes, dtype=torch.uint8).fill_(1)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    if sys.argv[1] == "keep":
        assert keep_freed_memory() is True
        assert keep_freed_memory() is True  # idempotent
    faults(8 << 20)  # the first allocations grow the heap: they fault either way
    print(faults(8 << 20))
""")


def page_faults(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    pages_per_block = (8 << 20) // 4096
    # glibc's default hands the freed block back to the kernel (unmapped or trimmed off the heap
    # top) and faults it in again: here at least one whole block's pages over the four allocations.
    assert page_faults("default") >= pages_per_block
    # Kept: the freed block is handed out again, already mapped.
    assert page_faults("keep") < pages_per_block // 8
