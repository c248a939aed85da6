#include "request.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace din_ext::serve {
namespace {

constexpr int64_t kPackageFormat = 1;  // din_ext.export.PACKAGE_FORMAT: the din_ext.json this program reads
constexpr int64_t kOov = 0;            // din_ext.data.core.OOV: the row of every id outside the vocabulary

std::string field_text(const std::string& field) { return "'" + field + "'"; }

// ['a', 'b'], as the Python predictor prints a list of fields.
std::string field_list(const std::vector<std::string>& fields) {
  std::string out = "[";
  for (size_t i = 0; i < fields.size(); ++i) out += (i ? ", " : "") + field_text(fields[i]);
  return out + "]";
}

// A value as a message shows it: scalars as written, containers by type.
std::string shown(const Json& value) {
  switch (value.kind) {
    case Json::Kind::Null: return "null";
    case Json::Kind::Bool: return value.boolean ? "true" : "false";
    case Json::Kind::Number: return "the number " + value.text;
    case Json::Kind::String: return "the string " + quote_json(value.text);
    default: return std::string("an ") + value.type_name();
  }
}

// -- the metadata ---------------------------------------------------------------------------------------------

class MetadataReader {
 public:
  MetadataReader(const Json& meta, const std::string& source) : meta_(meta), source_(source) {
    if (meta.kind != Json::Kind::Object) fail("din_ext.json must hold an object, got " + shown(meta));
  }

  [[noreturn]] void fail(const std::string& reason) const { throw std::runtime_error(source_ + ": " + reason); }

  const Json& get(const std::string& key, Json::Kind kind) const {
    const Json* value = meta_.find(key);
    if (!value || value->kind != kind) fail("din_ext.json: '" + key + "' is missing or not of the expected type");
    return *value;
  }

  int64_t integer(const Json& value, const std::string& where) const {
    auto n = value.as_int64();
    if (!n || *n < 0) fail("din_ext.json: " + where + " must be a non-negative integer, got " + shown(value));
    return *n;
  }

  std::vector<std::pair<std::string, int64_t>> tables(const std::string& key) const {
    std::vector<std::pair<std::string, int64_t>> out;
    for (const auto& [field, rows] : get(key, Json::Kind::Object).members) {
      out.emplace_back(field, integer(rows, key + "[" + field_text(field) + "]"));
    }
    return out;
  }

  std::vector<std::string> names(const std::string& key) const {
    std::vector<std::string> out;
    for (const Json& name : get(key, Json::Kind::Array).items) {
      if (name.kind != Json::Kind::String) fail("din_ext.json: '" + key + "' must hold strings, got " + shown(name));
      out.push_back(name.text);
    }
    return out;
  }

  // Rows 1.. of the raw ids (the later of two equal ids wins, as in the Python predictor's dict).
  Vocabulary vocabulary(const std::string& field, int64_t table_rows) const {
    const Json* ids = get("vocabularies", Json::Kind::Object).find(field);
    if (!ids) {
      fail("has no vocabulary of field " + field_text(field) +
           ", so raw ids cannot be mapped to rows: re-export from a checkpoint that has them (trained with this "
           "din_ext version)");
    }
    std::string where = "vocabularies[" + field_text(field) + "]";
    if (ids->kind != Json::Kind::Array) fail("din_ext.json: " + where + " must be an array, got " + shown(*ids));
    if (static_cast<int64_t>(ids->items.size()) > table_rows) {
      fail("din_ext.json: " + where + " has " + std::to_string(ids->items.size()) + " ids, more than the " +
           std::to_string(table_rows) + " rows of its table");
    }
    Vocabulary vocab;
    for (size_t row = 1; row < ids->items.size(); ++row) {
      const Json& id = ids->items[row];
      if (id.kind == Json::Kind::String) vocab.strings = true;
      bool usable = id.kind == Json::Kind::Null || id.kind == Json::Kind::String || id.as_int64();
      if (!usable) fail("din_ext.json: " + where + " holds " + shown(id) + ", not an int64 or string id");
    }
    // A string vocabulary looks ids up as text, so its integer entries (if any) are never matched, as in Python.
    for (size_t row = 1; row < ids->items.size(); ++row) {
      const Json& id = ids->items[row];
      if (vocab.strings && id.kind == Json::Kind::String) vocab.string_rows[id.text] = static_cast<int64_t>(row);
      if (!vocab.strings && id.kind == Json::Kind::Number) vocab.int_rows[*id.as_int64()] = static_cast<int64_t>(row);
    }
    return vocab;
  }

