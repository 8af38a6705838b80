"""Class-conditional flow-matching DiT for latent grids (the generator of the benchmark).

Layout follows DiT (Peebles & Xie, 2023, facebookresearch/DiT models.py): patchify, a stack of
adaLN-Zero transformer blocks conditioned on (timestep, label), a zero-initialised final layer.
The defaults add the LightningDiT changes (Yao et al., 2025, "Reconstruction vs. Generation"):
SwiGLU MLP, RMSNorm, QK-norm and 2-D rotary position embedding. DMVAE trains its generator with
exactly that recipe (LightningDiT-XL/1, see shared/reference/DMVAE_METHOD.md).

The network predicts the velocity v = z - eps of the linear path x_t = t z + (1 - t) eps,
t = 1 being clean data (SiT convention, see generators/transport.py).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import Mlp, RmsNorm, SwiGLU
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

POS_EMBEDS = ("rope", "learned")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    # adaLN: per-sample affine of the normalised tokens (DiT eq. in Sec. 3.2).
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _norm(dim: int, rmsnorm: bool, affine: bool) -> nn.Module:
    if rmsnorm:
        return RmsNorm(dim, eps=1e-6, affine=affine)
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)


#################################################################################
#                     Embedding layers for timesteps and labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by a 2-layer MLP (as in DiT).

    t lives in [0, 1]; it is multiplied by 1000 before the sinusoid so that the frequencies
    (periods 1 .. 10^4, DiT's max_period) resolve the unit interval the way they resolve DiT's
    integer timesteps 0..999. Feeding raw t in [0, 1] (as SiT does) leaves most channels nearly
    constant.
    """

    time_scale = 1000.0

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        freq = self.sinusoid(t * self.time_scale, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Label table with one extra row, the null label used for classifier-free guidance.

    Unlike DiT, the null row always exists (even with dropout 0) because the samplers and the
    DM loss always address it as `model.null_label`.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y: Tensor, train: bool, generator: torch.Generator | None = None) -> Tensor:
        if train and self.dropout_prob > 0:
            u = torch.rand(y.shape[0], generator=generator, device=y.device)
            y = torch.where(u < self.dropout_prob, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


#################################################################################
#                          Position embeddings                                  #
#################################################################################


def _grid(size: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    rows, cols = torch.meshgrid(
        torch.arange(size, dtype=torch.float32, device=device),
        torch.arange(size, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return rows.flatten(), cols.flatten()


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos table [T, dim]: half the channels encode the row, half the column
    (MAE/DiT layout, written in torch so the model also builds on the meta device)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden_size % 4 == 0, got {dim}")
    rows, cols = _grid(grid_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim / 4))

    def axis(pos: Tensor) -> Tensor:
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([axis(rows), axis(cols)], dim=1)


class Rope2D(nn.Module):
    """Axial 2-D rotary embedding: the first half of each head's channels rotate with the token
    row, the second half with the column (the EVA-02 / LightningDiT layout); base 10000 as in
    RoFormer. Channels are rotated in adjacent pairs."""

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim % 4 == 0, got head_dim={head_dim}")
        axis_dim = head_dim // 2
        freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim)
        rows, cols = _grid(grid_size)
        angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # [T, hd/2]
        # Not persistent: derived from the config, so checkpoints do not depend on it.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, heads, T, head_dim], in the parameters' dtype (Attention casts before calling)
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack([x1 * self.cos - x2 * self.sin, x1 * self.sin + x2 * self.cos], dim=-1)
        return out.flatten(-2)


#################################################################################
#                                 Core blocks                                   #
#################################################################################


class Attention(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, qk_norm: bool, rmsnorm: bool, rope: Rope2D | None
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # QK-norm keeps attention logits bounded (ViT-22B, Dehghani et al. 2023); LightningDiT
        # uses it with an affine RMSNorm per head.
        self.q_norm = _norm(head_dim, rmsnorm, affine=True) if qk_norm else nn.Identity()
        self.k_norm = _norm(head_dim, rmsnorm, affine=True) if qk_norm else nn.Identity()
        self.rope = rope
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(n, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # Normalise and rotate in the parameters' dtype (fp32 under bf16 autocast: cheap, and
        # the norm's statistics are not rounded), then attend in the compute dtype of v.
        work = self.proj.weight.dtype
        q, k = self.q_norm(q.to(work)), self.k_norm(k.to(work))
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        x = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v)
        return self.proj(x.transpose(1, 2).reshape(n, tokens, dim))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT Sec. 3.2)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        swiglu: bool,
        rmsnorm: bool,
        qk_norm: bool,
        rope: Rope2D | None,
    ) -> None:
        super().__init__()
        # The norms carry no affine: adaLN supplies the per-sample scale and shift.
        self.norm1 = _norm(hidden_size, rmsnorm, affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm, rmsnorm, rope)
        self.norm2 = _norm(hidden_size, rmsnorm, affine=False)
        mlp_hidden = int(hidden_size * mlp_ratio)
        if swiglu:
            # 2/3 of the GELU width keeps the parameter count of a ratio-4 MLP (LightningDiT).
            self.mlp = SwiGLU(hidden_size, int(2 / 3 * mlp_hidden))
        else:
            self.mlp = Mlp(hidden_size, mlp_hidden, act_layer=functools.partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1)
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, rmsnorm: bool) -> None:
        super().__init__()
        self.norm_final = _norm(hidden_size, rmsnorm, affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                 The model                                     #
#################################################################################


class FlowDiT(nn.Module):
    """Velocity network v(x_t, t, y) over latents [N, C, H, W] with H = W = input_size.

    pos_embed="rope": fixed 2-D sin-cos table at the input plus 2-D RoPE in every attention
    layer (what LightningDiT does); pos_embed="learned": one learned absolute table, no RoPE.
    """

    def __init__(
        self,
        input_size: int,
        in_channels: int,
        num_classes: int,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        swiglu: bool = True,
        rmsnorm: bool = True,
        qk_norm: bool = True,
        pos_embed: str = "rope",
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; known: {POS_EMBEDS}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.null_label = num_classes
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        num_tokens = self.grid_size**2

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))
            rope = None
        else:
            self.register_buffer(
                "pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size)[None], persistent=False
            )
            rope = Rope2D(hidden_size // num_heads, self.grid_size)
        # One RoPE module shared by all blocks: its tables depend only on the grid.
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, swiglu, rmsnorm, qk_norm, rope)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, rmsnorm)
        self.initialize_weights(learned_pos=pos_embed == "learned")
        # Activation checkpointing (generator.activation_checkpointing): a plain attribute, not
        # state, so checkpoints and EMA files do not depend on it.
        self.grad_checkpointing = False

    def initialize_weights(self, learned_pos: bool) -> None:
        # DiT's initialisation: xavier linears, N(0, 0.02) embeddings, zero adaLN and output so
        # every block starts as the identity and the initial velocity is 0.
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if learned_pos:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        # [N, T, p*p*C] -> [N, C, H, W]
        n, p, g, c = x.shape[0], self.patch_size, self.grid_size, self.in_channels
        x = x.reshape(n, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, g * p, g * p)

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """x: [N, C, H, W]; t: [N] in [0, 1] (1 = data); y: [N] labels, `null_label` allowed.

        In training mode labels are replaced by the null label with probability
        class_dropout_prob, drawn from `generator` (or torch's global RNG). Call in eval mode
        whenever the labels must be kept (sampling, guidance, the DM loss's frozen passes).
        """
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, generator)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            # Non-reentrant checkpointing (the form PyTorch recommends; it works with DDP and with
            # inputs that need no grad): a block's activations are recomputed in the backward pass
            # instead of kept, so memory holds one block's activations at a time. The blocks draw
            # no random numbers, so the recomputation is exact.
            x = checkpoint(block, x, c, use_reentrant=False) if recompute else block(x, c)
        return self.unpatchify(self.final_layer(x, c))


