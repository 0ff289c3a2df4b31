// Packed weights kept across calls, for the CPU and CUDA kernels (the Triton backend has the same
// rule in kernels/pack_cache.py: PackCache): a model called again with unchanged parameters packs nothing.
//
// An entry is found by a tag (what was packed and how: the op, the direction, the dtype, and on
// CUDA the device and stream) and its source tensors. It is valid while every source reads the
// same live storage the same way (a weak reference to the storage, offset, sizes, strides, dtype:
// a slice of a parameter made afresh per call still hits), at the same version counter (bumped by
// every in-place write: optimizer steps, load_state_dict, .copy_) and the same data pointer
// (.data = / set_ swap storage without a bump). A write through `.data` moves neither: after one,
// aspp_fused.clear_caches(model) drops the entries (the pack_cache_clear op). Keyed by stream on
// CUDA, so a hit is always read in stream order after the pack that wrote it.
//
// At most kMaxEntries entries, least recently used first out. Off (every call packs) with
// ASPP_FUSED_FOLD_CACHE=0, for sources that are not parameters requiring grad or views of them
// (cacheable()), and while a CUDA graph is captured (a replay must pack from the weights of its
// time). An optimizer step drops every entry (aspp_fused registers a torch.optim step hook: a
// fused optimizer writes the parameters without bumping their counters).
// Thread-safe: one mutex around lookup and insert; packing runs outside it, on the sources' state
// read before it.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdlib>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

