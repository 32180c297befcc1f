"""Float64 reference of the MoE experts: a plain loop over (token, slot) pairs."""

import torch


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * W2[e] @ (act(gate) * up)``, ``[gate; up] = W13[e] @ hidden[t]``, in float64
    (differentiable: gradcheck and the backward tests use it)."""
    h, a, b, w = (t.double() for t in (hidden, w13, w2, topk_weights))
    intermediate = b.shape[2]
    act = torch.nn.functional.silu if activation == "silu" else torch.nn.functional.gelu
    rows = []
    for t in range(h.shape[0]):
        total = torch.zeros(h.shape[1], dtype=torch.float64, device=h.device)
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate_up = a[e] @ h[t]
            total = total + w[t, j] * (b[e] @ (act(gate_up[:intermediate]) * gate_up[intermediate:]))
        rows.append(total)
    return torch.stack(rows) if rows else h.new_zeros(h.shape)
