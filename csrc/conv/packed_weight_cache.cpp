#include "conv/packed_weight_cache.h"

#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <list>
#include <mutex>
#include <vector>

namespace torch_ext {
namespace {

// Large enough for the convolution weights of common vision models (ResNet-50: 94 MB in
// fp32), small enough not to matter beside them.
constexpr int64_t kBudgetBytes = int64_t(256) << 20;
// Weights remembered without panels (seen once); bounds the bookkeeping in training loops.
constexpr size_t kMaxEntries = 1024;

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  int64_t version;
  const void* data;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  int isa;
  int64_t variant;
  at::Tensor packed;  // undefined until the second call

  bool matches(const at::Tensor& w, int want_isa, int64_t want_variant) const {
    return !impl.expired() && impl._unsafe_get_target() == w.unsafeGetTensorImpl() &&
           version == int64_t(w._version()) && data == w.data_ptr() && isa == want_isa && variant == want_variant &&
           dtype == w.scalar_type() && w.sizes() == at::IntArrayRef(sizes) && w.strides() == at::IntArrayRef(strides);
  }
  int64_t bytes() const { return packed.defined() ? int64_t(packed.nbytes()) : 0; }
};

struct Cache {
  std::mutex mutex;
  std::list<Entry> entries;  // most recently used first
  int64_t bytes = 0;
};

Cache& cache() {
  static Cache instance;
  return instance;
}

}  // namespace

at::Tensor cached_packed_weight(const at::Tensor& weight, int isa, int64_t variant,
                                const std::function<at::Tensor()>& pack) {
  if (weight.is_inference()) return at::Tensor();  // no version counter: in-place writes would go unseen
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
    if (!it->matches(weight, isa, variant)) continue;
    c.entries.splice(c.entries.begin(), c.entries, it);
    Entry& hit = c.entries.front();
    if (!hit.packed.defined()) {  // second sighting at this version: keep the panels
      hit.packed = pack();
      c.bytes += hit.bytes();
      while (c.bytes > kBudgetBytes && c.entries.size() > 1) {
        c.bytes -= c.entries.back().bytes();
        c.entries.pop_back();
      }
    }
    return hit.packed;
  }
  // First sighting: forget stale entries of this weight (older versions) and expired ones,
  // remember this one without panels.
  for (auto it = c.entries.begin(); it != c.entries.end();) {
    if (it->impl.expired() || it->impl._unsafe_get_target() == weight.unsafeGetTensorImpl()) {
      c.bytes -= it->bytes();
      it = c.entries.erase(it);
    } else {
      ++it;
    }
  }
  c.entries.push_front(Entry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                 weight.getIntrusivePtr()),
                             int64_t(weight._version()), weight.data_ptr(), weight.sizes().vec(),
                             weight.strides().vec(), weight.scalar_type(), isa, variant, at::Tensor()});
  if (c.entries.size() > kMaxEntries) {
    c.bytes -= c.entries.back().bytes();
    c.entries.pop_back();
  }
  return at::Tensor();
}

at::Tensor find_packed_weight(const at::Tensor& weight, int isa, int64_t variant) {
  if (weight.is_inference()) return at::Tensor();
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
    if (!it->matches(weight, isa, variant) || !it->packed.defined()) continue;
    c.entries.splice(c.entries.begin(), c.entries, it);
    return c.entries.front().packed;
  }
  return at::Tensor();
}

int64_t clear_packed_weight_cache() {
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  const int64_t released = c.bytes;
  c.entries.clear();
  c.bytes = 0;
  return released;
}

int64_t packed_weight_cache_bytes() {
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  return c.bytes;
}

bool packed_weight_cache_has_room(int64_t bytes) {
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  return c.bytes + bytes <= kBudgetBytes;
}

}  // namespace torch_ext