 private:
  const Json& meta_;
  const std::string& source_;
};

// -- a request ------------------------------------------------------------------------------------------------

int64_t row_of(const Vocabulary& vocab, const Json& id, const std::string& where, const std::string& field) {
  if (id.kind == Json::Kind::Null) return kOov;
  if (id.kind == Json::Kind::String) {
    if (!vocab.strings) {
      throw RequestError(where + ": field " + field_text(field) + " has integer ids, got " + shown(id));
    }
    auto it = vocab.string_rows.find(id.text);
    return it == vocab.string_rows.end() ? kOov : it->second;
  }
  if (!id.is_integer()) throw RequestError(where + ": ids must be ints or strings, got " + shown(id));
  if (vocab.strings) {  // Python's str(int): the literal itself, as JSON integers have no leading zeros or '+'
    auto it = vocab.string_rows.find(id.text == "-0" ? "0" : id.text);
    return it == vocab.string_rows.end() ? kOov : it->second;
  }
  auto value = id.as_int64();  // an id beyond int64 is in no vocabulary (read_metadata checked them all)
  if (!value) return kOov;
  auto it = vocab.int_rows.find(*value);
  return it == vocab.int_rows.end() ? kOov : it->second;
}

// The rows of `key`'s fields, an object field -> list of ids, every list as long as the first; rows[i][f].
std::vector<std::vector<int64_t>> columns(const Metadata& meta, const Json& request, const std::string& key,
                                          const std::vector<std::string>& fields) {
  const Json* part = request.find(key);
  if (!part || part->kind != Json::Kind::Object) {
    throw RequestError("'" + key + "' must be an object field -> ids, got " + (part ? shown(*part) : "nothing"));
  }
  std::vector<std::string> missing, unknown;
  for (const auto& field : fields) {
    if (!part->find(field)) missing.push_back(field);
  }
  for (const auto& [field, _] : part->members) {
    if (std::find(fields.begin(), fields.end(), field) == fields.end()) unknown.push_back(field);
  }
  if (!missing.empty() || !unknown.empty()) {
    std::sort(unknown.begin(), unknown.end());
    throw RequestError("'" + key + "' must have the fields " + field_list(fields) + " (missing " +
                       field_list(missing) + ", unknown " + field_list(unknown) + ")");
  }
  std::vector<std::vector<int64_t>> rows;
  for (size_t f = 0; f < fields.size(); ++f) {
    const Json& ids = *part->find(fields[f]);
    std::string where = key + "[" + field_text(fields[f]) + "]";
    if (ids.kind != Json::Kind::Array) throw RequestError(where + " must be a list of ids, got " + shown(ids));
    if (f == 0) rows.resize(ids.items.size(), std::vector<int64_t>(fields.size()));
    if (ids.items.size() != rows.size()) {
      throw RequestError(where + " has " + std::to_string(ids.items.size()) + " ids, but " + key + "[" +
                         field_text(fields[0]) + "] has " + std::to_string(rows.size()));
    }
    const Vocabulary& vocab = meta.vocabularies.at(fields[f]);
    for (size_t i = 0; i < ids.items.size(); ++i) rows[i][f] = row_of(vocab, ids.items[i], where, fields[f]);
  }
  return rows;
}

at::Tensor long_tensor(std::vector<int64_t> values, at::IntArrayRef shape) {
  return at::from_blob(values.data(), shape, at::kLong).clone();
}

std::vector<int64_t> flat(const std::vector<std::vector<int64_t>>& rows) {
  std::vector<int64_t> out;
  for (const auto& row : rows) out.insert(out.end(), row.begin(), row.end());
  return out;
}

}  // namespace

