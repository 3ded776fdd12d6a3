"""Convergence: a tiny 2-block ViT trained 20 steps with the Triton kernels and with torch ops.

The model lives here (kernels must not depend on vit_accel, and this keeps the test
independent of the model module): patch tokens -> 2 pre-norm blocks -> LayerNorm -> head.
Both runs start from the same weights and see the same batches; the Triton run uses
flash_attention, layer_norm with the residual add fused (the add of each sublayer is
folded into the next LayerNorm) and bias_gelu; the torch run uses x + r, F.layer_norm,
F.scaled_dot_product_attention and F.gelu.

Tolerance: fp32 throughout, so per-step losses differ only by summation order, which
Adam's normalized steps amplify slowly: |loss_triton - loss_torch| <= 2e-4 * loss on every
step (observed ~1e-6), and both runs must actually learn (last epoch's mean loss under
half the first's). Batch 4 of 16 samples keeps the interpreter run near 30 s of CPU.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel_tolerance import DEVICE
from vit_accel_kernels.attention import flash_attention
from vit_accel_kernels.bias_gelu import bias_gelu
from vit_accel_kernels.layer_norm import layer_norm

WIDTH, HEADS, DEPTH, MLP, PATCHES, PATCH_DIM, CLASSES = 64, 2, 2, 128, 16, 48, 10
EPS = 1e-6


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH, eps=EPS), nn.LayerNorm(WIDTH, eps=EPS)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, MLP), nn.Linear(MLP, WIDTH)

    def attn(self, y, triton):
        b, n, c = y.shape
        q, k, v = self.qkv(y).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hs)
        o = flash_attention(q, k, v) if triton else F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))

    def mlp(self, y, triton):
        if triton:
            u = bias_gelu(F.linear(y, self.fc1.weight), self.fc1.bias)
        else:
            u = F.gelu(self.fc1(y))
        return self.fc2(u)


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(PATCH_DIM, WIDTH)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, WIDTH))
        self.pos = nn.Parameter(0.02 * torch.randn(1, PATCHES + 1, WIDTH))
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH, eps=EPS)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, patches, triton):
        x = self.embed(patches)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos  # (B, 17, C)
        norms = [n for blk in self.blocks for n in (blk.norm1, blk.norm2)] + [self.norm]

        def norm(i, sub_out=None):
            """LayerNorm number i; with sub_out, first h = h + sub_out (fused on Triton)."""
            nonlocal h
            ln = norms[i]
            if triton:
                if sub_out is None:
                    return layer_norm(h, ln.weight, ln.bias, EPS)
                y, h = layer_norm(sub_out, ln.weight, ln.bias, EPS, residual=h)
                return y
            if sub_out is not None:
                h = h + sub_out
            return F.layer_norm(h, (WIDTH,), ln.weight, ln.bias, EPS)

        y = norm(0)
        for i, blk in enumerate(self.blocks):
            y = norm(2 * i + 1, blk.attn(y, triton))
            y = norm(2 * i + 2, blk.mlp(y, triton))
        return self.head(y[:, 0])


def _train(model, data, labels, triton, steps=20, batch=4):
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    losses = []
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % data.shape[0]
        loss = F.cross_entropy(model(data[idx], triton), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_triton_and_torch_training_agree():
    torch.manual_seed(0)
    data = torch.randn(16, PATCHES, PATCH_DIM, device=DEVICE)  # 4 batches, seen 5 times
    teacher = torch.randn(PATCHES * PATCH_DIM, CLASSES, device=DEVICE)
    labels = (data.flatten(1) @ teacher).argmax(1)  # a learnable labelling
    model = TinyViT().to(DEVICE)
    twin = copy.deepcopy(model)

    torch_losses = _train(model, data, labels, triton=False)
    triton_losses = _train(twin, data, labels, triton=True)

    for step, (a, b) in enumerate(zip(triton_losses, torch_losses)):
        assert abs(a - b) <= 2e-4 * b, f"step {step}: triton loss {a:.6f} vs torch {b:.6f}"
    for losses in (torch_losses, triton_losses):
        first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4  # first vs last epoch
        assert last < 0.5 * first, f"did not learn: epoch loss {first:.4f} -> {last:.4f}"
