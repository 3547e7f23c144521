"""NumPy emulation of forkattn's CUDA kernels, thread by thread, for checking them without a GPU.

core.py              the SM80 model: threads, bounds-checked global buffers, shared memory with a
                     race detector, cp.async, ldmatrix, mma.sync
attention.py         transcription of kernels/attention/
attention_host.py    its host glue (csrc/cuda/ attention host file): the entry points tests call
attention_checks.py  attention cases against the fp64 reference (2x rule, same-rounding model)
decode.py            transcription of kernels/decode/ (split, merge, kv_append) and its host glue
decode_checks.py     decode and append cases against forkattn.reference
disentangled.py      transcription of kernels/disentangled/ (DeBERTa forward) and its host glue
disentangled_checks.py  disentangled cases against the fp64 reference (2x rule)
__main__.py          the full matrix: python tests/cuda_emulator [--quick] [--only attention|decode|disentangled]

Retires once scripts/gpu_check.sh has passed on hardware: docs/EMULATION.md.
"""
