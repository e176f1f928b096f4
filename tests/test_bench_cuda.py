"""The GPU check (milstudy.bench.cuda): on a machine without CUDA it is refused by name and left out of --all;
its foreground is irregular, shuffled and padded like the CPU bench's. The check itself runs on a GPU only."""

import pytest
import torch

import milstudy.bench as bench
from milstudy.bench import cuda
from milstudy.cli import main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA behaviour")


def test_the_gpu_check_is_refused_by_name_and_skipped_by_all_without_cuda(capsys, monkeypatch, tmp_path):
    assert bench.requires_cuda("cuda") and not bench.requires_cuda("models")
    assert main(["bench", "cuda", "--out", str(tmp_path)]) == 2
    assert "need a CUDA device" in capsys.readouterr().out
    monkeypatch.setattr(bench, "available", lambda: ["cuda"])
    assert main(["bench", "--all", "--out", str(tmp_path)]) == 0
    assert "cuda: skipped" in capsys.readouterr().out and not any(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        cuda.run(tmp_path)


def test_the_check_foreground_is_shuffled_with_a_padded_tail():
    coords, mask = cuda._foreground(500)
    assert coords.shape == (2, 500, 2) and mask[0].all() and int((~mask[1]).sum()) == 100
    assert len({tuple(c) for c in coords[0].tolist()}) == 500  # distinct cells
    assert not torch.equal(coords[0], coords[0][torch.argsort(coords[0][:, 1] * 10_000 + coords[0][:, 0])])


def test_the_kernel_and_e2e_sections_run_and_pass_on_cpu_for_the_torch_backend():
    rows = cuda.kernel_rows(n=300, device="cpu", backends=("torch",))
    assert [r["name"] for r in rows] == ["local attention, backend=torch", "full attention, backend=torch"]
    assert all(r["pass"] and r["max_abs_error"] < 1e-5 for r in rows)
    e2e = cuda.e2e_amp_rows(device="cpu")  # amp and channels_last are CUDA-only: both runs are fp32 here
    assert all(r["pass"] for r in e2e) and e2e[0]["max_abs_error"] == 0.0
