// fastsft._C: the packing loader's C++ core. The algorithm is specified (and implemented in numpy, byte for byte the
// same) in fastsft/data/packing_ref.py; read that docstring first. This header is shared by packing.cpp (plan of an
// epoch), assembly.cpp (plan rows -> batch buffers) and bindings.cpp (the pybind11 module; numpy in, numpy out).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastsft {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMix2 = 0x94D049BB133111EBULL;
constexpr uint64_t kDocStream = 0;
constexpr uint64_t kRowStream = 1;
constexpr int kMaxFitProbes = 32;
constexpr int64_t kIgnoreIndex = -100;
constexpr int64_t kPadId = 0;
constexpr int32_t kLossPositionFill = -1;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * kMix1;
  z = (z ^ (z >> 27)) * kMix2;
  return z ^ (z >> 31);
}

inline uint64_t stream_state(uint64_t seed, uint64_t epoch, uint64_t stream) {
  return mix64(mix64(mix64(seed) + epoch) + stream);
}

struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t s) : state(s) {}
  uint64_t next() { return mix64(state += kGamma); }
  uint64_t below(uint64_t n) { return next() % n; }
};

template <typename T>
void shuffle_in_place(std::vector<T>& items, SplitMix64& rng) {
  for (int64_t i = static_cast<int64_t>(items.size()) - 1; i >= 1; --i) {
    int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    std::swap(items[i], items[j]);
  }
}

// One shard file, as validated by fastsft/data/shards.py. Batch assembly reads it through a read-only memory map
// (`base`, owned by bindings.cpp's PyCorpus) under a SIGBUS guard (assembly.cpp): a file truncated in place while
// mapped is a ShardReadError naming it, never a crash. base == nullptr: pread only (Corpus(..., mmap=False)). The
// length scan always uses pread. The file descriptor stays owned by Python.
struct ShardView {
  int fd;
  int itemsize;              // token bytes: 2 (uint16) or 4 (uint32)
  int64_t tokens_start;      // file offset of token 0
  int64_t mask_start;        // file offset of mask byte 0
  const int64_t* offsets;    // num_docs + 1, in memory
  int64_t num_docs;
  int64_t num_tokens;
  std::string path;
  const uint8_t* base = nullptr;  // the whole file mapped PROT_READ, or nullptr
  int64_t map_size = 0;           // bytes mapped (the file size when the corpus was built)
};

// A read that came back short or failed: the message names the file (bindings.cpp maps it to a Python error).
struct ShardReadError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Reads exactly `nbytes` at file offset `offset` of `shard` into `dst`, or throws ShardReadError.
void read_exact(const ShardView& shard, void* dst, int64_t nbytes, int64_t offset);

// Documents of several shards, indexed globally.
struct Corpus {
  std::vector<ShardView> shards;
  std::vector<int64_t> doc_starts;  // shards.size() + 1

  int64_t num_docs() const { return doc_starts.back(); }
  // (shard index, local document index) of a global document id in [0, num_docs()).
  std::pair<int, int64_t> locate(int64_t doc) const;
};

struct PlanConfig {
  int64_t seq_len;
  int64_t max_docs;
  int64_t loss_budget;  // supervised positions allowed per row (seq_len when there is no loss bucket)
  int64_t window;
  uint64_t seed;
  uint64_t epoch;
  int64_t world_size;
  bool drop_last;
};

struct Plan {
  std::vector<int64_t> row_ptr;   // rows + 1
  std::vector<int64_t> row_docs;  // document ids, row after row
};

// eff_len / supervised: outputs of size corpus.num_docs(). supervised counts positions t < eff_len - 1 whose next
// token carries loss, with or without a bucket; loss_bucket < 0: no bucket (no cap).
void effective_lengths(const Corpus& corpus, int64_t seq_len, int64_t loss_bucket, bool drop_long, int64_t* eff_len,
                       int64_t* supervised);

Plan plan_epoch(const int64_t* eff_len, const int64_t* supervised, int64_t num_docs, const PlanConfig& cfg);

struct BatchBuffers {
  int64_t* input_ids;       // [rows, seq_len]
  int32_t* position_ids;    // [rows, seq_len]
  int64_t* labels;          // [rows, seq_len]
  int32_t* cu_seqlens;      // [rows, max_docs + 2]
  int32_t* loss_positions;  // [rows, bucket]
  int64_t* counts;          // [rows, 3]: num_loss_tokens, num_tokens, num_docs
  int64_t seq_len;
  int64_t max_docs;
  int64_t bucket;
  int64_t vocab_size;  // > 0: a token id >= vocab_size throws ShardReadError naming the file and document
};

// Fills buffer row i with plan row rows[i]. Validates every row first (ids in range, lengths, capacity) and throws
// std::invalid_argument before writing anything if the plan does not fit the buffers; a failed read or an id outside
// the vocabulary throws ShardReadError.
void assemble_rows(const Corpus& corpus, const int64_t* row_ptr, int64_t num_plan_rows, const int64_t* row_docs,
                   int64_t num_row_docs, const int64_t* eff_len, const int64_t* rows, int64_t num_rows,
                   const BatchBuffers& out);

}  // namespace fastsft
