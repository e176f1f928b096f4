"""ASMIL's shifted synthetic worlds (milstudy.papers.asmil_worlds): BRACS-like 3 classes, CAMELYON-17-like centres."""

import numpy as np
import pytest
import torch

from milstudy.data.synthetic.descriptors import cue_directions
from milstudy.papers import asmil_worlds as aw
from milstudy.papers.asmil import asmil_bags

SMALL = {"n_slides": 48, "n_patches": (60, 120)}


def _by_id(data):
    return {b.slide_id: b for split in data.bags.values() for b in split}


def test_bracs_like_classes_and_the_atypia_cue_are_exact():
    clean = _by_id(asmil_bags("cpu", seed=3, label_noise=0.0, **SMALL))
    data = aw.bracs_like_bags("cpu", seed=3, label_noise=0.0, atypical_overlap=0.6, mixed_malignant=1.0, **SMALL)
    dirs = cue_directions(data.world)
    signal = data.world.signal
    assert data.task.n_out == 3 and not data.flipped
    for split, bags in data.bags.items():
        assert sorted({b.target for b in bags}) == [0, 1, 2], split  # every split holds every class
    mixed = 0
    for bag in _by_id(data).values():
        before = clean[bag.slide_id]
        assert torch.equal(bag.instance_labels, before.instance_labels)  # same lesions, same coordinates
        assert torch.equal(bag.coords, before.coords)
        classes = data.patch_classes[bag.slide_id]
        np.testing.assert_array_equal(classes > 0, bag.instance_labels.numpy() > 0)
        shift = (bag.features - before.features).double().numpy()
        atypia = classes == 1
        assert np.abs(shift[~atypia]).max() == 0  # benign and malignant patches untouched
        if atypia.any():  # tumour cue scaled by rho, the atypia cue added: exactly
            np.testing.assert_allclose(shift[atypia] @ dirs["tumour"], signal * (0.6 - 1), atol=1e-5)
            np.testing.assert_allclose(shift[atypia] @ dirs[aw.ATYPIA_DIRECTION], signal * np.sqrt(1 - 0.36),
                                       atol=1e-5)
        # the slide is labelled by its most severe lesion
        assert bag.target == int(classes.max())
        mixed += bag.target == 2 and atypia.any()
    assert mixed > 0  # mixed_malignant = 1: malignant slides also hold atypia


def test_bracs_like_without_mixed_slides_keeps_malignant_slides_free_of_atypia():
    data = aw.bracs_like_bags("cpu", seed=3, label_noise=0.0, mixed_malignant=0.0, **SMALL)
    for bag in _by_id(data).values():
        classes = set(data.patch_classes[bag.slide_id].tolist())
        assert classes == {0} if bag.target == 0 else classes == {0, bag.target}  # one lesion type per slide


def test_bracs_like_label_noise_flips_training_labels_only():
    clean = _by_id(aw.bracs_like_bags("cpu", seed=3, label_noise=0.0, **SMALL))
    data = aw.bracs_like_bags("cpu", seed=3, label_noise=0.4, **SMALL)
    flipped = set(data.flipped)
    assert flipped and flipped <= {b.slide_id for b in data.bags["train"]}
    for bag in _by_id(data).values():
        assert (bag.target != clean[bag.slide_id].target) == (bag.slide_id in flipped)
        assert bag.target in (0, 1, 2)
    for label in (0, 1, 2):  # an exact count per class: round(0.4 * n_c)
        members = [b.slide_id for b in data.bags["train"] if clean[b.slide_id].target == label]
        assert sum(m in flipped for m in members) == round(0.4 * len(members))


def test_centre_shift_splits_by_centre_and_shifts_each_centre_alike():
    clean = _by_id(asmil_bags("cpu", seed=3, label_noise=0.0, **SMALL))
    data = aw.centre_shifted_bags("cpu", seed=3, label_noise=0.0, centre_shift=0.5, centre_scale=0.0, **SMALL)
    centres = {split: {data.centres[b.slide_id] for b in bags} for split, bags in data.bags.items()}
    assert centres["test"] == {3, 4}
    assert centres["train"] == centres["val"] == {0, 1, 2}
    # validation is stratified by centre and label: every training (centre, label) group gives it a slide
    groups = {(data.centres[b.slide_id], b.target) for b in data.bags["train"]}
    assert groups == {(data.centres[b.slide_id], b.target) for b in data.bags["val"]}
    assert all(b.case_id == clean[b.slide_id].case_id for b in _by_id(data).values())  # case ids untouched
    ids = [b.slide_id for bags in data.bags.values() for b in bags]
    assert sorted(ids) == sorted(clean) and len(set(ids)) == len(ids)  # every slide once
    offsets: dict[str, list] = {}
    for bag in _by_id(data).values():
        shift = bag.features - clean[bag.slide_id].features
        assert torch.allclose(shift, shift[0].expand_as(shift), atol=1e-5)  # scale 0: a pure mean shift
        offsets.setdefault(data.centres[bag.slide_id], []).append(shift[0])
    for rows in offsets.values():  # one offset per centre, different between centres
        assert all(torch.allclose(r, rows[0], atol=1e-5) for r in rows)
    firsts = [rows[0] for rows in offsets.values()]
    assert min((a - b).norm() for i, a in enumerate(firsts) for b in firsts[i + 1:]) > 0.5


