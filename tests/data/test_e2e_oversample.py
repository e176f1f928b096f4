"""The manifest's ``oversample`` column on the E2E path (issue 9; specs/abmilx.md §2.6: upstream duplicates ILC
rows of TCGA-BRCA subtyping before training): each training slide or case repeated that many times, bad counts
refused naming the slide."""

import pandas as pd
import pytest

from milstudy.data.e2e_slides import cases_from_slides, oversample_rows, toy_slides


def test_training_slides_are_repeated_by_their_oversample_count():
    slides = toy_slides(4, n_patches=8, size=8)
    manifest = pd.DataFrame({"slide_id": [s.slide_id for s in slides], "oversample": [1, 2, 1, 3]})
    out = oversample_rows(slides, manifest)
    assert [s.slide_id for s in out] == ["toy_000", "toy_001", "toy_001", "toy_002", "toy_003", "toy_003", "toy_003"]


def test_a_case_takes_the_largest_count_of_its_slides():
    slides = toy_slides(4, n_patches=8, size=8)
    for s, label in zip(slides, (0, 0, 1, 1)):
        s.target = label
    case_of = {"toy_000": "A", "toy_001": "A", "toy_002": "B", "toy_003": "C"}
    cases = cases_from_slides(slides, case_of)
    manifest = pd.DataFrame({"slide_id": list(case_of), "case_id": list(case_of.values()), "oversample": [1, 2, 1, 1]})
    assert [c.slide_id for c in oversample_rows(cases, manifest, by_case=True)] == ["A", "A", "B", "C"]


@pytest.mark.parametrize("bad", [0, 1.5])
def test_a_bad_count_is_refused_naming_the_slide(bad):
    slides = toy_slides(2, n_patches=8, size=8)
    manifest = pd.DataFrame({"slide_id": [s.slide_id for s in slides], "oversample": [1, bad]})
    with pytest.raises(ValueError, match=r"oversample.*toy_001"):
        oversample_rows(slides, manifest)
