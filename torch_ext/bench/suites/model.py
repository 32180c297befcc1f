"""Model suite: the one-line promise measured end to end. A transformers Llama decoder with
Llama-3-8B's layer shapes (hidden 4096, MLP 14336, 32 query / 8 KV heads; a few layers, a small
vocabulary, random init) runs one token (``use_cache=False``, under ``no_grad`` as generation
does) stock, against the same model after ``torch_ext.quant.quantize_model`` (4-bit weight-only
g128, or int8 W8A8 with LLM.int8() outliers; lm_head kept dense). One token is a decode step's
linear work: each weight read once. A prompt of 128 tokens is a prefill's: the linears become
GEMMs. On CUDA each pair also runs as a CUDA graph replay on both
sides: eager, one token through transformers costs about 1 ms of host time per layer on the
H100 machine (docs/perf/gpu-h100.md), more than the layer's kernels, so only the graphed rows
measure the GPU."""

from __future__ import annotations

import copy
import functools

import torch

from ..case import Case, register_suite

_LAYERS = {"cpu": 2, "cuda": 4}
_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}
_VOCAB = 4096
_METHODS = {"4-bit g128": dict(method="weight_only", bits=4, group_size=128), "int8 W8A8": dict(method="int8")}


@functools.lru_cache(maxsize=None)
def _stock(device: str):
    """The stock Llama model of the suite's config, or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    kind = torch.device(device).type
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=_LAYERS[kind],
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=_VOCAB,
                                      max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(config).to(_DTYPE[kind]).eval()


@functools.lru_cache(maxsize=None)
def _quantized(device: str, method: str):
    from torch_ext.quant import quantize_model

    return quantize_model(copy.deepcopy(_stock(device)), skip=lambda name: name == "lm_head", **_METHODS[method])


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one token's forward reads: every parameter and buffer but the embedding table
    (one row of it)."""
    embedding = model.get_input_embeddings().weight
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t is not embedding]
    return sum(t.numel() * t.element_size() for t in tensors)


def _forward(model):
    def run(input_ids):
        with torch.no_grad():
            return model(input_ids, use_cache=False).logits
    return run


def _graphed(run):
    """``run`` captured in a CUDA graph at its first call (after two warm-up calls on a side
    stream: lazy initializations, allocations); later calls copy the input into the captured
    buffer and replay."""
    state = {}

    def replay(input_ids):
        if not state:
            static_input = input_ids.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    run(static_input)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = run(static_input)
            state.update(graph=graph, input=static_input, output=output)
        state["input"].copy_(input_ids)
        state["graph"].replay()
        return state["output"]
    return replay


_PREFILL_TOKENS = 128


def _forward_case(device: str, method: str, tokens: int = 1, graphs: bool = False) -> Case | None:
    stock = _stock(device)
    if stock is None:
        return None
    quantized = _quantized(device, method)
    kind = torch.device(device).type

    def make_inputs(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return (torch.randint(0, _VOCAB, (1, tokens), generator=gen).to(device),)

    wrap = _graphed if graphs else (lambda run: run)
    short = "bf16" if _DTYPE[kind] == torch.bfloat16 else "fp16"
    shape = "one token" if tokens == 1 else f"prefill {tokens} tokens"
    return Case(
        family="model", op="quantize_model (Llama decode)" if tokens == 1 else "quantize_model (Llama prefill)",
        label=f"Llama-3-8B layers x{_LAYERS[kind]} {shape} {short} {method}" + (" CUDA graphs" if graphs else ""),
        make_inputs=make_inputs, ours=wrap(_forward(quantized)),
        baselines={f"stock transformers {short}": wrap(_forward(stock))},
        bytes=float(_weight_bytes(quantized)), device=device,
        notes={"stock_weight_bytes": _weight_bytes(stock), "layers": _LAYERS[kind]},
        working_set_bytes=_weight_bytes(stock) + _weight_bytes(quantized),
    )


@register_suite("model")
def model_suite(device: str, quick: bool) -> list[Case]:
    """One decode-shaped and one prefill-shaped forward of a Llama-3-8B-shaped decoder, stock vs
    quantize_model (not in quick runs: building and quantizing the model takes tens of seconds)."""
    kind = torch.device(device).type
    if quick or kind not in _LAYERS:
        return []
    cases = [_forward_case(device, method) for method in _METHODS]
    cases += [_forward_case(device, method, tokens=_PREFILL_TOKENS) for method in _METHODS]
    if kind == "cuda":
        cases += [_forward_case(device, method, graphs=True) for method in _METHODS]
    return [case for case in cases if case is not None]
