// The run-time ISA choice of cpu_dispatch.h. Compiled once, for the baseline ISA.
#include "cpu_dispatch.h"

#include <ATen/Version.h>  // at::get_cpu_capability()
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <mutex>
#include <optional>

namespace forkattn::cpu {
namespace {

constexpr Isa kAll[] = {Isa::kDefault, Isa::kAvx2, Isa::kAvx512};
constexpr const char* kNames[] = {"default", "avx2", "avx512"};

std::atomic<int> g_chosen{-1};
std::mutex g_mutex;

bool compiled(Isa isa) {
  switch (isa) {
#if defined(FORKATTN_CPU_HAVE_AVX2)
    case Isa::kAvx2: return true;
#endif
#if defined(FORKATTN_CPU_HAVE_AVX512)
    case Isa::kAvx512: return true;
#endif
    case Isa::kDefault: return true;
    default: return false;
  }
}

// The CPU (and OS: libgcc checks XGETBV) executes the variant's instructions: the compile flags of
// each variant in setup.py, feature by feature.
bool runs_here(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::kAvx2: return avx2;
    case Isa::kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    default: return true;
  }
#else
  return isa == Isa::kDefault;
#endif
}

std::optional<Isa> parse(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  for (Isa isa : kAll) {
    if (s == kNames[static_cast<int>(isa)]) return isa;
  }
  return std::nullopt;
}

// torch's choice for its own kernels; its non-x86 capabilities (VSX, ZVECTOR, SVE) map to DEFAULT.
Isa torch_isa() {
  const std::string cap = at::get_cpu_capability();
  return cap == "AVX512" ? Isa::kAvx512 : cap == "AVX2" ? Isa::kAvx2 : Isa::kDefault;
}

Isa decide(const std::string& request) {
  Isa want;
  std::string source;
  if (!request.empty()) {
    const std::optional<Isa> parsed = parse(request);
    TORCH_CHECK_VALUE(parsed.has_value(), "FORKATTN_CPU_CAPABILITY='", request,
                      "' is not a CPU kernel variant: expected one of default, avx2, avx512 (or unset: "
                      "follow torch's choice)");
    want = *parsed;
    source = "FORKATTN_CPU_CAPABILITY=" + request;
  } else {
    want = torch_isa();
    source = "torch's CPU capability " + at::get_cpu_capability();
  }
  Isa got = want;
  while (got != Isa::kDefault && !(compiled(got) && runs_here(got))) got = static_cast<Isa>(static_cast<int>(got) - 1);
  if (got != want) {
    TORCH_WARN("forkattn: ", source, " asks for the ", kNames[static_cast<int>(want)], " CPU kernels, but ",
               compiled(want) ? "this CPU does not support them" : "they are not compiled into this build",
               "; using the ", kNames[static_cast<int>(got)], " ones");
  }
  return got;
}

const char* env_request() {
  const char* env = std::getenv("FORKATTN_CPU_CAPABILITY");
  return env ? env : "";
}

}  // namespace

Isa chosen_isa() {
  const int v = g_chosen.load(std::memory_order_acquire);
  if (v >= 0) return static_cast<Isa>(v);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_chosen.load(std::memory_order_relaxed) < 0) {
    g_chosen.store(static_cast<int>(decide(env_request())), std::memory_order_release);  // not kept if it throws
  }
  return static_cast<Isa>(g_chosen.load(std::memory_order_relaxed));
}

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (Isa isa : kAll) {
    if (compiled(isa)) out.emplace_back(kNames[static_cast<int>(isa)]);
  }
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : kAll) {
    if (runs_here(isa)) out.emplace_back(kNames[static_cast<int>(isa)]);
  }
  return out;
}

std::string choose_isa(const std::string& request) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const Isa isa = decide(request);
  g_chosen.store(static_cast<int>(isa), std::memory_order_release);
  return kNames[static_cast<int>(isa)];
}

}  // namespace forkattn::cpu
