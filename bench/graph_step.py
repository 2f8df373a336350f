"""CUDA-graph capture of our attention's forward + backward, and of a whole training step, on the device.

  python bench/graph_step.py attention MODE   # strided-12k / fixed-12k / strided-3k fwd+bwd: eager vs graph replay
  python bench/graph_step.py model MODE       # enwik8 step (no recompute, one loss chunk), ours and dense SDPA

MODE is torch.cuda.graph's capture_error_mode (global, thread_local, relaxed). Prints eager and replay medians
(triton.testing.do_bench) side by side; a failed capture prints its error. Replaying removes the host's launch cost,
so the replay time is what the GPU needs for the step.
"""
import sys

import torch
import triton.testing as tt

from sparse_transformer import SparseTransformer, load_preset, sparse_attention
from sparse_transformer.bench import SETUPS, capture_graph, make_train_step


def ms(f):
    return tt.do_bench(f, warmup=10, rep=100, return_mode="median")


what, mode = sys.argv[1], sys.argv[2]
if what == "attention":
    for name in ("strided-3k", "strided-12k", "fixed-12k"):
        B, H, n, D, make, _ = SETUPS[name]
        lay = make()
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        go = torch.randn_like(q)

        def fb():
            q.grad = k.grad = v.grad = None
            sparse_attention(q, k, v, lay, backend="triton").backward(go)

        eager = ms(fb)
        try:
            g = capture_graph(fb, mode)
            replay = ms(g.replay)
            ref = [t.grad.clone() for t in (q, k, v)]
            fb()
            same = all(torch.equal(a, t.grad) for a, t in zip(ref, (q, k, v)))
            print(f"{name}: eager {eager:.3f} ms, graph replay {replay:.3f} ms, grads equal eager: {same}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name}: capture ({mode}) failed: {e!r}"[:400], flush=True)
            break
else:
    for backend in ("auto", "dense"):
        cfg = load_preset("enwik8", recompute=False, dropout=0.0, backend=backend, loss_chunk=0)
        model = SparseTransformer(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)
        step = make_train_step(model, opt, torch.randint(0, 256, (1, cfg.n_ctx), device="cuda"))
        eager = ms(step)
        try:
            g = capture_graph(step, mode)
            print(f"enwik8 {backend}: eager step {eager:.1f} ms, graph replay {ms(g.replay):.1f} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"enwik8 {backend}: capture ({mode}) failed: {e!r}"[:400], flush=True)
        del model, opt, step
        torch.cuda.empty_cache()
