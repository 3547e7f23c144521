// Run-time choice among the per-ISA variants of the CPU kernels, in the manner of ATen's
// DispatchStub: setup.py compiles each csrc/cpu/*.cpp once per ISA (cpu/isa.h), so every kernel
// entry point exists as forkattn::cpu::DEFAULT::name, forkattn::cpu::AVX2::name and (on x86-64)
// forkattn::cpu::AVX512::name, and the host calls the one chosen for this process.
//
// The choice is made at the first call and then kept:
//   1. FORKATTN_CPU_CAPABILITY=default|avx2|avx512 when set (any other value raises ValueError);
//   2. else torch's own choice, at::get_cpu_capability() (which honours ATEN_CPU_CAPABILITY);
//   3. lowered, with a warning, to the best variant that is compiled in and that this CPU executes
//      (checked with the CPU's own feature bits: torch trusts ATEN_CPU_CAPABILITY=avx512 even on a
//      CPU without AVX-512), so a request can never run an illegal instruction.
//
// Adding a kernel entry point: declare it in its host header under namespace forkattn::cpu as
// before (that declaration gives the type; it is never defined), add FORKATTN_CPU_VARIANTS(name)
// below the header's namespace, and call it as FORKATTN_CPU_DISPATCH(name)(args...).
#pragma once

#include <string>
#include <vector>

namespace forkattn::cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

Isa chosen_isa();                       // the variant in use (decided at the first call)
const char* isa_name(Isa isa);          // "default", "avx2", "avx512"
std::vector<std::string> compiled_isas();  // the variants compiled into this extension
std::vector<std::string> supported_isas();  // the variants this CPU executes, compiled in or not
// Re-run the choice as if FORKATTN_CPU_CAPABILITY were `request` ("" = unset) and return the
// variant now in use. For tests and scripts/bench_cpu_isa.py, which compare variants in one process.
std::string choose_isa(const std::string& request);

template <typename Fn>
Fn* pick_variant(Fn* default_fn, Fn* avx2_fn, Fn* avx512_fn) {
  switch (chosen_isa()) {
    case Isa::kAvx512: return avx512_fn;  // chosen only when compiled in: never null here
    case Isa::kAvx2: return avx2_fn;
    default: return default_fn;
  }
}

}  // namespace forkattn::cpu

// Declares the variants of ::forkattn::cpu::name with its type (at global scope, after the header's
// namespace).
#define FORKATTN_CPU_VARIANTS(name)                                  \
  namespace forkattn::cpu::DEFAULT { decltype(::forkattn::cpu::name) name; } \
  namespace forkattn::cpu::AVX2 { decltype(::forkattn::cpu::name) name; }    \
  namespace forkattn::cpu::AVX512 { decltype(::forkattn::cpu::name) name; }

// setup.py defines FORKATTN_CPU_HAVE_AVX2 / _AVX512 when it compiled those variants.
#if defined(FORKATTN_CPU_HAVE_AVX2)
#define FORKATTN_CPU_AVX2_FN_(name) &::forkattn::cpu::AVX2::name
#else
#define FORKATTN_CPU_AVX2_FN_(name) nullptr
#endif
#if defined(FORKATTN_CPU_HAVE_AVX512)
#define FORKATTN_CPU_AVX512_FN_(name) &::forkattn::cpu::AVX512::name
#else
#define FORKATTN_CPU_AVX512_FN_(name) nullptr
#endif

// The chosen variant of kernel `name`: FORKATTN_CPU_DISPATCH(attention_fwd_kernel)(q, k, v, ...).
#define FORKATTN_CPU_DISPATCH(name)                                                                  \
  (::forkattn::cpu::pick_variant<decltype(::forkattn::cpu::name)>(                                   \
      &::forkattn::cpu::DEFAULT::name, FORKATTN_CPU_AVX2_FN_(name), FORKATTN_CPU_AVX512_FN_(name)))
