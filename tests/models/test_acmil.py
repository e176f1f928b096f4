"""ACMIL (milstudy.models.acmil): STKIM drops exactly floor(min(n_masked, N) * p) of each branch's top-scored real
instances in training and none in eval; the slide attention is the branch mean; the loss is the slide task loss +
the mean branch loss + the branch-diversity term; padding never counts."""

import pytest
import torch

from milstudy.models import build_model, combined_loss
from milstudy.models.acmil import branch_diversity, stochastic_topk_mask


def test_stkim_drops_the_stated_number_of_top_instances_per_bag_and_branch():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 4:] = False  # the second bag has 4 real instances: m = 4, floor(4 * 0.6) = 2 dropped
    dropped = stochastic_topk_mask(scores, mask, n_masked=10, drop=0.6)
    assert dropped[0].sum(-1).tolist() == [6, 6, 6] and dropped[1].sum(-1).tolist() == [2, 2, 2]
    assert not bool(dropped[1][:, 4:].any())  # never a padded position
    top10 = scores[0].argsort(-1, descending=True)[:, :10]
    for k in range(3):  # only among the branch's own top 10
        assert set(dropped[0, k].nonzero().flatten().tolist()) <= set(top10[k].tolist())
    assert not bool(stochastic_topk_mask(scores, mask, n_masked=1, drop=0.6).any())  # floor(0.6) = 0


def test_training_drops_and_eval_is_deterministic_and_the_slide_attention_is_the_branch_mean():
    torch.manual_seed(0)
    model = build_model("acmil", 8, 2, hidden_dim=16, attention_dim=8, n_branches=3)
    x = torch.randn(1, 30, 8)
    model.train()
    out = model(x)
    assert ((out.attention == 0).sum(-1) == 6).all()  # 6 of each branch's top 10 carry no weight
    model.eval()
    first, second = model(x), model(x)
    assert torch.equal(first.logits, second.logits) and bool((first.attention > 0).all())
    bag = torch.einsum("bn,bnl->bl", first.attention.mean(1), model.embed(x))
    torch.testing.assert_close(first.logits, model.classifier(bag))


def test_the_loss_adds_the_mean_branch_loss_and_the_diversity_term():
    torch.manual_seed(0)
    model = build_model("acmil", 8, 2, hidden_dim=16, attention_dim=8, n_branches=4, n_masked=0).eval()
    out = model(torch.randn(2, 12, 8))
    target = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy
    want = ce(out.logits, target) + sum(ce(logits, target) for logits, _ in out.loss_streams.values()) / 4 \
        + branch_diversity(out.attention)
    torch.testing.assert_close(combined_loss(out, lambda z: ce(z, target)), want)
    same = torch.full((1, 3, 5), 0.2)
    assert float(branch_diversity(same)) == pytest.approx(1.0)
    disjoint = torch.eye(3)[None]  # three branches on three different instances
    assert float(branch_diversity(disjoint)) == 0.0


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="n_branches >= 1"):
        build_model("acmil", 8, 2, n_branches=0)
    with pytest.raises(ValueError, match="mask_drop in"):
        build_model("acmil", 8, 2, mask_drop=1.5)
