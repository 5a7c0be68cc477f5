"""Test-only ports of the authors' reference code for the dense CLIP methods and LeGrad.

Each function runs an open_clip ViT the way its authors' code does (their token layout, their attention
reshapes, their order of operations) and returns the per-patch result on the patch grid, *before* the authors'
final upsampling and min-max normalization (both are linear/affine per map, so comparing at the grid loses
nothing). They are deliberately slow and literal, never imported by ``traitloc``; the tests compare the fast
engines of :mod:`traitloc.engine.dense` with them.

Sources and licences
--------------------
- MaskCLIP: Zhou, Loy & Dai (ECCV 2022), github.com/chongzhou96/MaskCLIP (Apache-2.0): the ViT backbone's
  ``return_qkv`` path of the last layer (``v = out_proj(v_proj(ln1 x)) + x; v = v + FFN(ln2 v)``) and the head's
  1x1 projection; ported from the mmseg code (fork volgachen/MaskCLIP, ``mmseg/models/backbones/vit.py``).
- ClearCLIP: Lan et al. (ECCV 2024), github.com/mc-lan/ClearCLIP (S-Lab License 1.0, non-commercial): its
  ``custom_attn(model_type='ClearCLIP')`` with ``ignore_residual=True``. Because of the licence this is a short
  re-implementation from the paper's description checked against the behaviour of that code, not a copy.
- SCLIP: Wang, Mei & Yuille (ECCV 2024), github.com/wangf3014/SCLIP (no licence file): the correlative
  self-attention last layer (``csa=True``); likewise re-implemented from the paper and the code's behaviour.
- NACLIP: Hajimiri, Ben Ayed & Dolz (WACV 2025), github.com/sinahmr/NACLIP (MIT, (c) 2024 Sina Hajimiri):
  ``arch='reduced'``, ``attn_strategy='naclip'``, ``gaussian_std=5`` (``gaussian_window``,
  ``get_attention_addition``, ``custom_attn``), ported.
- GEM: Bousselham et al. (CVPR 2024), github.com/WalBouss/GEM (MIT, (c) 2023 W. Bousselham, F. Petersen,
  V. Ferrari, H. Kuehne): ``SelfSelfAttention``, ``GEMResidualBlock``, ``modified_vit_forward`` with the
  defaults of ``create_gem_model`` (``gem_depth=7``, ``ss_attn_iter=1``, ``ss_attn_temp=None``), ported.
- LeGrad: Bousselham et al. (2024), github.com/WalBouss/LeGrad (MIT, (c) 2024 W. Bousselham, A. Boggust,
  S. Chaybouti, H. Strobelt, H. Kuehne): ``LeWrapper.compute_legrad_clip`` with ``layer_index=-2``: the image is
  repeated once per prompt, attention maps of the last layers are kept by hooks, and autograd gives
  ``d sim / d attn`` per layer; ported (the hooks become an explicit attention computation with the same maps).

The Finer contrast is passed in as the explained text vector (``v_concept - gamma * v_base``): every method's
map is linear in it up to its last ReLU, which these references, like the authors', do not apply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _embed_lnd(visual: nn.Module, img: Tensor) -> Tensor:
    """Patch embedding + CLS + positional embedding + ln_pre, permuted to (L, N, D) as the authors' forwards do."""
    x = visual.conv1(img)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    return x.permute(1, 0, 2)


def _block_lnd(blk: nn.Module, x: Tensor) -> Tensor:
    """An ordinary open_clip residual block applied to (L, N, D) tokens (open_clip blocks are batch-first)."""
    return blk(x.permute(1, 0, 2)).permute(1, 0, 2)


def _split_heads(t: Tensor, bsz: int, num_heads: int) -> Tensor:
    head_dim = t.shape[-1] // num_heads
    return t.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)


def _merge_heads(t: Tensor, bsz: int, embed_dim: int) -> Tensor:
    return t.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)


