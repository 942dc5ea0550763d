"""PyTorch models of the same architecture as mapet's, for benchmarks and weight round-trips only.

Benchmark-only (needs torch): nothing in tests/, python/ or CI may import this file.
Written from a reading of aimagelab/MaPeT (models/vision_transformer/vision_transformer.py,
models/mapet/mapet.py, utils/models.py, engine.py); no code copied.

State-dict names (all parameters; shapes for C=embed_dim, p=patch, n=num_patches, N=n+1,
K=num_tokens, F=mlp hidden=4C). Depth-1 example with C=192, p=16, 224 px (n=196), K=8192:

  TorchViT (reference: VisionTransformer, 'vit_standard_*'), global_pool='token' (reference default):
    cls_token                   [1, 1, C]          [1, 1, 192]
    pos_embed                   [1, N, C]          [1, 197, 192]
    patch_embed.proj.weight     [C, 3, p, p]       [192, 3, 16, 16]
    patch_embed.proj.bias       [C]
    blocks.0.norm1.weight/bias  [C]
    blocks.0.attn.kv.weight     [2C, C]            [384, 192]   rows 0..C-1 = K, C..2C-1 = V
    blocks.0.attn.kv.bias       [2C]
    blocks.0.attn.q.weight      [C, C]
    blocks.0.attn.q.bias        [C]
    blocks.0.attn.proj.weight   [C, C]
    blocks.0.attn.proj.bias     [C]
    blocks.0.ls1.gamma          [C]                only if init_values is not None
    blocks.0.norm2.weight/bias  [C]
    blocks.0.mlp.fc1.weight     [F, C]             [768, 192]
    blocks.0.mlp.fc1.bias       [F]
    blocks.0.mlp.fc2.weight     [C, F]             [192, 768]
    blocks.0.mlp.fc2.bias       [C]
    blocks.0.ls2.gamma          [C]                only if init_values is not None
    norm.weight/bias            [C]                global_pool='token' only
    fc_norm.weight/bias         [C]                global_pool='avg' only (then there is NO `norm`)
    head.weight                 [classes, C]
    head.bias                   [classes]

  TorchMaPeT (reference: XLeiTPositionalAugmented, 'mapet_*'): the ViT names above except `head`/`fc_norm`,
  plus
    mask_positional_token       [1, 1, C]
    norm.weight/bias            [C]                (reference default global_pool='token' -> `norm` exists)
    decoder.weight              [K, C]             [8192, 192]
    decoder.bias                [K]
  i.e. cls_token, pos_embed, mask_positional_token, patch_embed.proj.{weight,bias},
  blocks.{i}.{norm1,norm2}.{weight,bias}, blocks.{i}.attn.{kv,q,proj}.{weight,bias},
  blocks.{i}.ls1.gamma, blocks.{i}.mlp.{fc1,fc2}.{weight,bias}, blocks.{i}.ls2.gamma,
  norm.{weight,bias}, decoder.{weight,bias}.

  TorchPIM: same names as TorchMaPeT (the reference repo ships no PIM model; we keep
  `mask_positional_token` as the learned query-stream start vector, see the class docstring).
  TorchBEiT: ViT names + `mask_token [1,1,C]`, `norm`, `lm_head.weight [K,C]`, `lm_head.bias [K]`
  (the reference repo ships no BEiT pre-training model; names follow microsoft/unilm BEiT).

Verified once (torch 2.15 / timm 1.0.31) by loading these state_dicts, strict=True, into the reference's
own StandardVisionTransformer ('token' and 'avg') and XLeiTPositionalAugmented (with masks from the
reference's attention_mask_full_mapet_1) run out of a scratch copy: identical key sets (ViT: identical order
too; MaPeT's reference block registers norm2 before attn) and max |logit difference| = 0.0, randomised weights.
`python bench/torch_models.py` prints the depth-1 tables for all five variants.

Reference facts worth knowing on the Swift side:
  - The reference MaPeT `forward` returns decoder logits TRANSPOSED, [B, K, P] (class dim 1 for
    nn.CrossEntropyLoss). TorchMaPeT.forward here returns [B, P, K] as mapet does; use
    `.transpose(1, 2)` to compare with the reference's raw output.
  - pos_embed init in the reference is randn*.02 then trunc_normal(.02); cls normal(1e-6);
    mask_positional_token trunc_normal(.02); Linear trunc_normal(.02) with zero bias; LayerNorm eps 1e-6.
  - qkv_bias=True by default (q and kv both carry bias); proj always has bias.
  - The content stream carries the auxiliary tokens through `norm` at the end too (unused).
  - Drop path: each residual branch draws ONE per-sample keep mask, applied to both streams.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_masks import reference_masks

EPS = 1e-6


def trunc_normal_(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    return nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, n, C], row-major grid


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU


def keep_mask(x: torch.Tensor, drop_prob: float, training: bool):
    """Per-sample stochastic-depth multiplier [B, 1, 1] (None when inactive)."""
    if drop_prob == 0.0 or not training:
        return None
    keep = 1.0 - drop_prob
    return x.new_empty((x.shape[0], 1, 1)).bernoulli_(keep).div_(keep)


class Attention(nn.Module):
    """Split projections: q [C,C], kv [2C,C] (K rows first). Queries and keys may come from different sets."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, sdpa: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sdpa = sdpa
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, x):
        B, M, C = x.shape
        kv = self.kv(x).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]  # [B, H, M, D]

    def attend(self, xq, k, v, mask=None):
        """xq [B, Q, C] (normed), k/v [B, H, M, D], mask additive [B, Q, M] or None -> [B, Q, C]."""
        B, Q, C = xq.shape
        q = self.q(xq).reshape(B, Q, self.num_heads, self.head_dim).transpose(1, 2)
        m = None if mask is None else mask.unsqueeze(1)  # broadcast over heads
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        else:  # the reference's formulation
            a = (q @ k.transpose(-2, -1)) * self.scale
            if m is not None:
                a = a + m
            o = a.softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, Q, C))

    def forward(self, x, mask=None):
        k, v = self.keys_values(x)
        return self.attend(x, k, v, mask)


