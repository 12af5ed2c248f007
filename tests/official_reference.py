"""An independent transcription of the authors' released network and loss, for the parity tests.

Written from reading their code (GitHub Lyy-iiis/pMF: ``pmfDiT`` / ``MiT`` and ``pixelMeanFlow.forward``),
as plain functions on a state dict in *their* key layout -- it shares no code with ``full``. The
structure follows theirs line by line: complex-number RoPE on the last N tokens, attention in the
(B, L, heads, d) layout, the network returning ``(u, v) = ((x - out_u) / clip(t), (x - out_v) / clip(t))``,
the guidance target from ``v_fn`` / ``v_cond_fn``, label drop after guidance, and one ``jvp`` over
``(z_t, t, r)`` with tangents ``(v_c, 1, 0)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RMS_EPS = 1e-6
T_CLIP = 0.05


def _rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * weight


def _linear(sd, key, x):
    weight = sd[key + "._flax_linear.weight"]
    bias = sd.get(key + "._flax_linear.bias")
    return F.linear(x, weight, bias)


def _timestep_embed(sd, name, s):
    half = 128                                              # 256-d sinusoid of the raw scalar
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=s.dtype) / half)
    args = s[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return _linear(sd, f"{name}.mlp.2", F.silu(_linear(sd, f"{name}.mlp.0", emb)))


def precompute_rope_freqs_2d(head_dim, num_patches, theta=10000.0, dtype=torch.float64):
    dim = head_dim // 2
    side = int(num_patches ** 0.5)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype) / dim))
    positions = torch.arange(side, dtype=dtype)
    freqs_h = torch.outer(positions, freqs)
    freqs_w = torch.outer(positions, freqs)
    grid = torch.cat([freqs_h[:, None, :].expand(side, side, -1), freqs_w[None, :, :].expand(side, side, -1)], -1)
    return torch.polar(torch.ones_like(grid), grid).reshape(num_patches, dim)


def _apply_rope(x, freqs_cis):
    """x: (B, L, heads, d); rotates the last N tokens by freqs_cis (N, d/2) as complex pairs."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())    # (B, L, heads, d/2)
    n = freqs_cis.shape[0]
    rotated = torch.cat([pairs[:, :-n], pairs[:, -n:] * freqs_cis[None, :, None, :]], dim=1)
    return torch.view_as_real(rotated).reshape(x.shape)


def _attention(sd, key, x, freqs_cis, heads):
    batch, length, width = x.shape
    d = width // heads
    q = _linear(sd, f"{key}.q_proj", x).reshape(batch, length, heads, d)
    k = _linear(sd, f"{key}.k_proj", x).reshape(batch, length, heads, d)
    v = _linear(sd, f"{key}.v_proj", x).reshape(batch, length, heads, d)
    q = _apply_rope(_rms_norm(q, sd[f"{key}.q_norm.weight"]), freqs_cis)
    k = _apply_rope(_rms_norm(k, sd[f"{key}.k_norm.weight"]), freqs_cis)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    attn = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(batch, length, width)
    return _linear(sd, f"{key}.out_proj", attn)


def _block(sd, key, x, freqs_cis, heads):
    x = x + _attention(sd, f"{key}.attn", _rms_norm(x, sd[f"{key}.norm1.weight"]), freqs_cis, heads) \
        * sd[f"{key}.attn_scale"]
    h = _rms_norm(x, sd[f"{key}.norm2.weight"])
    mlp = _linear(sd, f"{key}.mlp.w2", F.silu(_linear(sd, f"{key}.mlp.w1", h)) * _linear(sd, f"{key}.mlp.w3", h))
    return x + mlp * sd[f"{key}.mlp_scale"]


def _count(sd, group):
    return len({key.split(".")[1] for key in sd if key.startswith(group + ".")})