def _patch_cosine(visual: nn.Module, tokens_nld: Tensor, text: Tensor) -> Tensor:
    """ln_post, proj, L2 normalization, dot with normalized text vectors; (B, Q, h, w) for patch tokens."""
    feats = visual.ln_post(tokens_nld) @ visual.proj
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = feats[:, 1:] @ text.t()
    n = logits.shape[1]
    s = int(math.isqrt(n))
    return logits.permute(0, 2, 1).reshape(logits.shape[0], -1, s, s)


# -- MaskCLIP ---
def maskclip(visual: nn.Module, img: Tensor, text: Tensor) -> Tensor:
    """MaskCLIP (ViT): the last layer's value path with its residual and FFN replaces the patch tokens."""
    with torch.no_grad():
        x = _embed_lnd(visual, img).permute(1, 0, 2)  # the mmseg backbone is batch-first
        layers = list(visual.transformer.resblocks)
        for layer in layers[:-1]:
            x = layer(x)
        layer = layers[-1]
        # TransformerEncoderLayer.forward(x, return_qkv=True)
        y = layer.ln_1(x)
        y = F.linear(y, layer.attn.in_proj_weight, layer.attn.in_proj_bias)
        N, L, C = y.shape
        y = y.view(N, L, 3, C // 3).permute(2, 0, 1, 3).reshape(3 * N, L, C // 3)
        y = F.linear(y, layer.attn.out_proj.weight, layer.attn.out_proj.bias)
        q, k, v = y.tensor_split(3, dim=0)
        v = v + x
        v = v + layer.mlp(layer.ln_2(v))
        x = layer(x)
        # final_norm and skip_last_attn: x[:, 1:] = norm(v)[:, 1:]; the head's 1x1 proj, normalize, text conv
        x = x.clone()
        x[:, 1:] = v[:, 1:]
        return _patch_cosine(visual, x, text)


# -- ClearCLIP and SCLIP (re-implemented; see the module docstring) ---
def _custom_last_layer(visual: nn.Module, img: Tensor, text: Tensor, kind: str) -> Tensor:
    with torch.no_grad():
        x = _embed_lnd(visual, img)
        layers = list(visual.transformer.resblocks)
        for blk in layers[:-1]:
            x = _block_lnd(blk, x)
        blk = layers[-1]
        a = blk.ln_1(x)
        num_heads = blk.attn.num_heads
        _, bsz, embed_dim = a.shape
        scale = (embed_dim // num_heads) ** -0.5
        q, k, v = F.linear(a, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, bsz, num_heads) for t in (q, k, v))
        if kind == "clearclip":  # query-query attention
            w = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
        else:  # sclip: correlative self-attention
            w = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1) + F.softmax(
                torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1
            )
        out = blk.attn.out_proj(_merge_heads(torch.bmm(w, v), bsz, embed_dim))
        if kind == "clearclip":  # no residual, no feed-forward network
            x = out
        else:
            x = x + out
            x = x + blk.mlp(blk.ln_2(x))
        return _patch_cosine(visual, x.permute(1, 0, 2), text)


def clearclip(visual: nn.Module, img: Tensor, text: Tensor) -> Tensor:
    return _custom_last_layer(visual, img, text, "clearclip")


def sclip(visual: nn.Module, img: Tensor, text: Tensor) -> Tensor:
    return _custom_last_layer(visual, img, text, "sclip")


# -- NACLIP (MIT) ---
def _gaussian_window(dim1: int, dim2: int, std: float = 1.0) -> Tensor:
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in (dim1, dim2):
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start * constant, (start + (dim - 1)) * constant, steps=dim, dtype=torch.float))
    dist_square_to_mu = (torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0)
    return torch.exp(-dist_square_to_mu)


