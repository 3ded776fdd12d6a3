"""Small helpers several test files share."""
import socket

import torch


def randomize(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Add N(0, std) to every parameter (LayerNorm scales stay near 1, biases and the zeroed head
    move), so a swapped or dropped tensor shows in the outputs; returns the model in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
