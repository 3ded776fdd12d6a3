"""The Triton kernels under torch.compile: registered as torch.library custom ops, they are
opaque to Dynamo, so a ViT built with every kernel compiles as one graph (fullgraph=True) and
computes what it computes eagerly, gradients included. torch.library.opcheck checks each op's
fake implementation, schema and autograd registration. Runs under the interpreter on the CPU
and unchanged on a GPU."""
import pytest
import torch

from vit_accel_kernels import attention, bias_gelu, layer_norm
from vit_accel.model import create_vit

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_opcheck_every_op():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    torch.library.opcheck(attention._fwd_op, (q, k, v, 0.25))
    x = torch.randn(5, 3, 40, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(40, generator=g).to(DEVICE).requires_grad_()
    torch.library.opcheck(bias_gelu._fwd_op, (x, b, "none"))
    w = torch.randn(40, generator=g).to(DEVICE).requires_grad_()
    r = torch.randn(5, 3, 40, generator=g).to(DEVICE).requires_grad_()
    torch.library.opcheck(layer_norm._fwd_op, (x, w, b, 1e-6, r))
    torch.library.opcheck(layer_norm._fwd_op, (x, w, b, 1e-6, None))


@pytest.mark.slow
def test_vit_with_every_kernel_compiles_as_one_graph():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, depth=2, num_classes=5, width=64, num_heads=4,
              attn_impl="triton", norm_impl="triton", mlp_impl="triton")
    eager = create_vit("vit-ti16", **kw).to(DEVICE)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    compiled = create_vit("vit-ti16", **kw).to(DEVICE)
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True)  # a graph break would raise here
    x = torch.randn(3, 3, 32, 32, device=DEVICE)
    y = torch.tensor([0, 3, 4], device=DEVICE)
    losses = []
    for model in (eager, step):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
