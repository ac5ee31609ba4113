"""torch.library registration: opcheck (schema, fake tensors, autograd, AOT dispatch) and
torch.compile(fullgraph=True) of a model that calls both attention ops."""
import pytest
import torch

import pargo_kernels as pk
from pargo_kernels.masks import BandMask, PartialGlobalMask
from pargo_kernels.testing import assert_close, randn

pytestmark = pytest.mark.triton  # both tests run the Triton backend (the registered ops' own)

MASKS = {
    "pg1d": PartialGlobalMask(20, 37, 13),
    "pg2d": PartialGlobalMask(9, 35, 6, (5, 7), (3, 2)),
    "band": BandMask(21, 4, 2),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_opcheck_forward_and_backward(name, device):
    mask = MASKS[name]
    q = randn((2, 2, mask.n_query, 16), torch.float32, device)
    k = randn((2, 2, mask.n_key, 16), torch.float32, device)
    v = randn((2, 2, mask.n_key, 24), torch.float32, device)
    args = (q, k, v, mask.kind, list(mask.params), 0.25, "triton")
    torch.library.opcheck(torch.ops.pargo.masked_attention_fwd.default, args)
    out, lse = torch.ops.pargo.masked_attention_fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pargo.masked_attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, *args[3:]))


class TinyParGoLayer(torch.nn.Module):
    """Banded self-attention among partial queries, then partial-global cross-attention."""

    def __init__(self, n_partial, n_global, width, heads, window, backend):
        super().__init__()
        self.n_partial, self.heads, self.window, self.backend = n_partial, heads, window, backend
        self.queries = torch.nn.Parameter(torch.randn(n_partial + n_global, width))
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.q = torch.nn.Linear(width, width)
        self.kv = torch.nn.Linear(width, 2 * width)

    def _heads(self, x):
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, feats):
        b = feats.shape[0]
        x = self.queries.expand(b, -1, -1)
        q, k, v = self.qkv(x[:, : self.n_partial]).chunk(3, dim=-1)
        part = pk.band_attention(self._heads(q), self._heads(k), self._heads(v), self.window,
                                 backend=self.backend)
        part = part.transpose(1, 2).reshape(b, self.n_partial, -1)
        x = torch.cat([x[:, : self.n_partial] + part, x[:, self.n_partial:]], dim=1)
        k, v = self.kv(feats).chunk(2, dim=-1)
        out = pk.partial_global_attention(self._heads(self.q(x)), self._heads(k), self._heads(v),
                                          self.n_partial, backend=self.backend)
        return out.transpose(1, 2).reshape(b, x.shape[1], -1)


def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    model = TinyParGoLayer(12, 4, 32, 2, (3, 0), "triton").to(device)
    feats = torch.randn(2, 30, 32, device=device)
    eager = model(feats)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(feats)
    out.square().sum().backward()
    assert_close("compiled out", out, eager, torch.float32)
    for (name, p), g in zip(model.named_parameters(), eager_grads):
        assert_close(f"compiled grad {name}", p.grad, g, torch.float32)