def _attention_addition(dim1: int, dim2: int, window: Tensor) -> Tensor:
    m = torch.einsum("ij,kl->ijkl", torch.eye(dim1), torch.eye(dim2))
    m = m.permute((0, 3, 1, 2)).contiguous()
    out = F.conv2d(m.view(-1, dim1, dim2).unsqueeze(1), window.unsqueeze(0).unsqueeze(1), padding="same").squeeze(1)
    out = out.view(dim1 * dim2, dim1 * dim2)
    v_adjusted = torch.vstack([torch.zeros((1, dim1 * dim2)), out])
    return torch.hstack([torch.zeros((dim1 * dim2 + 1, 1)), v_adjusted])


def naclip(visual: nn.Module, img: Tensor, text: Tensor, gaussian_std: float = 5.0) -> Tensor:
    """NACLIP: key-key attention plus a Gaussian neighbourhood, reduced architecture (no residual, no FFN)."""
    with torch.no_grad():
        ps = visual.patch_size if isinstance(visual.patch_size, int) else visual.patch_size[0]
        n_patches = (img.shape[-2] // ps, img.shape[-1] // ps)
        x = _embed_lnd(visual, img)
        layers = list(visual.transformer.resblocks)
        for blk in layers[:-1]:
            x = _block_lnd(blk, x)
        blk = layers[-1]
        a = blk.ln_1(x)
        num_heads = blk.attn.num_heads
        _, bsz, embed_dim = a.shape
        scale = (embed_dim // num_heads) ** -0.5
        q, k, v = F.linear(a, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, bsz, num_heads) for t in (q, k, v))
        window = _gaussian_window(*[side * 2 - 1 for side in n_patches], std=gaussian_std)
        addition = _attention_addition(*n_patches, window).unsqueeze(0).to(a.dtype)
        attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
        attn_weights = F.softmax(attn_weights + addition, dim=-1)
        x = blk.attn.out_proj(_merge_heads(torch.bmm(attn_weights, v), bsz, embed_dim))
        return _patch_cosine(visual, x.permute(1, 0, 2), text)


# -- GEM (MIT) ---
def _self_self_attention(blk: nn.Module, x_nld: Tensor, ss_attn_iter: int = 1) -> tuple[Tensor, Tensor]:
    attn = blk.attn
    B, N, C = x_nld.shape
    num_heads = attn.num_heads
    scale = (C // num_heads) ** -0.5
    qkv = F.linear(x_nld, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    x_ori = attn.out_proj((attn_ori @ v).transpose(1, 2).reshape(B, N, C))
    xs1, xs2, xs3 = v, k, q
    pre_norm = torch.norm(x_nld, dim=-1).mean(dim=-1, keepdim=True).unsqueeze(1).unsqueeze(-1)
    inv_temp = pre_norm * scale
    for _ in range(ss_attn_iter):
        xs1, xs2, xs3 = F.normalize(xs1, dim=-1), F.normalize(xs2, dim=-1), F.normalize(xs3, dim=-1)
        xs1 = ((xs1 @ xs1.transpose(-2, -1)) * inv_temp).softmax(dim=-1) @ xs1
        xs2 = ((xs2 @ xs2.transpose(-2, -1)) * inv_temp).softmax(dim=-1) @ xs2
        xs3 = ((xs3 @ xs3.transpose(-2, -1)) * inv_temp).softmax(dim=-1) @ xs3
    xs1, xs2, xs3 = F.normalize(xs1, dim=-1), F.normalize(xs2, dim=-1), F.normalize(xs3, dim=-1)
    xs1 = ((xs1 @ xs1.transpose(-2, -1)) * inv_temp).softmax(dim=-1) @ v
    xs2 = ((xs2 @ xs2.transpose(-2, -1)) * inv_temp).softmax(dim=-1) @ v
    xs3 = ((xs3 @ xs3.transpose(-2, -1)) * inv_temp).softmax(dim=-1) @ v
    xs = (xs1 + xs2 + xs3) / 3
    x = attn.out_proj(xs.transpose(1, 2).reshape(B, N, C))
    return x, x_ori


def gem(visual: nn.Module, img: Tensor, text: Tensor, gem_depth: int = 7) -> Tensor:
    """GEM: a self-self attention path through the last ``gem_depth - 1`` blocks (fewer if the model is shallower)."""
    with torch.no_grad():
        x = _embed_lnd(visual, img).permute(1, 0, 2)  # (B, L, C): open_clip 3.x transformers are batch-first
        layers = list(visual.transformer.resblocks)
        n = min(gem_depth - 1, len(layers))
        for blk in layers[:-n]:
            x = blk(x)
        x_gem = x
        for blk in layers[-n:]:  # GEMResidualBlock
            x_gem_res, x_ori_res = _self_self_attention(blk, blk.ln_1(x))
            x_ori = x + blk.ls_1(x_ori_res)
            x = x_ori + blk.ls_2(blk.mlp(blk.ln_2(x_ori)))
            x_gem = x_gem + blk.ls_1(x_gem_res)
        return _patch_cosine(visual, x_gem, text)


# -- LeGrad (MIT) ---
def _hooked_block(blk: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """open_clip residual block on (L, N, D) tokens, returning its output and its attention maps
    ``(N * heads, L, L)`` (as LeGrad's hooked ``multi_head_attention_forward`` records them)."""
    attn = blk.attn
    a = blk.ln_1(x)
    tgt_len, bsz, embed_dim = a.shape
    num_heads = attn.num_heads
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(a, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (_split_heads(t, bsz, num_heads) for t in (q, k, v))
    q = q * float(head_dim) ** -0.5
    attention_maps = F.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
    out = torch.bmm(attention_maps, v)
    out = attn.out_proj(_merge_heads(out, bsz, embed_dim))
    x = x + blk.ls_1(out)
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, attention_maps


def legrad(visual: nn.Module, img: Tensor, text: Tensor, layer_index: int = -2) -> Tensor:
    """LeGrad for one image (1, 3, H, W) and ``text`` (P, D): the image is repeated once per prompt.

    Returns the accumulated relevance on the patch grid (P, h, w), before upsampling and min-max.
    """
    num_prompts = text.shape[0]
    image = img.repeat(num_prompts, 1, 1, 1)
    layers = list(visual.transformer.resblocks)
    starting_depth = layer_index if layer_index >= 0 else len(layers) + layer_index
    with torch.enable_grad():
        with torch.no_grad():
            x = _embed_lnd(visual, image)
            for blk in layers[:starting_depth]:
                x = _block_lnd(blk, x)
        feats, maps = [], []
        for blk in layers[starting_depth:]:
            # the authors set requires_grad on the last layers' parameters, so the graph starts here
            for p in blk.parameters():
                p.requires_grad_(True)
            x, attention_maps = _hooked_block(blk, x)
            maps.append(attention_maps)
            feats.append(x)
        try:
            image_features = []
            for feat in feats:  # feat_post_mlp: [num_patch, batch, dim]
                f = visual.ln_post(feat.mean(dim=0)) @ visual.proj
                image_features.append(F.normalize(f, dim=-1))
            num_tokens = feats[-1].shape[0] - 1
            w = h = int(math.sqrt(num_tokens))
            accum = 0
            for attn_map, img_feat in zip(maps, image_features, strict=True):
                sim = text @ img_feat.transpose(-1, -2)  # (P, P)
                one_hot = F.one_hot(torch.arange(0, num_prompts)).float()
                one_hot = torch.sum(one_hot * sim)
                grad = torch.autograd.grad(one_hot, [attn_map], retain_graph=True, create_graph=True)[0]
                grad = grad.reshape(num_prompts, -1, *grad.shape[-2:])  # '(b h) n m -> b h n m'
                grad = torch.clamp(grad, min=0.0)
                image_relevance = grad.mean(dim=1).mean(dim=1)[:, 1:]
                accum = accum + image_relevance.reshape(num_prompts, w, h)
        finally:
            for blk in layers[starting_depth:]:
                for p in blk.parameters():
                    p.requires_grad_(False)
    return accum.detach()  # type: ignore[union-attr]