Metadata read_metadata(const Json& json, const std::string& source) {
  MetadataReader reader(json, source);
  const Json& format = reader.get("format", Json::Kind::Number);
  if (format.as_int64() != kPackageFormat) {
    reader.fail("package format " + format.text + ", this program reads " + std::to_string(kPackageFormat) +
                " (rebuild it from the din_ext that wrote the package)");
  }
  Metadata meta;
  meta.user_fields = reader.tables("user_fields");
  meta.item_fields = reader.tables("item_fields");
  meta.history_fields = reader.names("history_fields");
  meta.tasks = reader.names("tasks");
  meta.dense_dim = reader.integer(reader.get("dense_dim", Json::Kind::Number), "'dense_dim'");
  meta.use_dense = reader.get("use_dense", Json::Kind::Bool).boolean;
  for (const auto& field : meta.history_fields) {
    auto is_field = [&](const auto& item) { return item.first == field; };
    if (std::none_of(meta.item_fields.begin(), meta.item_fields.end(), is_field)) {
      reader.fail("din_ext.json: history field " + field_text(field) + " is not an item field");
    }
  }
  for (const auto* tables : {&meta.user_fields, &meta.item_fields}) {
    for (const auto& [field, rows] : *tables) meta.vocabularies[field] = reader.vocabulary(field, rows);
  }
  return meta;
}

ServingInputs encode_request(const Metadata& meta, const Json& request) {
  if (request.kind != Json::Kind::Object) throw RequestError("a request must be an object, got " + shown(request));
  std::vector<std::string> unknown;
  for (const auto& [key, _] : request.members) {
    if (key != "user" && key != "history" && key != "candidates" && key != "dense") unknown.push_back(key);
  }
  if (!unknown.empty()) {
    std::sort(unknown.begin(), unknown.end());
    throw RequestError("the request has unknown keys " + field_list(unknown) + " (user, history, candidates, dense)");
  }

  // Like the Python predictor, 'user' may hold fields the model does not read.
  const Json* user = request.find("user");
  if (!user || user->kind != Json::Kind::Object) {
    throw RequestError("'user' must be an object field -> raw value, got " + (user ? shown(*user) : "nothing"));
  }
  std::vector<std::string> missing;
  for (const auto& [field, _] : meta.user_fields) {
    if (!user->find(field)) missing.push_back(field);
  }
  if (!missing.empty()) throw RequestError("'user' lacks the fields " + field_list(missing));
  std::vector<int64_t> user_rows;
  for (const auto& [field, _] : meta.user_fields) {
    user_rows.push_back(row_of(meta.vocabularies.at(field), *user->find(field), "user[" + field_text(field) + "]",
                               field));
  }

  std::vector<std::string> item_names;
  for (const auto& [field, _] : meta.item_fields) item_names.push_back(field);
  auto candidates = columns(meta, request, "candidates", item_names);
  if (candidates.empty()) throw RequestError("'candidates' must hold at least one candidate");
  auto history = columns(meta, request, "history", meta.history_fields);

  std::vector<float> dense;
  if (meta.use_dense) {
    const Json* values = request.find("dense");
    std::string want = "'dense' must be a list of " + std::to_string(meta.dense_dim) + " finite numbers, got ";
    if (!values || values->kind != Json::Kind::Array) throw RequestError(want + (values ? shown(*values) : "nothing"));
    if (static_cast<int64_t>(values->items.size()) != meta.dense_dim) {
      throw RequestError(want + std::to_string(values->items.size()) + " values");
    }
    for (const Json& x : values->items) {
      if (x.kind != Json::Kind::Number || !std::isfinite(x.as_double())) throw RequestError(want + shown(x));
      dense.push_back(static_cast<float>(x.as_double()));
    }
  }

  auto count = static_cast<int64_t>(candidates.size()), length = static_cast<int64_t>(history.size());
  auto users = static_cast<int64_t>(meta.user_fields.size()), items = static_cast<int64_t>(meta.item_fields.size());
  ServingInputs inputs;
  inputs.user = long_tensor(user_rows, {1, users});
  inputs.items = long_tensor(flat(candidates), {1, count, items});
  inputs.hist_offsets = long_tensor({0, length}, {2});
  inputs.hist = long_tensor(flat(history), {length, static_cast<int64_t>(meta.history_fields.size())});
  inputs.dense = at::from_blob(dense.data(), {1, static_cast<int64_t>(dense.size())}, at::kFloat).clone();
  return inputs;
}

}  // namespace din_ext::serve
