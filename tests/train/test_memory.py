"""`train.dist.keep_freed_memory`: after it, memory a process frees is handed out again without the kernel faulting
it in anew (counted with the kernel's own minor-fault counter, in fresh processes)."""

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import torch
if sys.argv[1] == "on":
    from train.dist import keep_freed_memory
    assert keep_freed_memory()
torch.ones(1).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(6):  # a training step's activations, of several sizes: allocated, written, freed
    acts = [torch.ones(n << 18) for n in (96, 160, 64)]  # MB of float32, through torch's CPU allocator
    del acts
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_without_page_faults():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    step = (96 + 160 + 64 << 20) // 4096  # pages one step writes
    assert faults("off") > 5 * step  # glibc's default: every block a fresh mapping, faulted in again at each step
    # Kept: the first step's pages and, as glibc's aligned allocations reuse freed blocks only in part, some more.
    assert faults("on") < 3 * step
