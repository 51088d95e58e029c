"""G = A Aᵀ in float64 of a 7B adapter's 64 A (8 x 4096, bf16), whole against pieces of k
modules: ms of CPU per adapter, one thread; every variant checked bit-equal to the whole.

    python gram_pieces.py
"""

import time

import torch

torch.set_num_threads(1)
a = torch.randn(64, 8, 4096).to(torch.bfloat16)


def whole(a: torch.Tensor) -> torch.Tensor:
    a64 = a.to(torch.float64)
    return a64 @ a64.transpose(1, 2)


def pieces(a: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.empty(a.shape[0], a.shape[1], a.shape[1], dtype=torch.float64)
    for i in range(0, a.shape[0], k):
        c = a[i:i + k].to(torch.float64)
        torch.bmm(c, c.transpose(1, 2), out=out[i:i + k])
    return out


ref = whole(a)
variants = [("whole", whole)] + [(f"pieces of {k}", lambda a, k=k: pieces(a, k))
                                 for k in (1, 2, 4, 8, 16)]
for name, f in variants:
    assert torch.equal(f(a), ref), name
    for _ in range(3):
        f(a)
    c0 = time.process_time()
    for _ in range(100):
        f(a)
    print(f"{name}: {(time.process_time() - c0) * 10:.2f} ms")
