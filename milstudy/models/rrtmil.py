"""RRT-MIL: feature re-embedding by an R-MSA + CR-MSA encoder, then ABMIL (Tang et al. 2024, CVPR).

Layout learnt from the authors' repository DearCaat/RRT-MIL at 7ecbdfb (modules/rrt.py ``RRTMIL`` / ``RRTEncoder`` /
``TransLayer``, modules/rmsa.py ``InnerAttention`` / ``RegionAttntion`` / ``CrossRegionAttntion``, modules/datten.py
``DAttention``, main.py argparse defaults and README run commands); our own code. With upstream's weights loaded
(float64, eval) it gave upstream's logits and attention to 1e-15 for N = 1 ... 3000 (a check outside the repo):

    H = Drop_0.25(ReLU(X W_in))                               [B,N,D]   projection (upstream: always to 512)
    H ← H + R-MSA(LN(H))                                      ``rmsa_layers`` = upstream n_trans_layers - 1 = 1
    H ← H + CR-MSA(LN(H))                                     (H ← H + H_proj with ``all_shortcut``)
    H ← LN(H)
    a = w_2ᵀ tanh(W_1 H) (no biases), z = softmax_N(a)ᵀ H     [B,1,N]   ABMIL head (DAttention), logits = W_c z

Region layout (both blocks, each on its own LN'd input): s = ⌈√N⌉ rounded up to a multiple of R (regions per
side), the N tokens fill an s x s grid row by row, the rest are ZERO tokens, and the grid is split into R x R
regions of (s/R)² tokens. R-MSA: multi-head softmax attention inside each region, with EPEG (a depthwise (k,1)
convolution of the attention logits along the query axis, added to them). CR-MSA: per region, k representatives
r = softmax_P(φᵀx)-weighted sums of its tokens; the j-th representatives of all regions attend to each other
(plain MSA); token p of a region gets Σ_j softmax_j(φᵀx_p) · minmax_P(φ_jᵀx)_p · r'_j. Zero tokens take part in
every softmax and min-max, as upstream; outputs at them are dropped.

Upstream defaults (main.py, classification) and what we keep: D=512 (``dim``; our projection also goes to ``dim``),
act relu, projection dropout 0.25, region_num R=8 (``regions``), n_heads 8 (head_dim D/8), qkv_bias on,
trans_drop_out 0.1 on the attention output projection (``attn_dropout``), attention dropout 0, drop_path 0, no FFN,
EPEG on with epeg_k=15, 1-D, with bias, on the attention logits (``epeg_k``; 0 disables); CR-MSA on (``cr_msa``)
with crmsa_k=3 (``crmsa_k``), crmsa_heads=8, φ a [D,k] parameter (crmsa_mlp off), and R=8 regions always (upstream
never passes region_num to it; ``crmsa_regions``); all_shortcut off; pos='none' (PEG/PPEG: ablation only, not
kept); ABMIL head: 128 hidden, no biases, not gated, no dropout; da_act 'relu' in argparse but every README command
uses ``--da_act=tanh``, so ``pool_activation="tanh"``. Xavier-normal init of Linear/Conv, zero biases (φ: Kaiming-
uniform). Not kept: region_size / min_region_num / min_region_ratio (ablations), Nyström regions, epeg_2d/epeg_type.

Consequence of R=8 (upstream's, kept): every bag of at most 64 instances has one-token regions, where R-MSA is a
per-token map (softmax over one key: q, k and EPEG get no gradient) and CR-MSA's min-max is 0 (adds nothing).
Deviation: upstream runs one bag at a time; its CR-MSA would mix the regions of all bags of a batch. Here every bag
is its own sequence. Not permutation invariant (regions are the instance order laid out as a grid; EPEG convolves
that order): ``permutation_invariant = False``. Masking, as TransMIL here: each bag's real instances (in order) are
laid out by its own N; bags sharing the grid side are run together with the other slots zeroed, which equals
running the bags one at a time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from milstudy.models.base import MILModel, MILOutput, register_model
from milstudy.models.layers import PAD_LOGIT, check_bag_input, masked_softmax, pad_attention_logits

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def grid_side(n: int, regions: int) -> int:
    """Side s of the square layout of ``n`` tokens: ⌈√n⌉ rounded up to a multiple of ``regions``."""
    side = math.isqrt(n - 1) + 1 if n > 1 else 1
    return side + (-side) % regions


def to_regions(x: torch.Tensor, regions: int) -> torch.Tensor:
    """``[G, s², D]`` grid tokens (row-major) -> ``[G, R², (s/R)², D]`` tokens per region (row-major regions)."""
    groups, tokens, dim = x.shape
    side = math.isqrt(tokens)
    size = side // regions
    x = x.view(groups, regions, size, regions, size, dim).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(groups, regions * regions, size * size, dim)


def from_regions(x: torch.Tensor, regions: int) -> torch.Tensor:
    """Inverse of ``to_regions``: ``[G, R², P, D]`` -> ``[G, s², D]``."""
    groups, _, tokens, dim = x.shape
    size = math.isqrt(tokens)
    x = x.view(groups, regions, regions, size, size, dim).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(groups, (regions * size) ** 2, dim)


class MultiHeadAttention(nn.Module):
    """Softmax MSA over ``[M, T, D]`` sequences (upstream InnerAttention), optionally with EPEG on the logits."""

    def __init__(self, dim: int, heads: int, dropout: float, epeg_k: int = 0, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"RRTMIL: dim={dim} must be divisible by the number of heads ({heads})")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.epeg = (
            nn.Conv2d(heads, heads, (epeg_k, 1), padding=(epeg_k // 2, 0), groups=heads) if epeg_k else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seqs, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(seqs, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q * self.head_dim**-0.5) @ k.transpose(-1, -2)  # [M,h,T,T]
        if self.epeg is not None:
            scores = scores + self.epeg(scores)  # EPEG: depthwise conv along the query axis
        out = torch.softmax(scores, dim=-1) @ v  # [M,h,T,dh]
        return self.proj(out.transpose(1, 2).reshape(seqs, tokens, dim))


class RegionMSA(nn.Module):
    """R-MSA mixer: attention inside each region, ``[G, W, P, D] -> [G, W, P, D]``."""

    def __init__(self, dim: int, heads: int, dropout: float, epeg_k: int, qkv_bias: bool) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(dim, heads, dropout, epeg_k, qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups, windows, tokens, dim = x.shape
        return self.attention(x.reshape(groups * windows, tokens, dim)).view(groups, windows, tokens, dim)


class CrossRegionMSA(nn.Module):
    """CR-MSA mixer: k representatives per region attend across regions, then are dispatched back to the tokens."""

    def __init__(self, dim: int, heads: int, dropout: float, k: int, qkv_bias: bool) -> None:
        super().__init__()
        self.phi = nn.Parameter(torch.empty(dim, k))
        nn.init.kaiming_uniform_(self.phi, a=math.sqrt(5))
        self.attention = MultiHeadAttention(dim, heads, dropout, epeg_k=0, qkv_bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups, windows, tokens, dim = x.shape
        logits = torch.einsum("gwpd,dk->gwkp", x, self.phi)  # [G,W,k,P]
        combine = torch.softmax(logits, dim=-1)  # over the tokens of a region
        dispatch = torch.softmax(logits, dim=2)  # over the k representatives
        low, high = logits.amin(dim=-1, keepdim=True), logits.amax(dim=-1, keepdim=True)
        minmax = (logits - low) / (high - low + 1e-8)
        reps = torch.einsum("gwkp,gwpd->gkwd", combine, x)  # [G,k,W,D]: one sequence of W regions per j
        reps = self.attention(reps.reshape(-1, windows, dim)).view(groups, -1, windows, dim)
        return torch.einsum("gkwd,gwkp->gwpd", reps, minmax * dispatch)


class RegionBlock(nn.Module):
    """Pre-LN residual block over the region layout: ``h + mixer(regions(LN(h) zeroed off the bag)))``."""

    def __init__(self, dim: int, regions: int, mixer: nn.Module) -> None:
        super().__init__()
        self.norm, self.regions, self.mixer = nn.LayerNorm(dim), regions, mixer

    def forward(self, h: torch.Tensor, valid: torch.Tensor, side: int) -> torch.Tensor:
        """h ``[G,L,D]`` (real tokens first), valid ``[G,L]``, side s of this block's layout (s² >= L)."""
        groups, length, dim = h.shape
        z = self.norm(h).masked_fill(~valid[..., None], 0.0)  # upstream's zero tokens after the LN
        z = torch.cat([z, z.new_zeros(groups, side * side - length, dim)], dim=1)
        out = from_regions(self.mixer(to_regions(z, self.regions)), self.regions)
        return h + out[:, :length]


