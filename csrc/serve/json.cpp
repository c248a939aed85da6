#include "json.h"

#include <cerrno>
#include <cstdlib>

namespace din_ext::serve {
namespace {

constexpr int kMaxDepth = 64;  // deeper texts are refused rather than risking the stack (requests nest 3 deep)

class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  Json document() {
    skip_space();
    Json value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("unexpected text after the JSON value");
    return value;
  }

 private:
  [[noreturn]] void fail(const std::string& reason) const {
    throw JsonError("column " + std::to_string(pos_ + 1) + ": " + reason);
  }

  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return at_end() ? '\0' : text_[pos_]; }

  void skip_space() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
  }

  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }

  Json parse_value(int depth) {
    if (at_end()) fail("expected a value, got the end of the text");
    switch (peek()) {
      case '{': return parse_object(depth + 1);
      case '[': return parse_array(depth + 1);
      case '"': {
        Json value;
        value.kind = Json::Kind::String;
        value.text = parse_string();
        return value;
      }
      case 't': return parse_word("true", Json::Kind::Bool, true);
      case 'f': return parse_word("false", Json::Kind::Bool, false);
      case 'n': return parse_word("null", Json::Kind::Null, false);
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) return parse_number();
        fail(std::string("unexpected character '") + peek() + "'");
    }
  }

  Json parse_word(std::string_view word, Json::Kind kind, bool boolean) {
    if (text_.substr(pos_, word.size()) != word) fail("unknown literal (expected " + std::string(word) + ")");
    pos_ += word.size();
    Json value;
    value.kind = kind;
    value.boolean = boolean;
    return value;
  }

  // The comma-separated elements of an object or array (pos_ at its opening bracket), each read by element().
  template <typename Element>
  void parse_elements(char close, int depth, Element element) {
    if (depth > kMaxDepth) fail("nested deeper than " + std::to_string(kMaxDepth) + " levels");
    ++pos_;
    skip_space();
    if (peek() == close) {
      ++pos_;
      return;
    }
    for (;;) {
      skip_space();
      element();
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() != close) fail(std::string("expected ',' or '") + close + "'");
      ++pos_;
      return;
    }
  }

  Json parse_object(int depth) {
    Json value;
    value.kind = Json::Kind::Object;
    parse_elements('}', depth, [&] {
      if (peek() != '"') fail("expected a string key");
      size_t key_at = pos_;
      std::string key = parse_string();
      if (value.find(key)) {
        pos_ = key_at;
        fail("duplicate key " + quote_json(key));
      }
      skip_space();
      expect(':');
      skip_space();
      value.members.emplace_back(std::move(key), parse_value(depth));
    });
    return value;
  }

  Json parse_array(int depth) {
    Json value;
    value.kind = Json::Kind::Array;
    parse_elements(']', depth, [&] { value.items.push_back(parse_value(depth)); });
    return value;
  }

  Json parse_number() {
    size_t start = pos_;
    auto digits = [&] {
      size_t from = pos_;
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
      return pos_ - from;
    };
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
      if (peek() >= '0' && peek() <= '9') fail("a number must not have leading zeros");
    } else if (digits() == 0) {
      fail("expected a digit");
    }
    if (peek() == '.') {
      ++pos_;
      if (digits() == 0) fail("expected a digit after '.'");
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (digits() == 0) fail("expected a digit in the exponent");
    }
    Json value;
    value.kind = Json::Kind::Number;
    value.text = std::string(text_.substr(start, pos_ - start));
    return value;
  }

  unsigned hex4() {
    unsigned code = 0;
    for (int i = 0; i < 4; ++i, ++pos_) {
      char c = peek();
      unsigned digit = c >= '0' && c <= '9' ? c - '0'
                       : c >= 'a' && c <= 'f' ? c - 'a' + 10
                       : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                              : 16;
      if (digit == 16) fail("expected 4 hex digits after \\u");
      code = code * 16 + digit;
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  // Copies one UTF-8 encoded character (its lead byte at pos_), refusing malformed, overlong and surrogate forms.
  void copy_utf8(std::string& out) {
    auto byte = [&](size_t i) { return static_cast<unsigned char>(pos_ + i < text_.size() ? text_[pos_ + i] : 0); };
    unsigned lead = byte(0);
    int extra = lead >= 0xF0 && lead <= 0xF4 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC2 && lead < 0xE0 ? 1 : -1;
    if (lead >= 0xF5 || extra < 0) fail("invalid UTF-8");
    unsigned code = lead & (0x3F >> extra);
    for (int i = 1; i <= extra; ++i) {
      if ((byte(i) & 0xC0) != 0x80) fail("invalid UTF-8");
      code = code << 6 | (byte(i) & 0x3F);
    }
    static constexpr unsigned kLeast[] = {0, 0x80, 0x800, 0x10000};
    if (code < kLeast[extra] || code > 0x10FFFF || (code >= 0xD800 && code < 0xE000)) fail("invalid UTF-8");
    out.append(text_.substr(pos_, extra + 1));
    pos_ += extra + 1;
  }

  std::string parse_string() {
    ++pos_;  // '"'
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string");
      unsigned char c = static_cast<unsigned char>(peek());
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail("control character in a string (escape it)");
      if (c >= 0x80) {
        copy_utf8(out);
        continue;
      }
      if (c != '\\') {
        out += static_cast<char>(c);
        ++pos_;
        continue;
      }
      ++pos_;
      char e = peek();
      ++pos_;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = hex4();
          if (code >= 0xDC00 && code < 0xE000) fail("lone low surrogate in a \\u escape");
          if (code >= 0xD800 && code < 0xDC00) {
            if (text_.substr(pos_, 2) != "\\u") fail("high surrogate without its low surrogate");
            pos_ += 2;
            unsigned low = hex4();
            if (low < 0xDC00 || low >= 0xE000) fail("high surrogate without its low surrogate");
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, code);
          break;
        }
        default:
          --pos_;
          fail("invalid escape in a string");
      }
    }
  }

  std::string_view text_;
  size_t pos_ = 0;
};

}  // namespace

std::optional<int64_t> Json::as_int64() const {
  if (!is_integer()) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  long long value = std::strtoll(text.c_str(), &end, 10);
  if (errno == ERANGE) return std::nullopt;
  return static_cast<int64_t>(value);
}

double Json::as_double() const { return std::strtod(text.c_str(), nullptr); }

const Json* Json::find(std::string_view key) const {
  for (const auto& [name, value] : members) {
    if (name == key) return &value;
  }
  return nullptr;
}

const char* Json::type_name() const {
  switch (kind) {
    case Kind::Null: return "null";
    case Kind::Bool: return "boolean";
    case Kind::Number: return "number";
    case Kind::String: return "string";
    case Kind::Array: return "array";
    case Kind::Object: return "object";
  }
  return "value";
}

Json parse_json(std::string_view text) { return Parser(text).document(); }

std::string quote_json(std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  for (char ch : text) {
    unsigned char c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20) {
      out += "\\u00";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

}  // namespace din_ext::serve
