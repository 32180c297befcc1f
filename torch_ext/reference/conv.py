"""References for the convolution ops (float64 through PyTorch's own convolution)."""

import torch
import torch.nn.functional as F


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


def im2win_transform(input: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """window[n][c][i][m*R + h] = padded_input[n][c][i*sh + h*dh][m], m < window width."""
    (r, s), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    padded = F.pad(input, (pw, pw, ph, ph))
    ho = (padded.shape[2] - dh * (r - 1) - 1) // sh + 1
    wo = (padded.shape[3] - dw * (s - 1) - 1) // sw + 1
    width = (wo - 1) * sw + (s - 1) * dw + 1
    rows = [padded[:, :, torch.arange(ho) * sh + h * dh, :width] for h in range(r)]  # R x [N, C, Ho, width]
    return torch.stack(rows, dim=-1).reshape(*rows[0].shape[:3], width * r)
