"""A/B on the CPU (1 thread, process CPU time): proxy shifted-window attention, the previous path (rolled windows +
region mask, one SDPA call) vs the mask-free window groups now used. `python scripts/proxy_windows_ab.py`."""
import time, torch
from dit.attention import build_attention
from dit.attention.proxy import window_partition, shift_region_mask
from dit.attention.softmax import scaled_dot_product
torch.set_num_threads(1)
torch.manual_seed(0)
D, H = 384, 6
op = build_attention("proxy", D, H).eval()
for p in op.parameters(): torch.nn.init.normal_(p, std=0.05)

def old(h, grid, win):
    n, t, d = h.shape
    gh, gw = grid; sh, sw = win[0]//2, win[1]//2
    rows = (torch.arange(gh) + sh) % gh; cols = (torch.arange(gw) + sw) % gw
    order = window_partition((rows[:, None]*gw + cols[None, :]).reshape(1, gh*gw, 1), grid, win).reshape(-1)
    inv = torch.argsort(order); p = win[0]*win[1]
    qkv = op.shift_qkv(h.index_select(1, order)).reshape(n*(t//p), p, 3, H, d//H)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    mask = shift_region_mask(grid, win).unsqueeze(1).repeat(n, 1, 1, 1)
    out = scaled_dot_product(q, k, v, "sdpa", mask)
    return op.shift_proj(out.transpose(1, 2).reshape(n, t, d)).index_select(1, inv)

def new(h, grid, win):
    return op._window_attention(h, op.shift_qkv, op.shift_proj, grid, win, shifted=True)

with torch.inference_mode():
    for side in (16, 32, 64):
        grid = (side, side); win = op.window_for(grid)
        h = torch.randn(1, side*side, D)
        a, b = old(h, grid, win), new(h, grid, win)
        err = (a - b).abs().max().item()
        res = {}
        for name, fn in (("old", old), ("new", new)) * 1:
            fn(h, grid, win)
        ts = {"old": [], "new": []}
        for _ in range(7):
            for name, fn in (("old", old), ("new", new)):
                t0 = time.process_time(); fn(h, grid, win); ts[name].append(time.process_time() - t0)
        print(f"T={side*side:5d} win={win} max|diff|={err:.2e} old {min(ts['old'])*1e3:.1f} ms new {min(ts['new'])*1e3:.1f} ms")