class RRTMIL(MILModel):
    """RRT-MIL; ``forward(x [B,N,D_in], coords=None, mask=None) -> MILOutput`` with the ABMIL head's attention
    ``[B,1,N]`` and its pre-softmax scores (``PAD_LOGIT`` on padding). extras: ``bag_embedding`` ``[B,D]``."""

    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        dim: int = 512,
        heads: int = 8,
        regions: int = 8,
        rmsa_layers: int = 1,
        epeg_k: int = 15,
        cr_msa: bool = True,
        crmsa_k: int = 3,
        crmsa_heads: int = 8,
        crmsa_regions: int = 8,
        all_shortcut: bool = False,
        activation: str = "relu",
        pool_activation: str = "tanh",
        dropout: float = 0.25,
        attn_dropout: float = 0.1,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        for name, act in (("activation", activation), ("pool_activation", pool_activation)):
            if act not in ACTIVATIONS:
                raise ValueError(f"RRTMIL: {name} must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        if min(regions, crmsa_regions) < 1 or rmsa_layers < 0 or (epeg_k and epeg_k % 2 == 0):
            raise ValueError("RRTMIL: regions >= 1, rmsa_layers >= 0 and an odd epeg_k (or 0 to disable) required")
        self.in_dim, self.all_shortcut = in_dim, all_shortcut
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), ACTIVATIONS[activation](), nn.Dropout(dropout))
        self.rmsa = nn.ModuleList(
            RegionBlock(dim, regions, RegionMSA(dim, heads, attn_dropout, epeg_k, qkv_bias))
            for _ in range(rmsa_layers)
        )
        self.crmsa = (
            RegionBlock(dim, crmsa_regions, CrossRegionMSA(dim, crmsa_heads, attn_dropout, crmsa_k, qkv_bias))
            if cr_msa else None
        )
        self.norm = nn.LayerNorm(dim)
        self.scorer = nn.Sequential(
            nn.Linear(dim, 128, bias=False), ACTIVATIONS[pool_activation](), nn.Linear(128, 1, bias=False)
        )
        self.classifier = nn.Linear(dim, n_out)
        for module in self.modules():  # upstream initialize_weights (φ is a Parameter and keeps its init)
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _blocks(self) -> list[RegionBlock]:
        return [*self.rmsa, *([self.crmsa] if self.crmsa is not None else [])]

    def _sides(self, n: int) -> tuple[int, ...]:
        return tuple(grid_side(n, block.regions) for block in self._blocks())

    def _forward_group(self, x: torch.Tensor, mask: torch.Tensor, sides: tuple[int, ...]):
        """Bags sharing every block's layout: x ``[G,N,D_in]``, mask ``[G,N]`` -> logits ``[G,C]``, attention
        and attention logits ``[G,1,N]``, bag embeddings ``[G,D]``."""
        counts = mask.sum(dim=1)
        length = int(counts.max())
        index = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :length]  # real instances first
        valid = torch.arange(length, device=x.device)[None, :] < counts[:, None]  # [G,L]
        x = torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1])).masked_fill(~valid[..., None], 0.0)
        h = shortcut = self.embed(x)  # [G,L,D]
        for block, side in zip(self._blocks(), sides):
            h = block(h, valid, side)
        if self.all_shortcut:
            h = h + shortcut
        h = self.norm(h)
        scores = self.scorer(h).squeeze(-1).masked_fill(~valid, PAD_LOGIT)  # [G,L]
        scores = torch.full(mask.shape, PAD_LOGIT, dtype=h.dtype, device=x.device).scatter(1, index, scores)
        scores = pad_attention_logits(scores.unsqueeze(1), mask)  # [G,1,N] in the input's positions
        weights = masked_softmax(scores, mask)
        bag = torch.einsum("gn,gnd->gd", torch.gather(weights[:, 0], 1, index), h)  # [G,D]
        return self.classifier(bag), weights, scores, bag

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MILOutput:
        """x ``[B,N,D_in]`` -> MILOutput (coords unused: the layout is the instance order)."""
        mask = check_bag_input(x, self.in_dim, mask, "RRTMIL")
        keys = [self._sides(int(n)) for n in mask.sum(dim=1).tolist()]
        if all(key == keys[0] for key in keys):
            logits, attention, attention_logits, bag = self._forward_group(x, mask, keys[0])
        else:
            batch, n_max = mask.shape
            attention = x.new_zeros(batch, 1, n_max)
            attention_logits = torch.full_like(attention, PAD_LOGIT)
            logits = x.new_zeros(batch, self.classifier.out_features)
            bag = x.new_zeros(batch, self.classifier.in_features)
            for key in dict.fromkeys(keys):
                rows = torch.tensor([b for b, k in enumerate(keys) if k == key], device=x.device)
                parts = self._forward_group(x[rows], mask[rows], key)
                fulls = (logits, attention, attention_logits, bag)
                logits, attention, attention_logits, bag = (f.index_copy(0, rows, p) for f, p in zip(fulls, parts))
        return MILOutput(logits, attention, attention_logits=attention_logits, extras={"bag_embedding": bag})


@register_model("rrtmil")
def build_rrtmil(in_dim: int, n_out: int, **kwargs) -> RRTMIL:
    """RRT-MIL with upstream main.py's classification defaults (512 wide, 8 heads, 8 regions, EPEG k=15, CR-MSA
    k=3); ``dim`` sets the width (e.g. 64 on a CPU)."""
    return RRTMIL(in_dim, n_out, **kwargs)