class Block(nn.Module):
    """Pre-norm transformer block; `forward` = one stream (ViT/BEiT), `forward_two` = two streams (MaPeT/PIM)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, init_values=None, drop_path=0.0,
                 sdpa=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, sdpa)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x, mask=None):
        y = self.ls1(self.attn(self.norm1(x), mask))
        d = keep_mask(x, self.drop_path, self.training)
        x = x + (y if d is None else y * d)
        y = self.ls2(self.mlp(self.norm2(x)))
        d = keep_mask(x, self.drop_path, self.training)
        return x + (y if d is None else y * d)

    def forward_two(self, h, g, mask_h, mask_g):
        hn = self.norm1(h)
        k, v = self.attn.keys_values(hn)  # K, V from the content stream only
        yh = self.ls1(self.attn.attend(hn, k, v, mask_h))
        yg = self.ls1(self.attn.attend(self.norm1(g), k, v, mask_g))
        d = keep_mask(h, self.drop_path, self.training)  # one keep mask per sample for both streams
        h = h + (yh if d is None else yh * d)
        g = g + (yg if d is None else yg * d)
        yh = self.ls2(self.mlp(self.norm2(h)))
        yg = self.ls2(self.mlp(self.norm2(g)))
        d = keep_mask(h, self.drop_path, self.training)
        return h + (yh if d is None else yh * d), g + (yg if d is None else yg * d)


class _Backbone(nn.Module):
    """cls_token, pos_embed, patch_embed, blocks — shared by all models here (registration order as the reference)."""

    def _build(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
               init_values, drop_path_rate, sdpa):
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        dpr = [float(x) for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, dpr[i], sdpa) for i in range(depth)])

    def _build_pretrain(self, token_name, head_name, num_tokens, img_size, patch_size, in_chans, embed_dim, *rest):
        """The trunk, then (in this registration order) a learned [1, 1, C] token, the final norm and a
        linear head onto the vocabulary, named as the reference models name them."""
        self._build(img_size, patch_size, in_chans, embed_dim, *rest)
        setattr(self, token_name, nn.Parameter(torch.zeros(1, 1, embed_dim)))
        self.norm = nn.LayerNorm(embed_dim, eps=EPS)
        setattr(self, head_name, nn.Linear(embed_dim, num_tokens))

    def _init(self):
        trunc_normal_(self.pos_embed)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight)
                nn.init.zeros_(m.bias)
        for name in ("mask_positional_token", "mask_token"):
            if hasattr(self, name):
                trunc_normal_(getattr(self, name))

    def _tokens(self, images):
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed


class TorchViT(_Backbone):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
                 embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, qkv_bias=True, init_values=None,
                 drop_path_rate=0.0, sdpa=False):
        super().__init__()
        assert global_pool in ("token", "avg")
        self.global_pool = global_pool
        self._build(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                    init_values, drop_path_rate, sdpa)
        if global_pool == "token":
            self.norm = nn.LayerNorm(embed_dim, eps=EPS)
        else:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=EPS)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init()

    def forward_features(self, images):
        x = self._tokens(images)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if self.global_pool == "token" else x

    def forward(self, images):
        x = self.forward_features(images)
        x = x[:, 0] if self.global_pool == "token" else self.fc_norm(x[:, 1:].mean(dim=1))
        return self.head(x)


class TorchMaPeT(_Backbone):
    """Two-stream MaPeT with auxiliary positional tokens and dense additive masks (as the reference).

    forward(images [B,3,H,W], orders int [B,N] class token first, least_number=None) -> logits [B, P, K]
    for the predicted positions in ascending token order (the reference returns the transpose, [B, K, P]).
    """

    positional = True

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_tokens=8192, embed_dim=192, depth=12,
                 num_heads=3, mlp_ratio=4.0, qkv_bias=True, init_values=None, drop_path_rate=0.0,
                 least_number=50, sdpa=False):
        super().__init__()
        self._build_pretrain("mask_positional_token", "decoder", num_tokens, img_size, patch_size, in_chans, embed_dim,
                             depth, num_heads, mlp_ratio, qkv_bias, init_values, drop_path_rate, sdpa)
        self.least_number = least_number
        self._init()

    def masks(self, orders, least_number=None):
        """(content, query, predicted [B,P] ascending, in_loss) from orders; see torch_masks.reference_masks."""
        ln = self.least_number if least_number is None else least_number
        return reference_masks(torch.as_tensor(orders).long(), ln, positional=self.positional)

    def forward_masked(self, images, mask_h, mask_g, predicted):
        x = self._tokens(images)
        B, P = predicted.shape
        pe = torch.gather(self.pos_embed.expand(B, -1, -1), 1,
                          predicted.unsqueeze(2).expand(B, P, self.embed_dim))
        g = self.mask_positional_token + pe                    # m_j = w + pos_embed[p_j]
        h = torch.cat([x, g], dim=1) if self.positional else x
        for blk in self.blocks:
            h, g = blk.forward_two(h, g, mask_h, mask_g)
        return self.decoder(self.norm(g))                      # [B, P, K]

    def forward(self, images, orders, least_number=None):
        mask_h, mask_g, predicted, _ = self.masks(orders, least_number)
        return self.forward_masked(images, mask_h, mask_g, predicted)


class TorchPIM(TorchMaPeT):
    """PIM (XLNet-style) under the same setting: two streams, NO auxiliary positional tokens.

    Content stream h = the N tokens only; content row r sees context, earlier-ranked tokens and itself;
    query row p_i sees context and earlier-ranked tokens. The query stream starts at
    g_j = mask_positional_token + pos_embed[p_j] (a learned vector plus the target position — the query
    must know which position it predicts). The reference repo ships no PIM model; this start vector is our
    choice and the Swift side must make the same one.
    """

    positional = False


class TorchBEiT(_Backbone):
    """MIM (BEiT) under the same setting: masked patches replaced by `mask_token` before pos_embed is added,
    final `norm`, linear `lm_head` on the masked positions.

    forward(images, bool_masked_pos [B, n] (True = masked, same count per sample)) -> logits [B, M, K]
    for the masked patches in ascending patch order.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_tokens=8192, embed_dim=192, depth=12,
                 num_heads=3, mlp_ratio=4.0, qkv_bias=True, init_values=None, drop_path_rate=0.0, sdpa=False):
        super().__init__()
        self._build_pretrain("mask_token", "lm_head", num_tokens, img_size, patch_size, in_chans, embed_dim, depth,
                             num_heads, mlp_ratio, qkv_bias, init_values, drop_path_rate, sdpa)
        self._init()

    def forward(self, images, bool_masked_pos):
        x = self.patch_embed(images)
        B, n, C = x.shape
        w = bool_masked_pos.to(x.dtype).unsqueeze(-1)
        x = x * (1 - w) + self.mask_token * w
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x[:, 1:])
        M = int(bool_masked_pos[0].sum())
        return self.lm_head(x[bool_masked_pos].reshape(B, M, C))


def tiny(cls, **kw):
    """Tiny/16 config (C=192, 3 heads, depth 12) for any model class here."""
    return cls(embed_dim=192, depth=12, num_heads=3, patch_size=16, **kw)


def param_table(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


if __name__ == "__main__":
    import sys
    torch.manual_seed(0)
    for cls, kw in ((TorchViT, dict(num_classes=10, init_values=0.1)),
                    (TorchViT, dict(num_classes=10, global_pool="avg")),
                    (TorchMaPeT, dict(init_values=0.1)), (TorchPIM, dict(init_values=0.1)),
                    (TorchBEiT, dict(init_values=0.1))):
        m = cls(embed_dim=192, depth=1, num_heads=3, **kw)
        print(f"# {cls.__name__} {kw}")
        for k, s in param_table(m):
            print(f"  {k:32s} {list(s)}")
    sys.exit(0)
