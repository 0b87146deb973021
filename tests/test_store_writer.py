"""The embedding pass's background store writer: order, failures, interruptions."""
import logging
import threading

import numpy as np
import pytest
import torch

from spurfast.embed import embed_pool
from spurfast.models import VAE, VAEConfig, SmallCNN
from spurfast.data import ArraySource
from spurfast.store import EmbeddingStore
from spurfast.store_writer import BackgroundWriter


class _Recorder:
    """A store stand-in: records writes; ``gate`` holds each write until set; ``fail_at`` raises."""

    def __init__(self, gate=None, fail_at=None):
        self.manifest, self.writes, self.gate, self.fail_at = {}, [], gate, fail_at
        self.started = threading.Event()

    def write(self, start, values, bad=None):
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if start == self.fail_at:
            raise OSError(28, "No space left on device")
        self.writes.append((start, dict(self.manifest)))


def test_put_returns_while_the_batch_is_still_being_written():
    gate = threading.Event()
    store = _Recorder(gate=gate)
    with BackgroundWriter(store) as writer:
        writer.put(0, {"a": np.zeros(2)}, manifest={"mode": "x"})
        assert store.started.wait(10)
        assert store.writes == []          # the write is held, and the pass went on
        gate.set()
        writer.put(2, {"a": np.zeros(2)}, manifest={"mode": "y"})
    # leaving waits for both, written in order, each with the manifest entries put with it
    assert store.writes == [(0, {"mode": "x"}), (2, {"mode": "y"})]


def test_a_failed_write_is_raised_and_nothing_after_it_is_written():
    store = _Recorder(fail_at=2)
    with pytest.raises(OSError, match="No space left"):
        with BackgroundWriter(store) as writer:
            for start in range(0, 12, 2):
                writer.put(start, {"a": np.zeros(2)})
    assert [w[0] for w in store.writes] == [0]


def test_the_passs_own_error_goes_on_and_a_failed_write_is_logged(caplog):
    store = _Recorder(fail_at=0)
    with caplog.at_level(logging.ERROR, logger="spurfast.store_writer"):
        with pytest.raises(KeyError, match="the pass"):
            with BackgroundWriter(store) as writer:
                writer.put(0, {"a": np.zeros(2)})
                writer.close()      # the write has failed by now
                raise KeyError("the pass")
    assert "No space left" in caplog.text


def test_a_pass_that_fails_keeps_every_batch_it_finished(tmp_path):
    # the encoder raises in the fourth batch: the three before it are on disk, marked done,
    # and a resume makes the store a fresh pass makes
    torch.manual_seed(0)
    src = ArraySource(torch.rand(50, 1, 28, 28), np.arange(50) % 4)
    clf, vae = SmallCNN(1, 4, 28).eval(), VAE(VAEConfig(1, 28, (8, 16), 6)).eval()
    full = embed_pool(src, clf, vae, tmp_path / "full", num_classes=4, batch_size=8, progress=False)
    calls = [0]
    real = vae.encode

    def failing(x, **kw):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("the encoder fell over")
        return real(x, **kw)
    vae.encode = failing
    with pytest.raises(RuntimeError, match="fell over"):
        embed_pool(src, clf, vae, tmp_path / "cut", num_classes=4, batch_size=8, progress=False)
    cut = EmbeddingStore(tmp_path / "cut")
    assert cut.done == 24, cut.done
    np.testing.assert_array_equal(cut["mu"][:24], full["mu"][:24])
    del vae.encode
    resumed = embed_pool(src, clf, vae, tmp_path / "cut", num_classes=4, batch_size=8, progress=False)
    for col in ("pred", "probs", "mu", "feats", "labels", "ok"):
        np.testing.assert_array_equal(resumed[col], full[col], err_msg=col)
