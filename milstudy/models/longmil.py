"""LongMIL (Li et al., NeurIPS 2024, "Rethinking Transformer for Long Contextual Histopathology WSI Analysis";
``shared/papers/004_cf96cfc6d2df712f.txt``; our spec ``shared/specs/longmil.md`` §2.2-2.3): local-global
self-attention over the 2-D patch grid.

Layout (``preset="paper"``, spec §2.2): ``Linear(d_in, 384) + ReLU`` -> 2 pre-LN blocks of exact 2-D **local**
attention (keys within Euclidean radius r = 10 grid units, every head masked, 2-D ALiBi ``-m_h D_ij`` inside the
window, :func:`milstudy.models.local_attention.local_attention_2d`) -> 2 x 2 pooling by grid cell (the mean of the
1-4 tokens of a cell, at the cell's index: our rule, spec §2.2) -> 1 pre-LN block of exact **full** attention with
unclipped Euclidean 2-D ALiBi (:func:`~milstudy.models.local_attention.full_attention_2d_alibi`) -> mean over
tokens -> LayerNorm -> Linear. 1 head, dropout 0, MLP ratio 4 with GELU, ``qkv_bias=False``, scale 1/sqrt(d_h).
Slopes: the ALiBi schedule ``m_k = 2^(-8k/n)`` (Press et al. interleave when n is not a power of two).

Presets (``preset=``, spec §2.2 table): ``"paper"`` (the default, above) or ``"upstream"``, the authors' released
code, for comparison only (spec §3): 4 heads, no pooling, attention dropout 0.05, and these behaviour options,
each also settable alone (a preset only chooses the defaults; :data:`PRESETS`):

- ``head_mask``: ``"all"`` (every head masked beyond r) | ``"largest_slope"`` (§3.2: only the largest-slope head
  gets -inf beyond r, the others a soft ``-100 m_h`` and so see every token: O(N^2) time through the chunked
  full path, memory still O(chunk N));
- ``distance``: ``"euclidean"`` | ``"floor"`` (§3.3: bias ``-m_h floor(D)``, local and global layers);
- ``global_alibi``: ``"unclipped"`` | ``"clipped"`` (§3.3: ``-100 m_h`` beyond r in the global layer);
- ``cell``: 1 | 4 (§3.4: positions ``round((c - c_min) / stride / cell)``; several patches can share a cell;
  r counts cells; ``stride=224`` with ``cell=4`` gives the code's fixed 896-unit cells at any magnification);
- ``eval_dropout``: False | True (§3.5: ``attn_dropout`` also in eval, masks drawn from torch's global RNG, so
  ``torch.manual_seed`` reproduces a pass); ``attn_dropout``: the rate (training; 0 in the paper preset).

``attention_backend``: ``"torch"`` (the default, tested kernels) or ``"flex"`` (PyTorch FlexAttention, for CUDA;
paper semantics only; :mod:`milstudy.models.local_attention_flex`).

Not reproduced: the dense int8 table (§3.1; values computed per chunk, and its 300-cell index wrap) and the
scrambled RoPE (§3.7; off upstream by default).

Positions: models receive level-0 coordinates; :func:`grid_positions` turns them into integer grid units by the
bag's patch stride (``stride=`` or the ``stride`` kwarg; without it, the smallest non-zero coordinate step of the
bag, reported in ``MILOutput.extras["grid_stride"]``). ``needs_coords``: bags without coordinates are refused.
The readout is a mean, so there is no attention over instances (``attention=None``). Not permutation invariant
in ``x`` alone (positions move with the tokens); permuting tokens *with* their coordinates leaves the logits
unchanged (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from milstudy.models.base import MILModel, MILOutput, register_model
from milstudy.models.layers import check_bag_input
from milstudy.models.local_attention import BACKENDS, DISTANCES, full_attention_2d_alibi, local_attention_2d

UPSTREAM_FAR = 100.0  # the released code's distance beyond the radius (its table's fill value; spec §3.2-3.3)
HEAD_MASKS, GLOBAL_ALIBI = ("all", "largest_slope"), ("unclipped", "clipped")
PRESETS = {  # spec §2.2 (layout) and §3.2-3.5 (behaviour): the defaults each preset chooses
    "paper": {"heads": 1, "pool": True, "attn_dropout": 0.0, "head_mask": "all", "distance": "euclidean",
              "global_alibi": "unclipped", "cell": 1, "eval_dropout": False},
    "upstream": {"heads": 4, "pool": False, "attn_dropout": 0.05, "head_mask": "largest_slope", "distance": "floor",
                 "global_alibi": "clipped", "cell": 4, "eval_dropout": True},
}


def resolve_options(preset: str = "paper", **given) -> dict:
    """The options of ``preset`` (:data:`PRESETS`) with the ``given`` ones that are not None; each checked by name."""
    if preset not in PRESETS:
        raise ValueError(f"LongMIL: preset must be one of {tuple(PRESETS)}, got {preset!r}")
    options = {**PRESETS[preset], **{name: value for name, value in given.items() if value is not None}}
    for name, allowed in (("head_mask", HEAD_MASKS), ("distance", DISTANCES), ("global_alibi", GLOBAL_ALIBI)):
        if options[name] not in allowed:
            raise ValueError(f"LongMIL: {name} must be one of {allowed}, got {options[name]!r}")
    for name in ("heads", "cell"):
        if isinstance(options[name], bool) or not isinstance(options[name], int) or options[name] < 1:
            raise ValueError(f"LongMIL: {name} must be an int >= 1, got {options[name]!r}")
    for name in ("pool", "eval_dropout"):
        if not isinstance(options[name], bool):
            raise ValueError(f"LongMIL: {name} must be True or False, got {options[name]!r}")
    rate = options["attn_dropout"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"LongMIL: attn_dropout must be a number in [0, 1), got {rate!r}")
    return options


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi slopes (Press et al.): ``2^(-8k/n)``, k = 1..n, for n a power of two; otherwise those of the nearest
    lower power of two followed by every other slope of the next one (1 head: [2^-8]; 6: [.25, .0625, .015625,
    .00390625, .5, .125])."""
    if n_heads < 1:
        raise ValueError(f"alibi_slopes: need >= 1 head, got {n_heads}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    low = 2 ** int(math.floor(math.log2(n_heads)))
    return power_of_two(low) + power_of_two(2 * low)[0::2][: n_heads - low]


def grid_positions(coords: torch.Tensor, mask: torch.Tensor, stride: float | None = None, cell: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer grid positions ``[B, N, 2]`` from level-0 coordinates: ``(c - min over the bag) / stride / cell``,
    rounded (``cell`` patches per side; 4 upstream, spec §3.4); ``stride`` per bag ``[B]``: the given one, or the
    smallest positive step between distinct x (or y) values of the bag's real tokens (1 if the bag has a single
    position). Padding positions are 0."""
    if coords is None:
        raise ValueError("LongMIL is position-aware and needs patch coordinates [B, N, 2]; these bags have none "
                         "(CLAM pt_files/ carry no coordinates: use h5_files/ or `milstudy features extract`)")
    coords = coords.to(torch.float64)
    positions, strides = torch.zeros(coords.shape, dtype=torch.long, device=coords.device), []
    for b in range(coords.shape[0]):
        real = coords[b][mask[b]]
        step = stride
        if step is None:
            steps = [torch.diff(torch.unique(real[:, axis])) for axis in (0, 1)]
            steps = torch.cat([s[s > 0] for s in steps])
            step = float(steps.min()) if len(steps) else 1.0
        if step <= 0:
            raise ValueError(f"LongMIL: the patch stride must be positive, got {step}")
        strides.append(step)
        grid = torch.round((real - real.min(0).values) / step / cell).to(torch.long)
        positions[b][mask[b]] = grid
    return positions, torch.tensor(strides, dtype=torch.float64)


def pool_2x2(x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average the tokens of each 2 x 2 grid cell (cell = position // 2) into one token at the cell's index;
    returns padded ``(x [B, M, D], positions [B, M, 2], mask [B, M])``, M = the largest cell count of the batch."""
    pooled = []
    for b in range(x.shape[0]):
        cells = torch.div(positions[b][mask[b]], 2, rounding_mode="floor")
        unique, inverse = torch.unique(cells, dim=0, return_inverse=True)
        sums = torch.zeros(len(unique), x.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x[b][mask[b]])
        counts = torch.bincount(inverse, minlength=len(unique)).to(x.dtype).unsqueeze(-1)
        pooled.append((sums / counts, unique))
    m = max(len(cells) for _, cells in pooled)
    out = x.new_zeros(x.shape[0], m, x.shape[-1])
    out_pos = positions.new_zeros(x.shape[0], m, 2)
    out_mask = torch.zeros(x.shape[0], m, dtype=torch.bool, device=x.device)
    for b, (tokens, cells) in enumerate(pooled):
        out[b, : len(tokens)], out_pos[b, : len(cells)], out_mask[b, : len(tokens)] = tokens, cells, True
    return out, out_pos, out_mask


class _Block(nn.Module):
    """Pre-LN transformer block ``x + Attn(LN x)``, ``x + MLP(LN x)`` with 2-D local or full ALiBi attention."""

    def __init__(self, dim: int, heads: int, radius: float | None, mlp_ratio: float, alibi: bool,
                 slope_scale: float, dropout: float, *, head_mask: str = "all", distance: str = "euclidean",
                 clip_radius: float | None = None, attn_dropout: float = 0.0, eval_dropout: bool = False,
                 backend: str = "torch") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"LongMIL: dim {dim} is not divisible by heads {heads}")
        if head_mask != "all" and not alibi:
            raise ValueError(f"LongMIL: head_mask={head_mask!r} needs ALiBi slopes in the local layers "
                             "(alibi_local=True)")
        self.heads, self.radius = heads, radius
        self.head_mask, self.distance, self.clip_radius = head_mask, distance, clip_radius
        self.attn_dropout, self.eval_dropout, self.backend = attn_dropout, eval_dropout, backend
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(int(dim * mlp_ratio), dim), nn.Dropout(dropout))
        slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float64) * slope_scale if alibi else None
        self.register_buffer("slopes", slopes, persistent=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """``[B, h, N, d]`` attention output: 2-D local (``radius``) or full, with 2-D ALiBi when slopes exist, and
        the spec §3 options (module docstring); a soft ``head_mask`` runs the chunked full path (O(N^2) time)."""
        slopes = None if self.slopes is None else self.slopes.to(q.dtype)
        variant = {"distance": self.distance,
                   "dropout": self.attn_dropout if self.training or self.eval_dropout else 0.0}
        if self.radius is None:
            if self.clip_radius is None or slopes is None:
                return full_attention_2d_alibi(q, k, v, positions, slopes, mask, backend=self.backend, **variant)
            return full_attention_2d_alibi(q, k, v, positions, slopes, mask, radius=self.clip_radius,
                                           beyond=-UPSTREAM_FAR * slopes, **variant)
        if self.head_mask == "all":
            return local_attention_2d(q, k, v, positions, self.radius, slopes, mask, backend=self.backend, **variant)
        beyond = torch.where(slopes == slopes.max(), float("-inf"), -UPSTREAM_FAR * slopes)  # spec §3.2
        return full_attention_2d_alibi(q, k, v, positions, slopes, mask, radius=self.radius, beyond=beyond,
                                       **variant)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = self.attend(q, k, v, positions, mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, n, dim)) * mask.unsqueeze(-1)
        return x + self.mlp(self.norm2(x)) * mask.unsqueeze(-1)