def pmfdit(sd, x, t, h, w, t_min, t_max, y, *, heads, patch):
    """Their network: returns (u, v), each like x (B, C, H, W). ``sd`` has their keys without ``net.``."""
    prefix = 8 + 4 + 2 + 2 + 4
    embed = F.conv2d(x, sd["x_embedder.proj1.weight"], sd["x_embedder.proj1.bias"], stride=patch)
    embed = F.conv2d(embed, sd["x_embedder.proj2.weight"], sd["x_embedder.proj2.bias"])
    x_embed = embed.flatten(2).transpose(1, 2)                                     # (B, N, W)
    y_embed = F.embedding(y, sd["y_embedder.embedding_table._flax_embedding.weight"])
    seq = torch.cat([
        sd["class_tokens"] + y_embed[:, None],
        sd["omega_tokens"] + _timestep_embed(sd, "omega_embedder", 1 - 1 / w)[:, None],
        sd["t_min_tokens"] + _timestep_embed(sd, "cfg_t_start_embedder", t_min)[:, None],
        sd["t_max_tokens"] + _timestep_embed(sd, "cfg_t_end_embedder", t_max)[:, None],
        sd["time_tokens"] + _timestep_embed(sd, "h_embedder", h)[:, None],
        x_embed], dim=1) + sd["pos_embed"]
    num_patches = x_embed.shape[1]
    freqs_cis = precompute_rope_freqs_2d(seq.shape[-1] // heads, num_patches).to(
        torch.complex128 if x.dtype == torch.float64 else torch.complex64)
    for i in range(_count(sd, "shared_blocks")):
        seq = _block(sd, f"shared_blocks.{i}", seq, freqs_cis, heads)
    u_seq = v_seq = seq
    for i in range(_count(sd, "u_heads")):
        u_seq = _block(sd, f"u_heads.{i}", u_seq, freqs_cis, heads)
    for i in range(_count(sd, "v_heads")):
        v_seq = _block(sd, f"v_heads.{i}", v_seq, freqs_cis, heads)

    def final(name, tokens):
        out = _linear(sd, f"{name}.linear", _rms_norm(tokens[:, prefix:], sd[f"{name}.norm.weight"]))
        side = int(num_patches ** 0.5)
        c = x.shape[1]
        out = out.reshape(out.shape[0], side, side, patch, patch, c)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], c, side * patch, side * patch)

    out_u = final("u_final_layer", u_seq)
    out_v = final("v_final_layer", v_seq) if "v_final_layer.norm.weight" in sd else torch.zeros_like(x)
    clip = t.reshape(-1, 1, 1, 1).clamp(T_CLIP, 1.0)
    return (x - out_u) / clip, (x - out_v) / clip


def pixel_mean_flow_loss(net, x, labels, draws, *, num_classes, aux_fn=None, perceptual_max_t=1.0,
                         lpips_lambda=0.4, convnext_lambda=0.1, norm_eps=0.01, norm_p=1.0):
    """Their ``pixelMeanFlow.forward`` with the random draws injected.

    ``net(x, t, h, w, t_min, t_max, y) -> (u, v)``. ``draws``: dict with t, r (already sorted, (B,)),
    fm_mask (bool (B,), the r = t rows), e (scaled noise), t_min, t_max, omega, drop_mask (bool (B,)).
    Returns (loss scalar, per-sample dict).
    """
    bz = x.shape[0]
    t4, r4 = draws["t"].reshape(-1, 1, 1, 1), draws["r"].reshape(-1, 1, 1, 1)
    t, r = draws["t"], draws["r"]
    fm4 = draws["fm_mask"].reshape(-1, 1, 1, 1)
    omega, t_min, t_max = draws["omega"], draws["t_min"], draws["t_max"]
    z_t = (1 - t4) * x + t4 * draws["e"]
    v_t = (z_t - x) / t4.clamp(T_CLIP, 1.0)

    def v_cond_fn(z, tt, w, y):
        return net(z, tt, torch.zeros_like(tt), w, torch.zeros_like(tt), torch.ones_like(tt), y)[1]

    # guidance_fn
    both = v_cond_fn(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([omega, torch.ones_like(omega)]),
                     torch.cat([labels, torch.full_like(labels, num_classes)]))
    v_c, v_u = both[:bz], both[bz:]
    w4 = omega.reshape(-1, 1, 1, 1)
    v_g_fm = v_t + (1 - 1 / w4) * (v_c - v_u)
    w_gated = torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))
    v_c = v_cond_fn(z_t, t, w_gated, labels)
    v_g = v_t + (1 - 1 / w_gated.reshape(-1, 1, 1, 1)) * (v_c - v_u)
    v_g = torch.where(fm4, v_g_fm, v_g)
    # cond_drop
    drop = draws["drop_mask"]
    labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    v_g = torch.where(drop.reshape(-1, 1, 1, 1), v_t, v_g)

    def u_fn(z, tt, rr):
        return net(z, tt, tt - rr, omega, t_min, t_max, labels)

    u, du_dt, v = torch.func.jvp(u_fn, (z_t, t, r), (v_c, torch.ones_like(t), torch.zeros_like(t)), has_aux=True)
    V = u + (t4 - r4) * du_dt.detach()
    v_g = v_g.detach()

    def adp(loss):
        return loss / ((loss + norm_eps) ** norm_p).detach()

    loss_u = adp(((V - v_g) ** 2).sum(dim=(1, 2, 3)))
    loss_v = adp(((v - v_g) ** 2).sum(dim=(1, 2, 3)))
    aux = torch.zeros_like(loss_u)
    lpips = convnext = torch.zeros_like(loss_u)
    if aux_fn is not None:
        pred_x = z_t - t4 * u
        lpips, convnext = aux_fn(pred_x, x)
        mask = t < perceptual_max_t
        lpips = torch.where(mask, lpips, torch.zeros_like(lpips))
        convnext = torch.where(mask, convnext, torch.zeros_like(convnext))
        aux = adp(lpips) * lpips_lambda + adp(convnext) * convnext_lambda
    total = loss_u + loss_v + aux
    return total.mean(), {"loss_u": loss_u, "loss_v": loss_v, "total": total}