#################################################################################
#                          Named sizes (the public API)                         #
#################################################################################

GENERATORS: dict[str, Callable[..., FlowDiT]] = {}


def register_generator(name: str) -> Callable[[Callable[..., FlowDiT]], Callable[..., FlowDiT]]:
    def wrap(factory: Callable[..., FlowDiT]) -> Callable[..., FlowDiT]:
        if name in GENERATORS:
            raise ValueError(f"generator {name!r} is already registered")
        GENERATORS[name] = factory
        return factory

    return wrap


def _sized(**size: int) -> Callable[..., FlowDiT]:
    """FlowDiT with a size preset as defaults. A partial rather than a function taking
    ``**overrides``: its signature is FlowDiT's with these defaults, so the config keys a
    generator accepts (``generator.model_args``) can be read from it (benchmark/typed.py)."""
    return functools.partial(FlowDiT, **size)


# Our size for CPU smoke runs and the cheap tokenizer-ranking proxy: ~1.5M parameters,
# head_dim 32 (RoPE needs a multiple of 4); trains in minutes on 2 CPU cores.
FlowDiT_Tiny = register_generator("Tiny")(_sized(hidden_size=128, depth=4, num_heads=4))
# DiT-S: depth 12, width 384, 6 heads (DiT Table 1).
FlowDiT_S = register_generator("S")(_sized(hidden_size=384, depth=12, num_heads=6))
# DiT-B: depth 12, width 768, 12 heads (DiT Table 1).
FlowDiT_B = register_generator("B")(_sized(hidden_size=768, depth=12, num_heads=12))
# DiT-L: depth 24, width 1024, 16 heads (DiT Table 1).
FlowDiT_L = register_generator("L")(_sized(hidden_size=1024, depth=24, num_heads=16))
# DiT-XL / LightningDiT-XL: depth 28, width 1152, 16 heads; ~675M parameters. DMVAE uses it
# with patch_size=1 on 16x16x32 latents (pass patch_size=1 as an override).
FlowDiT_XL = register_generator("XL")(_sized(hidden_size=1152, depth=28, num_heads=16))


def build_generator(
    name: str, input_size: int, in_channels: int, num_classes: int, **overrides
) -> FlowDiT:
    if name not in GENERATORS:
        raise KeyError(f"unknown generator {name!r}; known: {sorted(GENERATORS)}")
    model = GENERATORS[name](input_size, in_channels, num_classes, **overrides)
    logger.info(
        "built generator %s (input %d, channels %d, classes %d, overrides %s): %.2fM parameters",
        name, input_size, in_channels, num_classes, overrides,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model