namespace aspp_fused {
namespace pack_cache {

constexpr size_t kMaxEntries = 16;

using WeakStorage = c10::weak_intrusive_ptr<c10::StorageImpl>;

// A source tensor, known by what it reads rather than by its TensorImpl: a view built afresh on
// every call (a slice of a parameter) is the same source as long as it reads the same storage
// (still alive), at the same offset, sizes, strides and dtype, and the storage's tensors were
// not written (the version counter, shared by a base and its views) nor swapped (data pointer).
struct Source {
  std::optional<WeakStorage> storage;  // empty: an undefined (absent) tensor
  int64_t offset = 0;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::kFloat;
  uint32_t version = 0;
  const void* data = nullptr;
};

struct Entry {
  std::string tag;
  std::vector<Source> sources;
  std::shared_ptr<const void> value;
};

struct State {
  std::mutex mu;
  std::list<Entry> entries;  // most recently used first
  int64_t hits = 0, packs = 0;
  uint64_t generation = 0;  // bumped by clear() / drop(): a packing begun before one is not kept
};

inline State& state() {
  static State s;  // inline function: one instance in the library
  return s;
}

inline bool enabled() {
  const char* v = std::getenv("ASPP_FUSED_FOLD_CACHE");
  return v == nullptr || std::string(v) != "0";
}

inline uint32_t version_of(const at::Tensor& t) { return t.unsafeGetTensorImpl()->version_counter().current_version(); }

// Whether t may be a cache source: a parameter that requires grad, or a view of one (eager views
// share their base's version counter). Everything else packs per call:
// - an alias with a counter of its own, which writes to the parameter never bump: a compiled graph
//   hands an op a slice or reshape of a parameter as inductor's reinterpret_tensor (a compiled
//   training step went on with stale projection weights after its first optimizer step so), and
//   `.data` is one too;
// - a compiled graph's intermediate (an autocast cast, a product of weights): inductor reuses its
//   buffers for later values and writes them through raw pointers, bumping no counter, so one
//   op's packing was served to another;
// - a frozen parameter (requires_grad=False): from here it cannot be told from either (the
//   Python caches, which can, keep it: kernels/pack_cache.py);
// - inference tensors: no counter at all.
inline bool cacheable(const at::Tensor& t) {
  if (!t.defined()) return true;
  if (t.is_inference() || !t.has_storage()) return false;
  const at::TensorBase& root = t.is_view() ? t._base() : static_cast<const at::TensorBase&>(t);
  return root.is_leaf() && root.requires_grad();
}

inline Source source_of(const at::Tensor& t) {
  Source s;
  if (!t.defined()) return s;
  s.storage.emplace(c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(t.storage().unsafeGetStorageImpl()));
  s.offset = t.storage_offset();
  s.sizes = t.sizes().vec();
  s.strides = t.strides().vec();
  s.dtype = t.scalar_type();
  s.version = version_of(t);
  s.data = t.data_ptr();
  return s;
}

// Whether s and t read the same memory the same way (s's storage still alive).
inline bool same_view(const Source& s, const at::Tensor& t) {
  if (!t.defined()) return !s.storage.has_value();
  if (!s.storage.has_value() || s.storage->lock().get() != t.storage().unsafeGetStorageImpl()) return false;
  return s.offset == t.storage_offset() && t.sizes().equals(s.sizes) && t.strides().equals(s.strides) &&
         s.dtype == t.scalar_type();
}

inline bool same(const Source& s, const at::Tensor& t) {
  return same_view(s, t) && (!t.defined() || (version_of(t) == s.version && t.data_ptr() == s.data));
}

inline bool dead(const Entry& e) {
  for (const Source& s : e.sources)
    if (s.storage.has_value() && s.storage->expired()) return true;
  return false;
}

// The value make() builds from `sources`, from the cache when the same sources at the same
// versions were packed under `tag` before. V: what make() returns (copied into the cache).
// use = false: pack without the cache (e.g. while a CUDA graph is captured).
template <typename V, typename F>
std::shared_ptr<const V> get(std::string tag, const std::vector<at::Tensor>& sources, F make, bool use = true) {
  bool ok = use && enabled();
  for (const at::Tensor& t : sources) ok = ok && cacheable(t);
  State& st = state();
  if (!ok) {
    std::lock_guard<std::mutex> lock(st.mu);
    ++st.packs;
    return std::make_shared<const V>(make());
  }
  tag += std::string("|") + typeid(V).name();
  uint64_t generation;  // read with the lookup: a drop() after it keeps this call's packing out
  {
    std::lock_guard<std::mutex> lock(st.mu);
    generation = st.generation;
    for (auto it = st.entries.begin(); it != st.entries.end(); ++it) {
      if (it->tag != tag || it->sources.size() != sources.size()) continue;
      bool hit = true;
      for (size_t i = 0; hit && i < sources.size(); ++i) hit = same(it->sources[i], sources[i]);
      if (!hit) continue;
      ++st.hits;
      st.entries.splice(st.entries.begin(), st.entries, it);
      return std::static_pointer_cast<const V>(st.entries.front().value);
    }
  }
  // The sources' state is read before packing: a write (an optimizer step in another thread)
  // during make() then leaves an entry at the old versions, which misses, never one that pairs
  // old weights with new versions.
  Entry e;
  e.tag = std::move(tag);
  for (const at::Tensor& t : sources) e.sources.push_back(source_of(t));
  std::shared_ptr<const V> value = std::make_shared<const V>(make());
  e.value = value;
  std::lock_guard<std::mutex> lock(st.mu);
  ++st.packs;
  if (st.generation != generation) return value;
  // Entries that can never hit again go: a source's storage is gone, or the same views are
  // packed now at newer versions.
  for (auto it = st.entries.begin(); it != st.entries.end();) {
    bool stale = it->tag == e.tag && it->sources.size() == sources.size();
    for (size_t i = 0; stale && i < sources.size(); ++i) stale = same_view(it->sources[i], sources[i]);
    it = stale || dead(*it) ? st.entries.erase(it) : std::next(it);
  }
  st.entries.push_front(std::move(e));
  while (st.entries.size() > kMaxEntries) st.entries.pop_back();
  return value;
}

// [hits, packs, entries] since the library loaded (or the last clear).
inline std::vector<int64_t> info() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  return {st.hits, st.packs, static_cast<int64_t>(st.entries.size())};
}

inline void clear() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  st.entries.clear();
  st.hits = st.packs = 0;
  ++st.generation;
}

// Drops the entries, keeps the counts (after an optimizer step).
inline void drop() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  st.entries.clear();
  ++st.generation;
}

}  // namespace pack_cache
}  // namespace aspp_fused
