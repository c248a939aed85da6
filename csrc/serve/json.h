// A strict JSON reader (RFC 8259) for din_ext_serve: the requests it reads and the package's din_ext.json.
// libtorch ships no JSON library, and the program must build without a network, so it carries this one.
// Strict: one value per text, no comments, no trailing commas, no NaN/Infinity, no duplicate keys, valid UTF-8,
// no lone surrogates.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace din_ext::serve {

class JsonError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Json {
  enum class Kind { Null, Bool, Number, String, Array, Object };

  Kind kind = Kind::Null;
  bool boolean = false;
  std::string text;  // a string's value (UTF-8), or a number's literal as written
  std::vector<Json> items;  // an array's elements
  std::vector<std::pair<std::string, Json>> members;  // an object's members in order; keys are distinct

  // A number written without fraction or exponent.
  bool is_integer() const { return kind == Kind::Number && text.find_first_of(".eE") == std::string::npos; }
  // An integer's value, or nothing when it does not fit in int64.
  std::optional<int64_t> as_int64() const;
  // A number's value (overflow gives +-inf, as strtod does).
  double as_double() const;
  // An object's member, or nullptr.
  const Json* find(std::string_view key) const;
  // The JSON type's name, for messages: "object", "array", "string", "number", "boolean" or "null".
  const char* type_name() const;
};

// The one JSON value of `text` (whitespace around it allowed); throws JsonError("column C: reason"), C from 1.
Json parse_json(std::string_view text);

// `text` as a JSON string literal (quotes included), for output.
std::string quote_json(std::string_view text);

}  // namespace din_ext::serve
