"""The peer benchmark (milstudy.bench.peer): matched pairs, skipped rows without torchmil, one measured pair."""

import importlib.util

import pytest

from milstudy.bench import peer
from milstudy.models import build_model


def test_every_pair_names_a_zoo_model_and_its_layout():
    for label, (ours, kwargs, theirs, their_kwargs, embed, instance_loss) in peer.PAIRS.items():
        model = build_model(ours, peer.FEATURE_DIM, 2, **kwargs)
        assert theirs and isinstance(their_kwargs, dict), label
        width = kwargs.get("hidden_dim")
        assert embed == width, f"{label}: torchmil gets our embedding width ({width}), got {embed}"
        assert not instance_loss or getattr(model, "needs_targets", False), label


def test_without_torchmil_every_row_is_skipped_and_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(peer, "torchmil_version", lambda: None)
    frame, extras = peer.run(tmp_path, quick=True)
    assert len(frame) == len(peer.PAIRS) and frame["status"].str.contains(r'pip install -e "\.\[bench\]"').all()
    assert extras["meta"] == {"torchmil": None} and frame["ratio"].isna().all()


@pytest.mark.skipif(importlib.util.find_spec("torchmil") is None, reason="torchmil (the bench extra) not installed")
def test_a_measured_pair_gives_both_medians_and_their_ratio():
    row = peer.measure_pair("ABMIL", 200, threads=1)
    assert row["ours_s"] > 0 and row["torchmil_s"] > 0
    assert row["ratio"] == pytest.approx(row["ours_s"] / row["torchmil_s"])