def test_centre_scale_changes_the_covariance_and_zero_shift_is_identity():
    clean = _by_id(asmil_bags("cpu", seed=3, label_noise=0.0, **SMALL))
    same = aw.centre_shifted_bags("cpu", seed=3, label_noise=0.0, centre_shift=0.0, centre_scale=0.0, **SMALL)
    assert all(torch.allclose(b.features, clean[b.slide_id].features, atol=1e-5) for b in _by_id(same).values())
    scaled = aw.centre_shifted_bags("cpu", seed=3, label_noise=0.0, centre_shift=0.0, centre_scale=0.5, **SMALL)
    bag = scaled.bags["test"][0]
    centred = clean[bag.slide_id].features - clean[bag.slide_id].features.mean(0)
    moved = bag.features - bag.features.mean(0)
    assert not torch.allclose(moved.T @ moved, centred.T @ centred, rtol=0.05)  # a different covariance


@pytest.mark.parametrize("kwargs, match", [({"n_test_centres": 5}, "n_test_centres"),
                                           ({"centre_shift": -1.0}, "centre_shift"),
                                           ({"label_noise": 0.6}, "label_noise")])
def test_centre_shift_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        aw.centre_shifted_bags("cpu", seed=3, **{**SMALL, **kwargs})


def test_bracs_like_bad_input():
    with pytest.raises(ValueError, match="atypical_overlap"):
        aw.bracs_like_bags("cpu", seed=3, atypical_overlap=1.0, **SMALL)
    with pytest.raises(ValueError, match="label_noise"):
        aw.bracs_like_bags("cpu", seed=3, label_noise=0.7, **SMALL)


# ------------------------------------------------------------------------------------ notebook 24's study helpers
@pytest.fixture(scope="module")
def two_worlds():
    from milstudy.papers import asmil_main as M
    from milstudy.train.two_stage import TrainConfig

    worlds = {name: M.world_bags(name, "smoke", seed=3, label_noise=0.0, n_slides=36) for name in M.WORLDS}
    config = TrainConfig(epochs=2, lr=1e-3, schedule="constant", warmup_epochs=0, device="cpu")
    variants = ["ABMIL", "ABMIL + anchor + NSF", M.SMALL_LAMBDA, "ASMIL without anchor"]
    return worlds, M.run_worlds(worlds, variants, [0, 1], config, n_tracked=2, small=True, progress=False)


def test_main_table_and_claims_cover_both_worlds(two_worlds):
    from milstudy.analysis import stats
    from milstudy.papers import asmil_main as M

    worlds, results = two_worlds
    assert results["BRACS-like"].predictions.filter(like="prob_").shape[1] == 3
    table = M.main_table(results)
    assert set(zip(table["world"], table["method"])) == {(w, m) for w in M.WORLDS for m in
                                                          ["ABMIL", "ABMIL + anchor + NSF", M.SMALL_LAMBDA,
                                                           "ASMIL without anchor"]}
    assert (table["n"] == 2).all()
    claims = M.main_claims(results, n_resamples=200)
    ran = {"A small anchor (λ = 0.003) raises ASMIL's macro-F1", "A small anchor (λ = 0.003) raises ASMIL's AUC",
           "The anchor + NSF raises ABMIL's macro-F1 (plug-in)", "The anchor + NSF raises ABMIL's AUC (plug-in)"}
    assert sorted(claims["claim"]) == sorted(f"{w}: {s}" for w in M.WORLDS for s in ran)  # rows whose methods ran
    assert (claims["n_seeds"] == 2).all()
    np.testing.assert_allclose(claims["p_holm"], stats.holm(claims["p"]))  # Holm across both worlds' rows
    # the BRACS-like AUC row's means are the seed means of the macro one-vs-rest AUC
    row = claims[claims["claim"] == "BRACS-like: The anchor + NSF raises ABMIL's AUC (plug-in)"].iloc[0]
    predictions = results["BRACS-like"].predictions
    macro = stats.macro_auc_metric(3)
    per_seed = [macro(predictions[(predictions["method"] == "ABMIL") & (predictions["seed"] == s)]) for s in (0, 1)]
    assert row["mean_b"] == pytest.approx(np.mean(per_seed))


def test_world_bags_rejects_an_unknown_world():
    from milstudy.papers import asmil_main as M

    with pytest.raises(ValueError, match="unknown world"):
        M.world_bags("CAMELYON-16-like")
