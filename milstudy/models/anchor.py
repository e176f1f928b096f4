"""The ASMIL attention anchor as a plug-in for any attention model (spec asmil.md §2.3-2.5, §2.8, §3.1).

Paper: Ye et al., "ASMIL: Attention-Stabilized Multiple Instance Learning for Whole Slide Imaging" (Eqs. 4, 5, 9
reconstructed in the spec; the extracted text lost them).

``AnchoredMIL(online, ...)`` keeps the online model as ``.online`` and an EMA copy as ``.anchor``:

- EMA (Eq. 4): ``θ̃ <- β θ̃ + (1-β) θ`` over parameters and floating buffers (integer buffers copied), in
  ``after_optimizer_step()`` (``update="step"``, default) or ``on_epoch_end`` (``update="epoch"``), computed as
  ``θ̃.lerp_(θ, 1-β)`` so that an anchor equal to the online model stays bit-identical.
- The anchor's tensors are stored as **buffers** (its ``nn.Parameter`` s are converted at construction): they
  are never in ``parameters()``, so never in the optimizer and never given gradient; ``.to()``/``.double()`` and
  ``state_dict`` still carry them. It always runs in eval mode under ``no_grad`` (no dropout, no token drop, so it
  consumes no RNG: a λ=0 run is bit-identical to the unwrapped model, spec §6.8).
- Cost: this first version runs the **whole** anchor copy (not only the modules producing the attention logits,
  spec §2.3 ideal); trimming per model is future work. At eval the wrapper returns the online output unchanged.
- Objective (Eq. 9): ``aux_losses["anchor_kl"] = λ · R[KL(ã ‖ a)]`` in training only, with ``a`` the masked
  softmax of the online ``attention_logits [B,H,N]`` and ``ã`` the target from the anchor logits (its
  ``extras["attention_scores"]`` when the model normalises its attention otherwise than by a softmax online):
  ``"nsf"`` NSF_T (Eq. 5, §2.4), ``"softmax"`` softmax(s̃/T), ``"entmax"`` α-entmax (the ``entmax``
  package). The reduction R is ``"per_distribution"`` (mean over bags and heads of Σ_i, our default) or
  ``"upstream"`` (each distribution weighted 1/N_b, the released 1/N scaling). ``kl_tokens="kept"`` restricts the
  mean to the heads the online model marks in ``extras["head_keep"] [B,H]`` (ASMIL's kept FEAT tokens).
- ``anchor_mode``: ``"ema"`` (default); ``"frozen_random"`` (released behaviour §3.1: the anchor is an
  independently initialised network that never updates); ``"uniform_target"`` (target uniform over real tiles);
  ``"none"`` (no KL).
- ``anchor_warmup_epochs=k`` (our diagnostic, not in the paper): no KL during the first k epochs while the EMA
  tracks the online model, then the KL as configured (ASMIL's uniform start, issue 12).
- AEM control: ``aem_weight=β_e > 0`` adds ``aux_losses["aem"] = -β_e · mean_{B,H} H(a)`` (entropy maximisation).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from milstudy.models.base import MILModel, MILOutput
from milstudy.models.layers import masked_softmax

ANCHOR_MODES = ("ema", "frozen_random", "uniform_target", "none")
TARGETS = ("nsf", "softmax", "entmax")
KL_REDUCTIONS = ("per_distribution", "upstream")
KL_TOKENS = ("all", "kept")
UPDATES = ("step", "epoch")
NSF_EPS = 1e-8

# Keyword names build_model routes to the wrapper (everything else goes to the base model).
ANCHOR_KWARGS = (
    "anchor_mode", "anchor_beta", "anchor_update", "anchor_target", "anchor_temperature", "anchor_lambda",
    "kl_reduction", "kl_tokens", "aem_weight", "entmax_alpha", "anchor_warmup_epochs",
)


def nsf(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0, eps: float = NSF_EPS) -> torch.Tensor:
    """Normalised sigmoid (spec §2.4, Eq. 5): ``σ(z_i/T) / (Σ_j σ(z_j/T) + ε)`` over the real instances.

    logits ``[B, ..., N]``, mask ``[B, N]`` -> ``[B, ..., N]`` (exactly 0 on padding). Not shift-invariant.
    """
    expanded = mask.to(torch.bool).view(mask.shape[0], *([1] * (logits.dim() - 2)), mask.shape[1])
    sig = torch.sigmoid(logits / temperature).masked_fill(~expanded, 0.0)
    return sig / (sig.sum(-1, keepdim=True) + eps)


def entmax_target(logits: torch.Tensor, mask: torch.Tensor, alpha: float, temperature: float = 1.0) -> torch.Tensor:
    """α-entmax over the real instances (the ``entmax`` package's bisection; spec §4.3 S7): α = 1 is softmax,
    α = 2 sparsemax; padding gets exactly 0."""
    from entmax import entmax_bisect

    if alpha < 1:
        raise ValueError(f"entmax_alpha must be >= 1 (1 = softmax, 2 = sparsemax), got {alpha}")
    if alpha == 1:  # the bisection divides by alpha - 1; softmax is the limit
        return masked_softmax(logits / temperature, mask)
    expanded = mask.to(torch.bool).view(mask.shape[0], *([1] * (logits.dim() - 2)), mask.shape[1])
    z = (logits / temperature).masked_fill(~expanded, -1e4)
    return entmax_bisect(z, alpha=alpha, dim=-1).masked_fill(~expanded, 0.0)


def kl_to_online(
    target: torch.Tensor, online_logits: torch.Tensor, mask: torch.Tensor, reduction: str = "per_distribution",
    head_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``R[KL(target ‖ softmax(online_logits))]`` (spec §2.5). target, online_logits ``[B,H,N]``, mask ``[B,N]``,
    head_keep ``[B,H]`` bool or None (all heads). Returns a scalar.

    The gradient w.r.t. a real online logit i of distribution (b,h) is ``w_bh (a_i - ã_i)`` with
    ``w_bh = 1/#(b,h)`` (per_distribution) or ``1/(#(b,h) N_b)`` (upstream), #(b,h) the number of kept
    distributions.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    real = mask.to(torch.bool)[:, None, :].expand_as(online_logits)
    log_a = torch.log_softmax(online_logits.masked_fill(~real, float("-inf")), dim=-1).masked_fill(~real, 0.0)
    target = target.masked_fill(~real, 0.0)
    kl = (torch.xlogy(target, target) - target * log_a).sum(-1)  # [B,H]
    if reduction == "upstream":
        kl = kl / mask.to(kl.dtype).sum(-1, keepdim=True)
    if head_keep is None:
        return kl.mean()
    keep = head_keep.to(kl.dtype)
    return (kl * keep).sum() / keep.sum()


def _parameters_to_buffers(module: nn.Module) -> None:
    """Replace every ``nn.Parameter`` of ``module`` (recursively) by a buffer of the same name and value."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, param.detach().clone())


class AnchoredMIL(MILModel):
    """An online attention model plus its stop-gradient EMA anchor (spec §2.3, §2.8).

    ``forward(x [B,N,D], coords=None, mask=None, **kw) -> MILOutput``: the online output; in training it also
    holds ``aux_losses["anchor_kl"]`` (and ``"aem"``), and ``extras["anchor_target"] [B,H,N]`` (detached).
    ``anchor_source``: the network the anchor starts from for ``anchor_mode="frozen_random"`` (an independently
    initialised copy of the online architecture); other modes copy the online weights (θ̃₀ = θ₀).
    """

    def __init__(
        self,
        online: MILModel,
        anchor_mode: str = "ema",
        anchor_beta: float = 0.999,
        anchor_update: str = "step",
        anchor_target: str = "nsf",
        anchor_temperature: float = 1.0,
        anchor_lambda: float = 1.0,
        kl_reduction: str = "per_distribution",
        kl_tokens: str = "all",
        aem_weight: float = 0.0,
        entmax_alpha: float = 1.5,
        anchor_source: MILModel | None = None,
        anchor_warmup_epochs: int = 0,
    ) -> None:
        super().__init__()
        for name, value, allowed in [
            ("anchor_mode", anchor_mode, ANCHOR_MODES), ("anchor_target", anchor_target, TARGETS),
            ("kl_reduction", kl_reduction, KL_REDUCTIONS), ("kl_tokens", kl_tokens, KL_TOKENS),
            ("anchor_update", anchor_update, UPDATES),
        ]:
            if value not in allowed:
                raise ValueError(f"AnchoredMIL: {name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= anchor_beta <= 1.0:
            raise ValueError(f"AnchoredMIL: anchor_beta must be in [0, 1], got {anchor_beta}")
        if anchor_temperature <= 0:
            raise ValueError(f"AnchoredMIL: anchor_temperature must be > 0, got {anchor_temperature}")
        if anchor_lambda < 0 or aem_weight < 0:
            raise ValueError(f"AnchoredMIL: anchor_lambda and aem_weight must be >= 0, got {anchor_lambda}, {aem_weight}")
        if int(anchor_warmup_epochs) != anchor_warmup_epochs or anchor_warmup_epochs < 0:
            raise ValueError(f"AnchoredMIL: anchor_warmup_epochs must be an integer >= 0, got {anchor_warmup_epochs}")
        if anchor_mode == "frozen_random" and anchor_source is None:
            raise ValueError("AnchoredMIL: anchor_mode='frozen_random' needs anchor_source (a freshly built model)")
        if anchor_target == "entmax":
            entmax_target(torch.zeros(1, 1, 2), torch.ones(1, 2, dtype=torch.bool), entmax_alpha)  # fail early
        self.online = online
        self.anchor_mode, self.beta, self.update = anchor_mode, float(anchor_beta), anchor_update
        self.target_kind, self.temperature, self.lam = anchor_target, float(anchor_temperature), float(anchor_lambda)
        self.kl_reduction, self.kl_tokens = kl_reduction, kl_tokens
        self.aem_weight, self.entmax_alpha = float(aem_weight), float(entmax_alpha)
        self.needs_targets = getattr(online, "needs_targets", False)
        self.permutation_invariant = getattr(online, "permutation_invariant", True)
        self.warmup_epochs = int(anchor_warmup_epochs)
        if self.warmup_epochs:  # epochs finished so far: a buffer, so that a resumed run knows where it is
            self.register_buffer("epochs_done", torch.zeros((), dtype=torch.int64))
        self.anchor: nn.Module | None = None
        if anchor_mode in ("ema", "frozen_random"):
            source = online if anchor_mode == "ema" else anchor_source
            self.anchor = copy.deepcopy(source)
            _parameters_to_buffers(self.anchor)
            self.anchor.eval()

    def train(self, mode: bool = True) -> "AnchoredMIL":
        super().train(mode)
        if self.anchor is not None:
            self.anchor.eval()  # the anchor is always in eval mode
        return self

    @torch.no_grad()
    def anchor_logits(self, x: torch.Tensor, coords: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """The anchor's attention scores ``[B,H,N]`` (eval mode, no grad) that the target normalises: its
        ``extras["attention_scores"]`` where the model normalises its own attention otherwise than by a softmax
        (NSF or the Eq. 34 mixture online, ``milstudy.models.attention_normalization``), else its
        ``attention_logits``."""
        out = self.anchor(x, coords=coords, mask=mask)
        scores = out.extras.get("attention_scores", out.attention_logits)
        if scores is None:
            raise ValueError(f"AnchoredMIL: the anchor ({type(self.anchor).__name__}) returns no attention_logits")
        return scores

    def target(self, x: torch.Tensor, coords: torch.Tensor | None, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The KL target ``ã [B,H,N]`` (detached, 0 on padding) for the configured mode and target kind."""
        if self.anchor_mode == "uniform_target":
            weights = mask.to(torch.get_default_dtype() if not x.is_floating_point() else x.dtype)
            return (weights / weights.sum(-1, keepdim=True))[:, None, :].expand(shape)
        logits = self.anchor_logits(x, coords, mask)
        if self.target_kind == "nsf":
            return nsf(logits, mask, self.temperature)
        if self.target_kind == "softmax":
            return masked_softmax(logits / self.temperature, mask)
        return entmax_target(logits, mask, self.entmax_alpha, self.temperature)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None, **kwargs
    ) -> MILOutput:
        out = self.online(x, coords=coords, mask=mask, **kwargs)
        if not self.training:
            return out
        if out.attention_logits is None:
            raise ValueError(f"AnchoredMIL: {type(self.online).__name__} returns no attention_logits to anchor")
        real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.to(torch.bool)
        if self.anchor_mode != "none" and self.kl_active:
            head_keep = None
            if self.kl_tokens == "kept":
                if "head_keep" not in out.extras:
                    raise ValueError("AnchoredMIL: kl_tokens='kept' needs extras['head_keep'] from the online model")
                head_keep = out.extras["head_keep"]
            target = self.target(x, coords, real, out.attention_logits.shape).detach()
            out.extras["anchor_target"] = target
            kl = kl_to_online(target, out.attention_logits, real, self.kl_reduction, head_keep)
            out.aux_losses["anchor_kl"] = self.lam * kl
        if self.aem_weight > 0:
            attention = masked_softmax(out.attention_logits, real)
            entropy = -torch.xlogy(attention, attention).sum(-1)  # [B,H]
            out.aux_losses["aem"] = -self.aem_weight * entropy.mean()
        return out

    @property
    def kl_active(self) -> bool:
        """The KL term is on: always, or once ``anchor_warmup_epochs`` epochs have ended (the EMA tracks the online
        model throughout, so the anchor the KL then uses is an average of recent online weights)."""
        return not self.warmup_epochs or int(self.epochs_done) >= self.warmup_epochs

    @torch.no_grad()
    def ema_update(self) -> None:
        """``θ̃ <- β θ̃ + (1-β) θ`` over parameters and floating buffers; integer buffers are copied."""
        if self.anchor is None or self.anchor_mode != "ema":
            return
        anchor_state = dict(self.anchor.named_buffers())
        for name, tensor in [*self.online.named_parameters(), *self.online.named_buffers()]:
            target = anchor_state[name]
            if target.is_floating_point():
                target.lerp_(tensor.detach().to(target.dtype), 1.0 - self.beta)
            else:
                target.copy_(tensor)

    def after_optimizer_step(self) -> None:
        self.online.after_optimizer_step()
        if self.update == "step":
            self.ema_update()

    def on_epoch_end(self, epoch: int) -> None:
        self.online.on_epoch_end(epoch)
        if self.update == "epoch":
            self.ema_update()
        if self.warmup_epochs:
            self.epochs_done.fill_(int(epoch))


def split_anchor_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(base-model kwargs, anchor kwargs): names in ``ANCHOR_KWARGS`` go to the wrapper."""
    anchor = {k: v for k, v in kwargs.items() if k in ANCHOR_KWARGS}
    base = {k: v for k, v in kwargs.items() if k not in ANCHOR_KWARGS}
    return base, anchor


def build_anchored(factory: Callable[[], MILModel], **anchor_kwargs) -> AnchoredMIL:
    """Wrap ``factory()``; for ``frozen_random`` a second ``factory()`` call gives the independent random anchor."""
    online = factory()
    source = factory() if anchor_kwargs.get("anchor_mode", "ema") == "frozen_random" else None
    return AnchoredMIL(online, anchor_source=source, **anchor_kwargs)
