"""Shared correctness machinery: the tests and `python -m torch_ext check` both use it.

The rule for every op: compare against a float64 reference by relative norm error
``||out - ref|| / ||ref||`` with a bound per dtype, on fresh random inputs, with outputs
poisoned (NaN) before the run so that an element the kernel forgot to write fails the check.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch

# Relative norm error bounds for a result computed in fp32 and rounded once to the dtype.
# Unit roundoff is 2^-24 (fp32), 2^-11 (fp16), 2^-8 (bf16); a norm of many independently
# rounded elements sits near u/sqrt(3), and the bounds leave about 4x margin above that
# plus room for fp32 accumulation in reductions.
RELATIVE_ERROR_BOUNDS: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def available_devices() -> list[str]:
    """'cpu', plus 'cuda' when a CUDA device is usable."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fresh_seed() -> int:
    """A new random seed per call (from the OS), reported in failure messages."""
    return int.from_bytes(os.urandom(4), "little")


def random_tensor(shape: Sequence[int], dtype: torch.dtype, device: str | torch.device, seed: int,
                  scale: float = 1.0) -> torch.Tensor:
    """Standard-normal values times `scale`, drawn in float64 on the CPU, then cast."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * scale
    return values.to(device=device, dtype=dtype)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Inside the block, every tensor an op allocates with empty() starts as NaN.

    Uses torch's deterministic mode, which fills uninitialized floating memory with NaN (and
    integer memory with the largest value) on every device; ops call at::empty for their
    outputs, so any element a kernel does not write stays NaN and fails the comparison.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN if out holds a NaN that ref does not)."""
    out64 = out.detach().to(device="cpu", dtype=torch.float64)
    ref64 = ref.detach().to(device="cpu", dtype=torch.float64)
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if torch.isnan(out64).any() and not torch.isnan(ref64).any():
        return float("nan")
    denominator = ref64.norm().item()
    numerator = (out64 - ref64).norm().item()
    if denominator == 0.0:
        return numerator
    return numerator / denominator


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "",
                              bound: float | None = None) -> float:
    """Assert rel. norm error <= the dtype's bound and that no element is NaN. Returns the error."""
    limit = RELATIVE_ERROR_BOUNDS[dtype] if bound is None else bound
    error = relative_error(out, ref)
    if not error <= limit:  # also catches NaN
        unwritten = int(torch.isnan(out.detach().float()).sum().item())
        raise AssertionError(
            f"{what}: relative error {error:.3e} exceeds {limit:.1e} for {dtype}"
            + (f" ({unwritten} NaN elements: unwritten or invalid)" if unwritten else "")
        )
    return error


def check_against_reference(op: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
                            make_inputs: Callable[[int], tuple], dtype: torch.dtype, what: str,
                            bound: float | None = None) -> float:
    """Draw inputs with a fresh seed, run `op` with poisoned outputs, compare to `reference`.

    `reference` receives the same inputs on the CPU, floating-point ones upcast to float64.
    """
    seed = fresh_seed()
    inputs = make_inputs(seed)
    with poisoned_outputs():
        out = op(*inputs)
    ref_inputs = tuple(
        (t.detach().to(device="cpu", dtype=torch.float64) if t.is_floating_point() else t.detach().cpu())
        if isinstance(t, torch.Tensor) else t
        for t in inputs
    )
    ref = reference(*ref_inputs)
    return assert_close_to_reference(out, ref, dtype, f"{what} (seed {seed})", bound)


def randomize_moe_model_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every parameter of a (small, test-sized) transformers model drawn from N(0, std), and
    DeepSeek-style routers' score-correction biases from N(0, 0.05) (zero at init, which would
    hide how they enter the routing); returns the model."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=std)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(std=0.05)
    return model


def train_step_gradients(stock: torch.nn.Module, converted: torch.nn.Module,
                         ids: torch.Tensor) -> dict[str, torch.nn.Parameter]:
    """One language-model loss backward through both models (labels = ids); the stock model's
    parameters by name, their .grad set, to compare the converted model's with."""
    for model in (stock, converted):
        model(ids, labels=ids).loss.backward()
    return dict(stock.named_parameters())


def logits_error(stock: torch.nn.Module, converted: torch.nn.Module, ids: torch.Tensor) -> float:
    """The converted model's logits against the stock model's (relative norm error), no autograd."""
    with torch.no_grad():
        return relative_error(converted(ids).logits, stock(ids).logits)