class LongMIL(MILModel):
    """``forward(x [B, N, D], coords [B, N, 2] level-0, mask=None) -> MILOutput`` (module docstring). ``heads``,
    ``pool`` and the keyword options default to ``preset``'s (:data:`PRESETS`); the resolved ones are ``options``."""

    needs_coords = True
    permutation_invariant = False  # in x alone: the positions stay; with the coordinates it is invariant

    def __init__(self, in_dim: int, n_out: int, dim: int = 384, heads: int | None = None, radius: float = 10.0,
                 local_layers: int = 2, global_layers: int = 1, pool: bool | None = None, alibi_local: bool = True,
                 alibi_slope_scale: float = 1.0, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 stride: float | None = None, *, preset: str = "paper", attn_dropout: float | None = None,
                 head_mask: str | None = None, distance: str | None = None, global_alibi: str | None = None,
                 cell: int | None = None, eval_dropout: bool | None = None, attention_backend: str = "torch") -> None:
        super().__init__()
        if radius < 0 or local_layers < 0 or global_layers < 0:
            raise ValueError(f"LongMIL: radius and layer counts must be >= 0, got {radius}, {local_layers}, "
                             f"{global_layers}")
        self.options = options = resolve_options(
            preset, heads=heads, pool=pool, attn_dropout=attn_dropout, head_mask=head_mask, distance=distance,
            global_alibi=global_alibi, cell=cell, eval_dropout=eval_dropout)
        if attention_backend not in BACKENDS:
            raise ValueError(f"LongMIL: attention_backend must be one of {BACKENDS}, got {attention_backend!r}")
        paper_semantics = (options["distance"], options["head_mask"], options["global_alibi"],
                           options["attn_dropout"]) == ("euclidean", "all", "unclipped", 0.0)
        if attention_backend == "flex" and not paper_semantics:
            raise ValueError("LongMIL: attention_backend='flex' runs the paper's attention only (distance "
                             "'euclidean', head_mask 'all', global_alibi 'unclipped', attn_dropout 0); the upstream "
                             "variants need attention_backend='torch'")
        heads, self.preset, self.cell = options["heads"], preset, options["cell"]
        self.in_dim, self.n_out, self.stride, self.pool = in_dim, n_out, stride, options["pool"]
        shared = {"distance": options["distance"], "attn_dropout": options["attn_dropout"],
                  "eval_dropout": options["eval_dropout"], "backend": attention_backend}
        clip = radius if options["global_alibi"] == "clipped" else None
        self.project = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.local = nn.ModuleList(_Block(dim, heads, radius, mlp_ratio, alibi_local, alibi_slope_scale, dropout,
                                          head_mask=options["head_mask"], **shared) for _ in range(local_layers))
        self.globals = nn.ModuleList(_Block(dim, heads, None, mlp_ratio, True, alibi_slope_scale, dropout,
                                            clip_radius=clip, **shared) for _ in range(global_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                **_: object) -> MILOutput:
        mask = check_bag_input(x, self.in_dim, mask, "LongMIL")
        positions, strides = grid_positions(coords, mask, self.stride, self.cell)
        h = self.project(x) * mask.unsqueeze(-1)
        for block in self.local:
            h = block(h, positions, mask)
        if self.pool and len(self.globals):
            h, positions, mask = pool_2x2(h, positions, mask)
        for block in self.globals:
            h = block(h, positions, mask)
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return MILOutput(self.head(self.norm(pooled)), extras={"grid_stride": strides})


@contextmanager
def record_attention(model: nn.Module, max_tokens: int = 4096) -> Iterator[list[dict]]:
    """Within the block, every attention block of ``model`` (LongMIL's local and global blocks, the FSA / absolute-
    PE baselines' full blocks) also appends its attention matrix to the yielded list: ``{"layer": i, "type":
    "local" | "global" | "full", "attention": [B, h, N, N]}``, computed by the block's own ``attend`` with the
    identity as values (so exactly the kernel the forward pass uses: tiled local, chunked ALiBi, SDPA + RoPE).
    For analysis of small bags (N <= ``max_tokens``; the matrix is N x N), under ``torch.no_grad``. With attention
    dropout active (training, or ``eval_dropout``) the recorded matrix is one draw, not the forward pass's own."""
    blocks = [m for m in model.modules() if isinstance(m, _Block)]
    records: list[dict] = []

    def recording(index: int, block: _Block):
        original = block.attend
        kind = "local" if block.radius is not None else ("global" if type(block) is _Block else "full")

        def attend(q, k, v, positions, mask):
            n = q.shape[-2]
            if n > max_tokens:
                raise ValueError(f"record_attention: {n} tokens > max_tokens={max_tokens} (the matrix is N x N)")
            eye = torch.eye(n, dtype=q.dtype, device=q.device).expand(q.shape[0], q.shape[1], n, n)
            with torch.no_grad():
                records.append({"layer": index, "type": kind, "attention": original(q, k, eye, positions, mask)})
            return original(q, k, v, positions, mask)

        return attend

    for index, block in enumerate(blocks):
        block.attend = recording(index, block)  # an instance attribute: shadows the method until removed
    try:
        yield records
    finally:
        for block in blocks:
            del block.attend


@register_model("longmil")
def longmil(in_dim: int, n_out: int, **kwargs) -> LongMIL:
    return LongMIL(in_dim, n_out, **kwargs)
