"""ASAP / CAMELYON lesion annotations -> tumour masks -> patch labels, and `milstudy data masks`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from milstudy.cli import main
from milstudy.data.annotations import rasterize_regions, read_asap_xml, write_annotation_mask
from milstudy.data.synthetic import instance_labels


def _square(name: str, group: str, x0: float, y0: float, x1: float, y1: float, kind: str = "Polygon") -> str:
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in enumerate(corners))
    return f'<Annotation Name="{name}" Type="{kind}" PartOfGroup="{group}"><Coordinates>{coords}</Coordinates></Annotation>'


def _asap(*annotations: str) -> str:
    return f"<ASAP_Annotations><Annotations>{''.join(annotations)}</Annotations></ASAP_Annotations>"


CAMELYON_LIKE = _asap(
    _square("tumour", "_0", 40, 40, 200, 200),
    _square("normal inside", "_2", 80, 80, 120, 120),
    '<Annotation Name="a dot" Type="Dot" PartOfGroup="None"><Coordinates>'
    '<Coordinate Order="0" X="5" Y="5" /></Coordinates></Annotation>',
)


def test_read_keeps_areas_in_drawing_order(tmp_path):
    path = tmp_path / "s.xml"
    path.write_text(CAMELYON_LIKE)
    regions = read_asap_xml(path)
    assert [(r.name, r.group, r.kind) for r in regions] == [("tumour", "_0", "polygon"), ("normal inside", "_2", "polygon")]
    np.testing.assert_array_equal(regions[0].points, [[40, 40], [200, 40], [200, 200], [40, 200]])


def test_rasterize_fills_tumour_and_clears_exclusions(tmp_path):
    path = tmp_path / "s.xml"
    path.write_text(CAMELYON_LIKE)
    mask = rasterize_regions(read_asap_xml(path), (256, 256), downsample=4)
    assert mask.shape == (64, 64)
    # pixel centres (c + 0.5) * 4 inside [40, 200]: c = 10..49 (40 px a side); minus the 10 x 10 exclusion
    assert mask.sum() == 40 * 40 - 10 * 10
    assert mask[10:50, 10:50].sum() == 1500 and not mask[20:30, 20:30].any()


def test_mask_file_gives_patch_labels(tmp_path):
    path = tmp_path / "s.xml"
    path.write_text(CAMELYON_LIKE)
    png, tumour_px = write_annotation_mask(path, (256, 256), tmp_path / "m.png", downsample=4)
    assert tumour_px == 1500 and set(np.unique(np.asarray(Image.open(png)))) == {0, 2}
    coords = np.array([[40, 40], [80, 80], [0, 0], [120, 40]])
    fraction, labels = instance_labels(png, coords, 40, mask_downsample=4)
    np.testing.assert_allclose(fraction, [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(labels, [1, 0, 0, 1])


@pytest.mark.parametrize("text, message", [
    ("not xml at all <", "not a readable XML file"),
    ("<ASAP_Annotations><Annotations/></ASAP_Annotations>", "no <Annotation> element"),
    (_asap('<Annotation Name="thin" Type="Polygon"><Coordinates><Coordinate Order="0" X="1" Y="1" />'
           '<Coordinate Order="1" X="2" Y="2" /></Coordinates></Annotation>'), "'thin' .* has 2 coordinates"),
    (_asap('<Annotation Name="bad" Type="Polygon"><Coordinates><Coordinate Order="0" X="a" Y="1" />'
           '</Coordinates></Annotation>'), "'bad' has a coordinate that is not a number"),
])
def test_bad_annotation_files_name_file_and_annotation(tmp_path, text, message):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        read_asap_xml(path)
    assert "bad.xml" in str(err.value)


def test_cli_writes_masks_and_a_manifest_that_gives_instance_labels(tmp_path, tiny_slide, capsys):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / "tumour_slide.xml").write_text(_asap(_square("t", "_0", 0, 0, 256, 256)))
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"slide_id": ["tumour_slide", "normal_slide"], "case_id": ["a", "b"],
                  "path": [str(tiny_slide)] * 2, "label": [1, 0]}).to_csv(manifest, index=False)
    out = tmp_path / "masks"
    code = main(["data", "masks", "--manifest", str(manifest), "--annotations", str(annotations),
                 "--out", str(out), "--downsample", "8"])
    assert code == 0 and "1/2 slides with tumour annotations" in capsys.readouterr().out
    written = pd.read_csv(out / "manifest.csv")
    assert list(written["mask_downsample"]) == [8.0, 8.0] and written["mask_path"].str.endswith(".png").all()
    coords = np.array([[0, 0], [128, 128], [512, 512]])
    _, labels = instance_labels(written.iloc[0], coords, 128)
    np.testing.assert_array_equal(labels, [1, 1, 0])
    _, labels = instance_labels(written.iloc[1], coords, 128)  # no annotation: an empty mask
    np.testing.assert_array_equal(labels, [0, 0, 0])
    code = main(["data", "masks", "--manifest", str(manifest), "--annotations", str(annotations),
                 "--out", str(tmp_path / "skip"), "--missing", "skip"])
    skipped = pd.read_csv(tmp_path / "skip" / "manifest.csv")
    assert code == 0 and skipped["mask_path"].isna().tolist() == [False, True]
    assert main(["data", "masks", "--manifest", str(manifest), "--annotations", str(tmp_path / "nope"),
                 "--out", str(out)]) == 2
