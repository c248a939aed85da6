// din_ext_serve: scores requests with a din_ext AOTInductor package (.pt2, from `din-ext export --format pt2`).
//
//   din_ext_serve [--threads N] [--keep-going] MODEL.pt2 < requests.jsonl > probabilities.jsonl
//
// Each input line is one request with raw ids, as din_ext.serving.DINPredictor.predict takes them:
//   {"user": {field: id}, "history": {field: [id, ...]}, "candidates": {field: [id, ...]}, "dense": [x, ...]}
// and each output line its click probabilities, one per candidate and task: {"click": [p, ...]}. Ids map to rows
// through the vocabularies in the package (unseen ids and null: OOV). The din_ext ops the package calls are
// registered by the op library this program links (libdin_ext_ops).
//
// A malformed request prints "line N: <reason naming the field>" to stderr and ends the program with status 1;
// with --keep-going its output line is {"error": "<reason>"} instead and the program goes on (status 1 at the
// end). A package that cannot be served ends it with status 2 before any request is read, and so does a model
// failure on a well-formed request.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "json.h"
#include "request.h"

namespace din_ext::serve {
namespace {

constexpr const char* kUsage = "usage: din_ext_serve [--threads N] [--keep-going] MODEL.pt2 < requests.jsonl";
constexpr const char* kMetadataRecord = "extra/din_ext.json";  // din_ext.export.METADATA_FILE, an extra file

struct Options {
  std::string package;
  int threads = 0;  // 0: libtorch's default
  bool keep_going = false;
};

[[noreturn]] void usage_error(const std::string& reason) {
  std::cerr << "din_ext_serve: " << reason << "\n" << kUsage << "\n";
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--keep-going") {
      options.keep_going = true;
    } else if (arg == "--threads") {
      if (i + 1 == argc) usage_error("--threads needs a value");
      char* end = nullptr;
      long threads = std::strtol(argv[++i], &end, 10);
      if (*end != '\0' || threads < 1 || threads > 1024) usage_error("--threads must be an integer in [1, 1024]");
      options.threads = static_cast<int>(threads);
    } else if (arg == "-h" || arg == "--help") {
      std::cout << kUsage << "\n";
      std::exit(0);
    } else if (!arg.empty() && arg[0] == '-') {
      usage_error("unknown option " + arg);
    } else if (!options.package.empty()) {
      usage_error("one package only, got " + options.package + " and " + arg);
    } else {
      options.package = arg;
    }
  }
  if (options.package.empty()) usage_error("no package given");
  return options;
}

// The first line of a libtorch error, without its C++ backtrace.
std::string first_line(const c10::Error& e) {
  std::string text = e.what_without_backtrace();
  return text.substr(0, text.find('\n'));
}

Metadata package_metadata(const std::string& package) {
  caffe2::serialize::PyTorchStreamReader archive(package);
  if (!archive.hasRecord(kMetadataRecord)) {
    throw std::runtime_error(package + ": not a din_ext package (no " + std::string(kMetadataRecord) +
                             "; write it with din-ext export --format pt2)");
  }
  auto [data, size] = archive.getRecord(kMetadataRecord);
  std::string_view text(static_cast<const char*>(data.get()), size);
  try {
    return read_metadata(parse_json(text), package);
  } catch (const JsonError& e) {
    throw std::runtime_error(package + ": din_ext.json is not valid JSON: " + e.what());
  }
}

// {"task": [p, ...], ...}: probabilities (1, C, T) as one JSON line.
std::string probabilities_line(const at::Tensor& probabilities, const std::vector<std::string>& tasks) {
  at::Tensor p = probabilities.to(at::kCPU, at::kFloat).contiguous();
  const float* values = p.data_ptr<float>();
  int64_t count = p.size(1), width = p.size(2);
  TORCH_CHECK(width == static_cast<int64_t>(tasks.size()), "the model gives ", width, " tasks, din_ext.json lists ",
              tasks.size());
  std::string out = "{";
  char number[32];
  for (int64_t t = 0; t < width; ++t) {
    out += (t ? "], " : "") + quote_json(tasks[t]) + ": [";
    for (int64_t c = 0; c < count; ++c) {
      std::snprintf(number, sizeof number, "%.9g", values[c * width + t]);  // 9 digits: float32 round-trips
      out += (c ? ", " : "") + std::string(number);
    }
  }
  return out + "]}";
}

int serve(const Options& options) {
  Metadata meta;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  at::Device device = at::kCPU;
  try {
    meta = package_metadata(options.package);
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(options.package, "model");
    auto aoti = loader->get_metadata();
    if (aoti.count("AOTI_DEVICE_KEY")) device = at::Device(aoti.at("AOTI_DEVICE_KEY"));
  } catch (const c10::Error& e) {
    std::cerr << "din_ext_serve: " << options.package << ": cannot load the package: " << first_line(e) << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "din_ext_serve: " << e.what() << "\n";
    return 2;
  }
  c10::InferenceMode inference;
  int status = 0;
  std::string line;
  for (int64_t number = 1; std::getline(std::cin, line); ++number) {
    std::string reason;
    try {
      ServingInputs in = encode_request(meta, parse_json(line));
      std::vector<at::Tensor> outputs = loader->run(
          {in.user.to(device), in.items.to(device), in.hist_offsets.to(device), in.hist.to(device),
           in.dense.to(device)});
      std::cout << probabilities_line(outputs.at(0), meta.tasks) << std::endl;  // flushed: a pipe gets each line
      continue;
    } catch (const JsonError& e) {
      reason = "line " + std::to_string(number) + ": invalid JSON at " + e.what();
    } catch (const RequestError& e) {
      reason = "line " + std::to_string(number) + ": " + e.what();
    } catch (const c10::Error& e) {
      std::cerr << "din_ext_serve: line " << number << ": the model failed: " << first_line(e) << "\n";
      return 2;
    }
    status = 1;
    if (!options.keep_going) {
      std::cerr << "din_ext_serve: " << reason << "\n";
      return status;
    }
    std::cout << "{\"error\": " << quote_json(reason) << "}" << std::endl;
  }
  return status;
}

}  // namespace
}  // namespace din_ext::serve

int main(int argc, char** argv) {
  auto options = din_ext::serve::parse_options(argc, argv);
  if (options.threads) at::set_num_threads(options.threads);
  return din_ext::serve::serve(options);
}
