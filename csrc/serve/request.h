// din_ext_serve's requests: the package's serving metadata (din_ext.json, written by din_ext.export.serving_metadata)
// and one request with raw ids -> the five tensors of din_ext.export.ServingDIN, as din_ext.serving.DINPredictor
// builds them (same checks, same OOV rule, messages naming the field).
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "json.h"

namespace din_ext::serve {

// A malformed request; the message names the field.
class RequestError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One field's raw id -> table row (rows 1..; every other id is OOV, row 0). The ids are strings when the vocabulary
// holds any string (then an integer id is looked up as its decimal text), else integers.
struct Vocabulary {
  bool strings = false;
  std::unordered_map<std::string, int64_t> string_rows;
  std::unordered_map<int64_t, int64_t> int_rows;
};

struct Metadata {
  std::vector<std::pair<std::string, int64_t>> user_fields;  // (field, table rows), in column order
  std::vector<std::pair<std::string, int64_t>> item_fields;
  std::vector<std::string> history_fields;  // item fields, in column order
  int64_t dense_dim = 0;
  bool use_dense = false;
  std::vector<std::string> tasks;
  std::unordered_map<std::string, Vocabulary> vocabularies;  // every user and item field
};

// The package's din_ext.json; throws std::runtime_error naming `source` and the key for one this program cannot
// serve (another package format, a field without vocabulary: re-export from a checkpoint that has them).
Metadata read_metadata(const Json& meta, const std::string& source);

// ServingDIN's inputs for one request (B = 1): user (1, U) int64, items (1, C, I) int64, hist_offsets (2,) int64,
// hist (L, H) int64, dense (1, dense_dim) float32 ((1, 0) for a model without dense features).
struct ServingInputs {
  at::Tensor user, items, hist_offsets, hist, dense;
};

// Encodes a request {"user": {...}, "history": {...}, "candidates": {...}, "dense": [...]} (DINPredictor's form);
// throws RequestError naming the field.
ServingInputs encode_request(const Metadata& meta, const Json& request);

}  // namespace din_ext::serve
