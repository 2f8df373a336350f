"""Peak host memory of one attention forward+backward on the CPU: our torch backend vs dense masked attention.
Each measurement runs in a fresh process (peak RSS minus the RSS after inputs are made), with glibc's mmap threshold
fixed at 128 KB: otherwise malloc raises it after the first large free and keeps freed chunks in its arena, and peak
RSS then counts memory the program no longer uses (seen: 876 MB instead of 88 MB for the torch backend at n=16384).
Usage: python bench/cpu_memory.py [n] (default 16384: one head, d=64, fixed l=128 c=32, fp32)."""
import json
import os
import subprocess
import sys

CHILD = r"""
import resource, sys, time, torch
from sparse_transformer import layouts, sparse_attention
n, backend = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
lay = layouts.fixed(n, 128, 32)
q, k, v = (torch.randn(1, 1, n, 64, requires_grad=True) for _ in range(3))
if backend == "torch":
    sparse_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], layouts.fixed(256, 128, 32), backend="torch")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
out = sparse_attention(q, k, v, lay, backend=backend)
out.sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(backend=backend, n=n, peak_mb=(peak - base) / 1024, seconds=time.time() - t)))
""".replace("import resource", "import json, resource")

n = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
rows = []
for backend in ("torch", "reference"):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, "-c", CHILD, str(n), backend], capture_output=True, text=True, env=env)
    rows.append(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                dict(backend=backend, n=n, error=r.stderr.strip().splitlines()[-1][:200]))
    print(rows[-1], flush=True)
print(f"dense fp32 scores alone would be n^2 * 4 bytes = {n * n * 4 / 2**20:.0f} MB")
