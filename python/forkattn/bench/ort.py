"""Peer rows for the bert family's CPU inference cases: ONNX Runtime and torch.compile.

ONNX Runtime (the `ort` extra: onnxruntime, onnx, onnxscript) runs transformers' BertModel
exported with torch.onnx.export (the dynamo exporter, batch and sequence axes dynamic), once as
exported ("ort") and once after onnxruntime.transformers' BERT optimizer ("ort-opt": fused
SkipLayerNorm, BiasGelu and what else it recognises in the exported graph). Sessions use the
thread count of the other rows and `session.intra_op.allow_spinning` = "0": on a 2-core machine
ORT's idle workers otherwise spin after each run and slow whatever is timed next (forkattn BERT at
batch 1 measured 47 ms right after an ORT call instead of 24 ms); the cases that have these rows
also pause between timed calls (Case.pause_s).

torch.compile ("hf-sdpa-compile") compiles transformers' sdpa model (inductor, static shapes);
the compile happens in the untimed first call.

Every peer's output is checked against transformers eager on the case's batch before timing
(check_peers); a peer that fails to build, run or match is dropped with a notice saying why.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from typing import Callable, Dict, Optional

import torch

ORT_MODULES = ("onnxruntime", "onnx", "onnxscript")
PAUSE_S = 0.02  # between timed calls in cases with ORT rows: its blocked workers hand the cores back


def ort_missing() -> Optional[str]:
    """None when the ORT rows can run, else why not (a module that is not installed)."""
    for name in ORT_MODULES:
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (pip install 'forkattn[ort]')"
    return None


def export_bert(model, cfg: dict):
    """transformers' BertModel as an ONNX ModelProto with dynamic batch and sequence axes."""
    ids = torch.randint(1000, cfg["vocab_size"], (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row, so the exporter keeps the mask path general
    axes = {0: "batch", 1: "seq"}
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress lines and warnings are not the bench's
        program = torch.onnx.export(model, (), kwargs={"input_ids": ids, "attention_mask": mask},
                                    input_names=["input_ids", "attention_mask"],
                                    output_names=["last_hidden_state", "pooler_output"],
                                    dynamic_shapes={"input_ids": axes, "attention_mask": axes},
                                    dynamo=True, verbose=False)
    return program.model_proto


def optimize_bert(proto, cfg: dict):
    """onnxruntime.transformers' BERT optimizer on an exported model (offline, CPU)."""
    from onnxruntime.transformers import optimizer

    opt = optimizer.optimize_model(proto, model_type="bert", num_heads=cfg["num_attention_heads"],
                                   hidden_size=cfg["hidden_size"], opt_level=0, use_gpu=False)
    return opt.model


def session(proto, threads: int, spinning: bool = False):
    """An InferenceSession on the CPU provider with `threads` intra-op threads that do not spin
    (`spinning`: they do, ORT's default: for a process of its own, bench/bert_processes.py)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # warnings about unused initialisers etc. are not the bench's business
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_fn(sess, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One ORT call on the case's batch; the inputs are converted once, outside the timed call."""
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    def run():
        return torch.from_numpy(sess.run(["last_hidden_state"], feed)[0])
    return run


def compiled(model):
    """torch.compile of a transformers model; static shapes (each case compiles its own graph)."""
    return torch.compile(model, dynamic=False)


def max_abs_diff(out, ref) -> float:
    return (out.float() - ref.float()).abs().max().item()


def check_peers(fns: Dict[str, Callable[[], torch.Tensor]], peers: Dict[str, Callable[[], Callable]],
                reference: str, baseline: str, notify: Callable[[str], None], label: str) -> None:
    """Build each peer (name -> factory of its timed callable), run it once and compare with
    fns[reference] (transformers eager). Passing peers join fns; the bound is twice the baseline
    row's own difference to the reference (transformers sdpa vs eager, same dtype) plus 1e-4, the
    reduction-order noise of fp32 over a 12-layer encoder. A failure drops the row with a notice."""
    ref = fns[reference]()
    base_err = max_abs_diff(fns[baseline](), ref)
    bound = 2 * base_err + 1e-4
    diffs = []
    for name, make in peers.items():
        try:
            fn = make()
            err = max_abs_diff(fn(), ref)
        except Exception as e:  # export, optimizer or compile cannot run here: the row is left out
            notify(f"{label}: no {name} row ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
            continue
        if not err <= bound:
            notify(f"{label}: no {name} row: max |diff| vs {reference} {err:.2e} > bound {bound:.2e}")
            continue
        fns[name] = fn
        diffs.append(f"{name} {err:.1e}")
    if diffs:
        notify(f"{label}: max |out - {reference}|: {', '.join(diffs)} ({baseline} {base_err:.1e}, bound {bound:.1e})")
