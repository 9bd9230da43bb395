// Batch assembly: plan rows -> the batch contract's buffers (fastsft/data/batch.py). Each document's kept tokens and
// mask come in with two pread calls into scratch buffers (no memory map: a shard truncated in place is a
// ShardReadError, not a SIGBUS), then a few tight, vectorizable loops write the row; no allocation per row.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "packing.h"

namespace fastsft {

namespace {

// Positions t in [begin, end) with mask[t] != 0, as pos_offset + t - 1 (the label position of target t), appended
// to out; returns how many. Response spans are contiguous, so 8 mask bytes at a time are usually all 0 or all 1.
inline int64_t compact_supervised(const uint8_t* __restrict__ mask, int64_t begin, int64_t end, int64_t pos_offset,
                                  int32_t* __restrict__ out) {
  constexpr uint64_t kAllOnes = 0x0101010101010101ULL;
  int64_t count = 0, t = begin;
  for (; t + 8 <= end; t += 8) {
    uint64_t chunk;
    std::memcpy(&chunk, mask + t, 8);
    if (chunk == 0) continue;
    const int32_t first = static_cast<int32_t>(pos_offset + t - 1);
    if (chunk == kAllOnes) {
      for (int k = 0; k < 8; ++k) out[count + k] = first + k;
      count += 8;
      continue;
    }
    for (int k = 0; k < 8; ++k) {  // branch-free: always write, advance only on a supervised byte
      out[count] = first + k;
      count += mask[t + k] != 0;  // != 0: a corrupt mask byte must not skip ahead
    }
  }
  for (; t < end; ++t) {
    out[count] = static_cast<int32_t>(pos_offset + t - 1);
    count += mask[t] != 0;
  }
  return count;
}

// One document at position `pos` of a row. Returns the number of supervised positions written to `loss_pos`
// (which has room for the rest of the row). Separate simple loops so each vectorizes.
template <typename Token>
int64_t fill_document(const Token* __restrict__ tokens, const uint8_t* __restrict__ mask, int64_t length, int64_t pos,
                      int64_t* __restrict__ input_ids, int32_t* __restrict__ position_ids,
                      int64_t* __restrict__ labels, int32_t* __restrict__ loss_pos) {
  int64_t* __restrict__ ids = input_ids + pos;
  int32_t* __restrict__ positions = position_ids + pos;
  int64_t* __restrict__ lab = labels + pos;
  for (int64_t t = 0; t < length; ++t) ids[t] = static_cast<int64_t>(tokens[t]);
  for (int64_t t = 0; t < length; ++t) positions[t] = static_cast<int32_t>(t);
  // labels[t] = tokens[t + 1] where mask[t + 1] else IGNORE: select by an all-ones / all-zeros AND, no branch
  for (int64_t t = 0; t + 1 < length; ++t) {
    const int64_t keep = -static_cast<int64_t>(mask[t + 1] != 0);
    lab[t] = ((static_cast<int64_t>(tokens[t + 1]) - kIgnoreIndex) & keep) + kIgnoreIndex;
  }
  lab[length - 1] = kIgnoreIndex;
  return compact_supervised(mask, 1, length, pos, loss_pos);
}

// Largest token id of a document (vectorizes): the per-document vocabulary check before the ids reach the model.
template <typename Token>
int64_t max_token(const Token* __restrict__ tokens, int64_t length) {
  Token best = 0;
  for (int64_t t = 0; t < length; ++t) best = std::max(best, tokens[t]);
  return static_cast<int64_t>(best);
}

void validate_row(const Corpus& corpus, const int64_t* row_ptr, int64_t num_plan_rows, int64_t num_row_docs,
                  const int64_t* row_docs, const int64_t* eff_len, int64_t row, const BatchBuffers& out) {
  auto fail = [&](const std::string& what) {
    throw std::invalid_argument("assemble_rows: plan row " + std::to_string(row) + ": " + what);
  };
  if (row < 0 || row >= num_plan_rows) fail("row index out of range of the plan");
  const int64_t begin = row_ptr[row], end = row_ptr[row + 1];
  if (begin < 0 || end < begin || end > num_row_docs) fail("corrupt row_ptr");
  if (end - begin > out.max_docs) fail("more documents than max_docs");
  int64_t total = 0;
  for (int64_t k = begin; k < end; ++k) {
    const int64_t doc = row_docs[k];
    if (doc < 0 || doc >= corpus.num_docs()) fail("document id out of range");
    auto [shard, local] = corpus.locate(doc);
    const ShardView& view = corpus.shards[shard];
    const int64_t length = view.offsets[local + 1] - view.offsets[local];
    if (eff_len[doc] < 1 || eff_len[doc] > length) fail("effective length outside [1, document length]");
    total += eff_len[doc];
  }
  if (total > out.seq_len) fail("documents longer than seq_len in total");
}

}  // namespace

void assemble_rows(const Corpus& corpus, const int64_t* row_ptr, int64_t num_plan_rows, const int64_t* row_docs,
                   int64_t num_row_docs, const int64_t* eff_len, const int64_t* rows, int64_t num_rows,
                   const BatchBuffers& out) {
  for (int64_t i = 0; i < num_rows; ++i) {
    validate_row(corpus, row_ptr, num_plan_rows, num_row_docs, row_docs, eff_len, rows[i], out);
  }
  const int64_t S = out.seq_len, cu_len = out.max_docs + 2;
  std::vector<int32_t> loss_scratch(S + 1);
  std::vector<uint32_t> token_scratch(S);  // room for S ids of either width
  std::vector<uint8_t> mask_scratch(S);
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t row = rows[i];
    int64_t* input_ids = out.input_ids + i * S;
    int32_t* position_ids = out.position_ids + i * S;
    int64_t* labels = out.labels + i * S;
    int32_t* cu_seqlens = out.cu_seqlens + i * cu_len;
    int32_t* loss_positions = out.loss_positions + i * out.bucket;

    int64_t pos = 0, num_loss = 0, num_docs = 0;
    cu_seqlens[0] = 0;
    for (int64_t k = row_ptr[row]; k < row_ptr[row + 1]; ++k) {
      const int64_t doc = row_docs[k];
      auto [shard, local] = corpus.locate(doc);
      const ShardView& view = corpus.shards[shard];
      const int64_t start = view.offsets[local], length = eff_len[doc];
      read_exact(view, token_scratch.data(), length * view.itemsize, view.tokens_start + start * view.itemsize);
      read_exact(view, mask_scratch.data(), length, view.mask_start + start);
      const uint8_t* mask = mask_scratch.data();
      int64_t written, largest;
      if (view.itemsize == 2) {
        const uint16_t* tokens = reinterpret_cast<const uint16_t*>(token_scratch.data());
        largest = max_token(tokens, length);
        written = fill_document(tokens, mask, length, pos, input_ids, position_ids, labels,
                                loss_scratch.data() + num_loss);
      } else {
        const uint32_t* tokens = token_scratch.data();
        largest = max_token(tokens, length);
        written = fill_document(tokens, mask, length, pos, input_ids, position_ids, labels,
                                loss_scratch.data() + num_loss);
      }
      if (out.vocab_size > 0 && largest >= out.vocab_size) {
        throw ShardReadError(view.path + ": document " + std::to_string(local) + " holds token id " +
                             std::to_string(largest) + ", outside the vocabulary of " +
                             std::to_string(out.vocab_size) + ": the shard is corrupt (changed since it was " +
                             "verified?); re-run `fastsft prepare` or restore the file");
      }
      num_loss += written;
      pos += length;
      cu_seqlens[++num_docs] = static_cast<int32_t>(pos);
    }
    // Padding tail: its own segment (positions restart at 0), never supervised.
    std::fill(input_ids + pos, input_ids + S, kPadId);
    for (int64_t t = pos; t < S; ++t) position_ids[t] = static_cast<int32_t>(t - pos);
    std::fill(labels + pos, labels + S, kIgnoreIndex);
    std::fill(cu_seqlens + num_docs + 1, cu_seqlens + cu_len, static_cast<int32_t>(S));
    if (num_loss > out.bucket) {
      throw std::invalid_argument("assemble_rows: plan row " + std::to_string(row) + " has " +
                                  std::to_string(num_loss) + " supervised positions, more than the loss bucket of " +
                                  std::to_string(out.bucket));
    }
    std::memcpy(loss_positions, loss_scratch.data(), num_loss * sizeof(int32_t));
    std::fill(loss_positions + num_loss, loss_positions + out.bucket, kLossPositionFill);
    out.counts[i * 3 + 0] = num_loss;
    out.counts[i * 3 + 1] = pos;
    out.counts[i * 3 + 2] = num_docs;
  }
}

}  // namespace fastsft
