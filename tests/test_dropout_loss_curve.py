"""A short version of scripts/dropout_loss_curve.py (issue #16): training with attention dropout,
forkattn's model against transformers' from the same initial weights on the same batches, compared
statistically (last-window mean loss within 4 standard errors of transformers' run-to-run spread).

The comparison can fail: forkattn with attention dropout off (p = 0 against transformers' p = 0.5)
is told apart on the same task, in the same test.
"""
import importlib.util
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "dropout_loss_curve.py")
_spec = importlib.util.spec_from_file_location("dropout_loss_curve", _PATH)
dlc = sys.modules.setdefault("dropout_loss_curve", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(dlc)  # (registered first: its dataclasses look their module up)

FAST = dict(vocab=18, hidden=32, layers=2, heads=4, seq=16, period=4, batch=16, steps=60, lr=1e-2, p=0.5)


@pytest.mark.parametrize("model", ["gpt2"])
def test_short_training_run_matches_transformers_statistically(model):
    s = dlc.Setup(model=model, **FAST)
    hf, same, off = dlc.run_groups(s, seeds=[1, 2, 3])  # forkattn without dropout: one run
    assert (same.p, off.p, len(hf.runs), len(same.runs), len(off.runs)) == (s.p, 0.0, 3, 3, 1)
    with torch.no_grad():  # one init, one data handling: the models' eval losses on a batch agree
        losses = [m.eval()(**dlc.make_batches(s)[0]).loss for m in (dlc.hf_model(s, s.p), dlc.forkattn_model(s, s.p))]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-5)
    same, off = (dlc.compare(g, hf, window=20) for g in (same, off))
    print(f"forkattn p={s.p}: {same}\nforkattn p=0: {off}")
    assert same["agree"], same
    assert not off["agree"], off  # dropout off in forkattn: the same comparison fails
    assert off["diff"] < 0  # and in the expected direction: without dropout the training loss is lower
