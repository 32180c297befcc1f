// A cache of CPU-packed convolution weights for inference.
//
// The CPU kernel repacks the weight into fp32 panels on every call: on deep layers with few
// output pixels that is a large share of the call (1.9 of 7.6 ms for 512->512 3x3 at 7x7,
// batch 8). In inference the same weight tensor comes back unchanged call after call, so its
// panels are kept, keyed by the weight's TensorImpl (held weakly, so the address cannot be
// reused while the entry exists), its version counter (any in-place write through autograd's
// view of the tensor invalidates; writes that bypass the counter, through `.data` or another
// tensor sharing the storage, do not: clear_conv_weight_cache() after them), its data pointer,
// sizes, strides and dtype, the CPU ISA level and a caller's `variant` (what else the panel
// layout depends on: the convolution's groups). Inference tensors (made under
// torch.inference_mode) have no version counter and are never cached. A weight is packed into
// the cache on its SECOND call at the same version, so training, where every optimizer step
// writes the weight in place, never pays for a cache copy. Entries are evicted
// least-recently-used beyond a byte budget.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

namespace torch_ext {

// The packed panels for `weight` at ISA level `isa` and layout `variant`: the cached ones, or new
// ones from `pack` when this weight (same version) was seen before; an undefined tensor on a
// first sighting or for an inference tensor (the caller packs into scratch memory).
at::Tensor cached_packed_weight(const at::Tensor& weight, int isa, int64_t variant,
                                const std::function<at::Tensor()>& pack);

// The packed panels of `weight` if the cache holds them (same version, `isa`, `variant`), else an
// undefined tensor; records no sighting and packs nothing (for callers with a path that needs no
// panels).
at::Tensor find_packed_weight(const at::Tensor& weight, int isa, int64_t variant);
// Drops every entry; returns the bytes released.
int64_t clear_packed_weight_cache();

// Bytes held by the cache now.
int64_t packed_weight_cache_bytes();
// Whether `bytes` more fit in the cache's budget without evicting an entry (callers with a path
// that needs no cached panels take it rather than have a model's weights evict each other).
bool packed_weight_cache_has_room(int64_t bytes);

}  // namespace torch_ext
