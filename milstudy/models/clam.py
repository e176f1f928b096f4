"""CLAM-SB: single-branch clustering-constrained attention MIL (Lu et al. 2021, Nat. Biomed. Eng., Eqs. 1-5).

    h_k = Drop(ReLU(W_1 x_k))                                    [B,N,512]
    a_k = softmax_k( W_a (tanh(V h_k) ⊙ sigm(U h_k)) )           [B,1,N]   gated attention (Eq. 1-2)
    z = Σ_k a_k h_k,   logits = W_c z                            [B,C]     (Eq. 3)
    instance loss (Eq. 4-5): for the true class y, the top-k attended instances get pseudo-label 1 and the
    bottom-k get 0 under y's instance classifier W_inst^y (512 -> 2); with ``subtyping=True`` the top-k of every
    other class c ≠ y get pseudo-label 0 under W_inst^c (averaged over classes). Loss: smooth top-1 SVM
    (Berrada et al. 2018, τ=1, α=1; the paper's default) or cross-entropy.

Targets mechanism (general for the zoo): models whose auxiliary losses need the bag label set
``needs_targets = True`` and accept ``forward(..., targets=LongTensor[B])``; the trainer passes it when
``getattr(model, "needs_targets", False)``. ``aux_losses["instance"]`` is ``instance_loss_weight`` x the
instance loss (averaged over bags). CLAM trains with 0.7·bag + 0.3·instance; the default weight 0.3/0.7 keeps
that ratio when the trainer adds it to the unweighted bag loss. No targets -> no aux loss.
k (``k_sample=8``) is clamped to ⌊n/2⌋ (≥1) per bag so top and bottom sets do not overlap on small bags.
Gradient exception: the instance classifier of a class absent from a batch's labels gets no gradient
(subtyping=False), as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from milstudy.models.abmil import AttentionScorer
from milstudy.models.base import MILModel, MILOutput, register_model
from milstudy.models.layers import check_bag_input, masked_softmax, pad_attention_logits


def smooth_top1_svm_loss(logits: torch.Tensor, target: torch.Tensor, tau: float = 1.0, alpha: float = 1.0):
    """Smooth top-1 multiclass SVM (Berrada et al. 2018): τ·logsumexp((s + α·[j≠y])/τ) - s_y, mean over rows.

    logits ``[M, K]``, target ``[M]`` long -> scalar.
    """
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[-1]).to(logits.dtype))
    return (tau * torch.logsumexp((logits + margin) / tau, dim=-1) - logits.gather(1, target[:, None])[:, 0]).mean()


class CLAMSB(MILModel):
    """CLAM-SB; ``forward(x [B,N,D], coords=None, mask=None, targets=None) -> MILOutput``.

    attention ``[B,1,N]``; ``attention_logits`` ``[B,1,N]`` the gated scores before the softmax (``PAD_LOGIT`` on
    padding); extras ``bag_embedding`` ``[B,512]``.
    """

    needs_targets = True

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        subtyping: bool = False,
        instance_loss: str = "svm",
        instance_loss_weight: float = 0.3 / 0.7,
    ) -> None:
        super().__init__()
        if instance_loss not in ("svm", "ce"):
            raise ValueError(f"CLAM-SB: instance_loss must be 'svm' or 'ce', got {instance_loss!r}")
        self.in_dim, self.n_out, self.k_sample, self.subtyping = in_dim, n_out, k_sample, subtyping
        self.instance_loss_name, self.instance_loss_weight = instance_loss, instance_loss_weight
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.scorer = AttentionScorer(hidden_dim, attention_dim, gated=True, dropout=dropout)
        self.classifier = nn.Linear(hidden_dim, n_out)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden_dim, 2) for _ in range(n_out)])

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.instance_loss_name == "svm":
            return smooth_top1_svm_loss(logits, target)
        return F.cross_entropy(logits, target)

    def instance_loss(self, h: torch.Tensor, weights: torch.Tensor, label: int) -> torch.Tensor:
        """Eq. 4-5 for one bag: h ``[n,L]`` real instances, weights ``[n]`` post-softmax -> scalar."""
        k = min(self.k_sample, max(1, h.shape[0] // 2))
        top = torch.topk(weights, k).indices
        total, used = h.new_zeros(()), 0
        for cls, inst_classifier in enumerate(self.instance_classifiers):
            if cls == label:  # in-class: top-k positive, bottom-k negative
                bottom = torch.topk(-weights, k).indices
                feats = torch.cat([h[top], h[bottom]])
                target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
            elif self.subtyping:  # out-of-class: top-k are negatives of class cls
                feats, target = h[top], torch.zeros(k, dtype=torch.long, device=h.device)
            else:
                continue
            total, used = total + self._loss(inst_classifier(feats), target), used + 1
        return total / used if self.subtyping else total

    def forward(
        self,
        x: torch.Tensor,
        coords: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> MILOutput:
        """x ``[B,N,D]``; targets ``[B]`` class indices (optional, enables ``aux_losses["instance"]``)."""
        mask = check_bag_input(x, self.in_dim, mask, "CLAM-SB")
        h = self.embed(x)  # [B,N,L]
        scores = pad_attention_logits(self.scorer(h).unsqueeze(1), mask)  # [B,1,N]
        weights = masked_softmax(scores, mask)
        bag = torch.einsum("bhn,bnl->bl", weights, h)  # [B,L]
        output = MILOutput(self.classifier(bag), weights, attention_logits=scores, extras={"bag_embedding": bag})
        if targets is not None:
            targets = torch.as_tensor(targets, device=x.device).reshape(-1)
            if targets.dtype.is_floating_point or targets.numel() != x.shape[0]:
                raise ValueError(f"CLAM-SB: targets must be {x.shape[0]} class indices, got {tuple(targets.shape)}")
            losses = []
            for b in range(x.shape[0]):  # a bag without padding is used as it is (no copy, no scatter in backward)
                real = None if bool(mask[b].all()) else mask[b]
                hb, wb = (h[b], weights[b, 0]) if real is None else (h[b, real], weights[b, 0, real])
                losses.append(self.instance_loss(hb, wb, int(targets[b])))
            output.aux_losses["instance"] = self.instance_loss_weight * torch.stack(losses).mean()
        return output


@register_model("clam_sb")
def build_clam_sb(in_dim: int, n_out: int, **kwargs) -> CLAMSB:
    """CLAM-SB with the paper's defaults (512/256 gated attention, k=8, smooth SVM instance loss)."""
    return CLAMSB(in_dim, n_out, **kwargs)
