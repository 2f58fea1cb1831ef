"""Restormer-family building blocks, shared by every transformer method of the package (MDTA, GDFN,
LayerNorm, patch embedding, down- and up-sampling, and the fused Functions).

Every block works on (B, C, H, W) feature maps. Parameter names follow the published models
(``body.weight`` of a LayerNorm, ``qkv``/``qkv_dwconv``/``project_out``/``temperature`` of MDTA,
``project_in``/``dwconv``/``project_out`` of GDFN, ...) so published checkpoints load strictly.

Speed and memory. The archs run their feature maps in ``torch.channels_last``: the 3x3
depthwise convolutions are several times faster there on CPU, a 1x1 convolution is a plain
matrix product over the (pixels, channels) rows, and the channel LayerNorm is ``layer_norm``
over the last dimension of those rows. Any memory format still gives the same results (rows of
another layout are copied first). Three ``torch.autograd.Function`` s do the per-pixel work of a
transformer block and keep only what their backward cannot cheaply recompute:

* :class:`NormLinear` -- channel LayerNorm followed by a 1x1 convolution; keeps its input and
  the per-pixel mean/rstd, and recomputes the normalised map in the backward pass;
* :class:`ChannelAttention` -- MDTA's L2 normalisation, temperature, softmax, attention-times-v,
  the output 1x1 projection and the residual add in one: ``project(softmax(.) v)`` is computed as
  ``v @ M`` with the small matrix ``M = blockdiag(softmax(.)^T) W^T``, so neither the normalised
  q/k nor the attention output is ever stored; it keeps q/k/v (views of the depthwise
  convolution's output) and C/heads x C/heads matrices;
* :class:`GatedLinear` -- GDFN's ``project_out(gelu(a) * b)`` plus the residual; keeps a and b
  and recomputes the gate in the backward pass.

Mixed precision. Under autocast (bfloat16 or float16, any device) the Functions keep the
activations they save in the autocast dtype and run their matrix products and depthwise
convolutions in it, as autocast would; the reductions (LayerNorm statistics, the L2 norms of q
and k), the small attention matrices and the softmax are computed in float32; results come out
in the dtype the plain formulation gives under autocast (see :func:`compute_dtypes`). So mixed
precision and the fused path combine: the saved activations are both fewer and half as wide.

Every Function is first-order differentiable (``once_differentiable``); float64 results equal
the plain path to rounding.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from vlunet.utils.tiling import crop_to, pad_to_multiple  # noqa: F401  (re-exported for the archs)

LN_EPS = 1e-5
NORM_EPS = 1e-12  # F.normalize's eps


REDUCED_DTYPES = (torch.bfloat16, torch.float16)
SMALL_RANGE_DTYPES = (torch.float16, )  # sums of many products can overflow them
_AUTOCAST_DEVICES = tuple(d for d in ('cpu', 'cuda', 'xpu', 'mps', 'hpu') if torch.amp.is_autocast_available(d))
# devices whose native_layer_norm takes float32 affine weights with reduced-precision rows (and then returns
# float32 statistics); elsewhere the weights are cast to the rows' dtype (see _layer_norm_rows)
_MIXED_AFFINE_DEVICES = ('cpu', )


def use_fused(x):
    """True where the custom Functions apply: every device but meta (autocast included)."""
    return x.device.type != 'meta'


def compute_dtypes(x):
    """``(act, acc)``: the dtypes in which the fused Functions compute for an input like ``x``.

    Under autocast on x's device (x not float64, which autocast leaves alone): ``act`` is the
    autocast dtype, in which activations are kept, saved, multiplied and convolved (as autocast
    runs matrix products and convolutions), and ``acc`` is float32, in which the reductions
    (LayerNorm statistics, the L2 norms of q and k), the C/heads x C/heads attention matrices and
    the softmax are computed. A bfloat16/float16 x without autocast: the same with x's dtype.
    Otherwise x's dtype for both (the float32/float64 path).
    """
    device = x.device.type
    low = None
    if x.dtype != torch.float64 and device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
    elif x.dtype in REDUCED_DTYPES:
        low = x.dtype
    return (x.dtype, x.dtype) if low is None else (low, torch.float32)


def _no_autocast(device_type):
    """The Functions cast explicitly: autocast is off inside their forward and backward passes."""
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _narrow(t, dtype):
    """``t`` (float32 or wider) in ``dtype``, clamped to its finite range (so that the ~1/eps gradient of an
    all-zero query channel, as F.normalize's clamp gives it, stays finite in float16)."""
    if t.dtype == dtype:
        return t
    top = torch.finfo(dtype).max
    return t.clamp(-top, top).to(dtype)


def to_rows(x):
    """(B, C, H, W) -> (B*H*W, C) rows of pixels; a view for channels_last maps, else a copy."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def from_rows(rows, b, h, w):
    """(B*H*W, C) or (B, H*W, C) rows -> (B, C, H, W) map in channels_last (a view)."""
    return rows.reshape(b, h, w, rows.shape[-1]).permute(0, 3, 1, 2)


def _batched_rows(x):
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def linear_map(x, weight, bias=None):
    """1x1 convolution of a (B, C, H, W) map with a (C_out, C) matrix, as a matrix product of pixel rows."""
    b, _, h, w = x.shape
    return from_rows(F.linear(to_rows(x), weight, bias), b, h, w)


def _into(dst, op, *args):
    """``dst[...] = op(*args)`` for a strided view ``dst``: written in place (``out=``) in eager mode; a
    temporary and a copy under ``torch.compile`` (Dynamo does not trace non-contiguous ``out=``)."""
    if torch.compiler.is_compiling():
        dst.copy_(op(*args))
    else:
        op(*args, out=dst)


def _flat(weight):
    """(C_out, C_in, 1, 1) 1x1 convolution weight -> (C_out, C_in) matrix (a view)."""
    return weight.reshape(weight.shape[0], -1)


# ------------------------------------------------------------------------------------------------
# channel LayerNorm


class _NormParams(nn.Module):
    """Holds the affine parameters of a channel LayerNorm (``weight``, and ``bias`` if any)."""

    def __init__(self, dim, with_bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if with_bias else None


class LayerNorm(nn.Module):
    """LayerNorm over the channels of every pixel of a (B, C, H, W) map (Restormer's LayerNorm).

    ``LayerNorm_type`` 'WithBias': ``(x - mean) / sqrt(var + 1e-5) * w + b`` (``layer_norm`` on the
    pixel rows); 'BiasFree': ``x / sqrt(var + 1e-5) * w`` (the variance is still taken around the
    mean). The result is a channels_last map.
    """

    def __init__(self, dim, LayerNorm_type='WithBias'):
        super().__init__()
        self.with_bias = LayerNorm_type != 'BiasFree'
        self.body = _NormParams(dim, self.with_bias)

    def forward(self, x):
        rows = x.permute(0, 2, 3, 1)
        if self.with_bias:
            out = F.layer_norm(rows, rows.shape[-1:], self.body.weight, self.body.bias, LN_EPS)
        else:
            var = torch.var(rows, dim=-1, keepdim=True, unbiased=False)
            out = rows * torch.rsqrt(var + LN_EPS) * self.body.weight
        return out.permute(0, 3, 1, 2)


def _layer_norm_affine(rows, norm_weight, norm_bias, acc):
    """The LayerNorm affine weights as ``native_layer_norm`` takes them with these rows (see _MIXED_AFFINE_DEVICES)."""
    if rows.dtype == acc or rows.device.type in _MIXED_AFFINE_DEVICES:
        return _cast(norm_weight, acc), _cast(norm_bias, acc)
    return _cast(norm_weight, rows.dtype), _cast(norm_bias, rows.dtype)


def _layer_norm_rows(rows, norm_weight, norm_bias, acc):
    """``(normed, mean, rstd, native)``: WithBias LayerNorm of (M, C) pixel rows; ``normed`` in the rows'
    dtype, the per-row ``mean``/``rstd`` in ``acc``. ``native``: computed by ``native_layer_norm`` (its
    backward applies); False where that kernel returns statistics in reduced precision on this device,
    and they were computed here in ``acc`` instead (see :func:`_layer_norm_rows_backward`)."""
    c = rows.shape[1]
    normed, mean, rstd = torch.native_layer_norm(rows, [c], *_layer_norm_affine(rows, norm_weight, norm_bias, acc),
                                                 LN_EPS)
    if mean.dtype == acc:
        return normed, mean, rstd, True
    wide = rows.to(acc)
    var, mean = torch.var_mean(wide, 1, correction=0)
    rstd = (var + LN_EPS).rsqrt_()
    normed = wide.sub_(mean[:, None]).mul_(rstd[:, None]).mul_(norm_weight.to(acc))
    if norm_bias is not None:
        normed.add_(norm_bias.to(acc))
    return normed.to(rows.dtype), mean, rstd, False


def _layer_norm_rows_backward(grad, rows, mean, rstd, norm_weight, norm_bias, native):
    """The rows' gradient (in their dtype) of :func:`_layer_norm_rows` for the output gradient ``grad``."""
    c, acc = rows.shape[1], mean.dtype
    if native:
        affine = _layer_norm_affine(rows, norm_weight, norm_bias, acc)
        return torch.ops.aten.native_layer_norm_backward(grad, rows, [c], mean, rstd, *affine, [True, False, False])[0]
    xhat = rows.to(acc).sub_(mean[:, None]).mul_(rstd[:, None])
    gx = grad.to(acc).mul_(norm_weight.to(acc))
    proj = (gx * xhat).mean(1, keepdim=True)
    return gx.sub_(gx.mean(1, keepdim=True)).sub_(xhat.mul_(proj)).mul_(rstd[:, None]).to(rows.dtype)


class NormLinear(torch.autograd.Function):
    """``conv1x1(LayerNorm_WithBias(x))`` keeping x and per-pixel mean/rstd (not the normalised map).

    ``apply(x, norm_weight, norm_bias, weight, bias)``: x (B, C, H, W); weight (C_out, C); bias
    (C_out,) or None. Returns (B, C_out, H, W) in channels_last. Under autocast (see
    :func:`compute_dtypes`): x is kept in the autocast dtype (a copy if it is wider), the
    statistics in float32, the result in the autocast dtype (as the 1x1 convolution gives it); a
    weight that is a computed copy (not a parameter or a view of one) is kept in the autocast dtype too.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias):
        b, c, h, w = x.shape
        act, acc = compute_dtypes(x)
        with _no_autocast(x.device.type):
            x = x.to(act)
            normed, mean, rstd, native = _layer_norm_rows(to_rows(x), norm_weight, norm_bias, acc)
            w_act = weight.to(act)
            out = F.linear(normed, w_act, _cast(bias, act))
        if w_act is not weight and weight._base is None and not weight.is_leaf:
            weight = w_act  # a fresh copy (channels padded): kept in the autocast dtype, as the product used it
        ctx.save_for_backward(x, norm_weight, norm_bias, weight, mean, rstd)
        ctx.has_bias, ctx.native = bias is not None, native
        return from_rows(out, b, h, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norm_weight, norm_bias, weight, mean, rstd = ctx.saved_tensors
        b, c, h, w = x.shape
        act, acc = x.dtype, mean.dtype
        need_x, need_nw, need_nb, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_nw = grad_nb = grad_w = grad_b = None
        with _no_autocast(x.device.type):
            rows, g = to_rows(x), to_rows(grad.to(act))
            # with xhat the normalised rows (normed = xhat * nw + nb): the weight gradients are sums over the
            # pixels of products with g, taken from the small matrix g^T xhat and the column sums of g (and
            # so accumulated in ``acc`` also where g and xhat are in a reduced precision)
            if need_w or need_nw:
                xhat = torch.native_layer_norm(rows, [c], None, None, LN_EPS)[0]
                gx = g.t().mm(xhat).to(acc)  # (C_out, C)
                del xhat
            g_sum = g.sum(0, dtype=acc) if need_w or need_b or need_nb else None
            if need_w:
                grad_w = gx * norm_weight.to(acc)
                if norm_bias is not None:
                    grad_w.addr_(g_sum, norm_bias.to(acc))
            if need_b and ctx.has_bias:
                grad_b = g_sum
            if need_nw:
                grad_nw = (gx * weight.to(acc)).sum(0)
            if need_nb:
                grad_nb = g_sum @ weight.to(acc)
            if need_x:
                grad_rows = _layer_norm_rows_backward(g.mm(weight.to(act)), rows, mean, rstd, norm_weight, norm_bias,
                                                      ctx.native)
                grad_x = from_rows(grad_rows, b, h, w)
        return grad_x, grad_nw, grad_nb, grad_w, grad_b


def norm_conv1x1(norm, conv, x):
    """``conv(norm(x))`` for a channel :class:`LayerNorm` and a 1x1 ``nn.Conv2d`` (fused if possible)."""
    if norm.with_bias and use_fused(x):
        return NormLinear.apply(x, norm.body.weight, norm.body.bias, _flat(conv.weight), conv.bias)
    return conv(norm(x))


# ------------------------------------------------------------------------------------------------
# transposed (channel) attention


def keep_largest(scores, keep=None):
    """``scores`` with all but the ``keep`` largest entries of every row (last dim) set to -inf, so
    that a softmax over the row ignores them; the kept entries are the ones ``torch.topk`` picks
    (ties included). ``keep`` None: ``scores`` unchanged."""
    if keep is None:
        return scores
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, torch.topk(scores, keep, dim=-1).indices, True)
    return scores.masked_fill(~kept, float('-inf'))


def channel_attention(q, k, v, temperature, heads, keep=None):
    """Transposed (channel) attention of MDTA: softmax(norm(q) norm(k)^T * t) v, per head.

    q, v: (B, C, H, W); k: (B, C, H', W') with H'W' = HW. Attention maps are C/heads x C/heads, so
    the cost is linear in the number of pixels. ``keep``: softmax over only the ``keep`` largest
    scores of every row (:func:`keep_largest`). The plain autograd formulation (the published
    one); :class:`ChannelAttention` is the fused equivalent.
    """
    b, c, h, w = q.shape
    q = F.normalize(q.reshape(b, heads, c // heads, h * w), dim=-1)
    k = F.normalize(k.reshape(b, heads, c // heads, -1), dim=-1)
    v = v.reshape(b, heads, c // heads, h * w)
    attn = keep_largest((q @ k.transpose(-2, -1)) * temperature, keep)
    return (attn.softmax(dim=-1) @ v).reshape(b, c, h, w)


def _dwconv(x, weight, bias):
    """Depthwise k x k convolution, 'same' padding (the blocks' ``*_dwconv`` / ``dwconv``)."""
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


def _dwconv_backward(grad, x, weight, has_bias, need_x, need_w, need_b):
    """Gradients (x, weight, bias) of :func:`_dwconv`. On CPU, in a reduced precision and with a kernel larger
    than 3 x 3, the weight and bias gradients are computed from float32 copies: the CPU kernel for them is
    several times slower in bfloat16 than in float32 there (and they are sums over every pixel)."""
    pad = weight.shape[-1] // 2
    sizes = [weight.shape[0]] if has_bias else None
    need_b = need_b and has_bias
    if x.device.type == 'cpu' and x.dtype in REDUCED_DTYPES and weight.shape[-1] > 3 and (need_w or need_b):
        grad_x = _dwconv_backward(grad, x, weight, False, True, False, False)[0] if need_x else None
        wide = torch.ops.aten.convolution_backward(grad.float(), x.float(), weight.float(), sizes, [1, 1], [pad, pad],
                                                   [1, 1], False, [0, 0], x.shape[1], [False, need_w, need_b])
        return grad_x, wide[1], wide[2]
    return torch.ops.aten.convolution_backward(grad, x, weight, sizes, [1, 1], [pad, pad], [1, 1], False, [0, 0],
                                               x.shape[1], [need_x, need_w, need_b])


class DepthwiseConv(torch.autograd.Function):
    """``apply(x, weight, bias)``: the 'same' depthwise k x k convolution of ``nn.Conv2d(groups=channels)``,
    with the backward of :func:`_dwconv_backward` (float32 weight gradients for kernels above 3 x 3 in a
    reduced precision on CPU). Under autocast x is kept, and the result given, in the autocast dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        act, _ = compute_dtypes(x)
        with _no_autocast(x.device.type):
            x = x.to(act)
            out = _dwconv(x, weight.to(act), _cast(bias, act))
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        with _no_autocast(x.device.type):
            return _dwconv_backward(grad.to(x.dtype), x, weight.to(x.dtype), ctx.has_bias, need_x, need_w, need_b)


def depthwise(conv, x):
    """A depthwise ``nn.Conv2d`` (groups = channels, 'same' padding) applied to x; fused where possible
    (:class:`DepthwiseConv`)."""
    return DepthwiseConv.apply(x, conv.weight, conv.bias) if use_fused(x) else conv(x)


def _split_qkv(src, k_src):
    """(q, k, v) row views (B, N, C) of a qkv map, or of a qv map and a separate k map."""
    rows = _batched_rows(src)
    if k_src is None:
        c = src.shape[1] // 3
        return rows[..., :c], rows[..., c:2 * c], rows[..., 2 * c:]
    c = src.shape[1] // 2
    return rows[..., :c], _batched_rows(k_src), rows[..., c:]


def _result_dtype(act, residual, out_dtype):
    """The dtype of a Function's result: ``out_dtype`` if given, else ``act`` promoted with the residual's
    (the plain formulation adds the residual to the projection's result)."""
    if out_dtype is not None:
        return out_dtype
    return act if residual is None else torch.promote_types(act, residual.dtype)


def _add_residual(out, residual_rows, beta=1.0, bias=None):
    """``out + beta * residual (+ bias)`` for rows ``out`` and ``residual_rows`` of the same shape (or None);
    the result in the dtype of ``out`` promoted with the residual's."""
    if residual_rows is not None:
        out = torch.add(out, residual_rows, alpha=beta)
    if bias is not None:
        out.add_(bias)
    return out


def _head_grams(a, b, heads):
    """(B, heads, c, c): ``a_h^T b_h`` for each head h of (B, N, heads * c) rows."""
    c = a.shape[-1] // heads
    return torch.stack([torch.bmm(a[..., i * c:(i + 1) * c].transpose(1, 2), b[..., i * c:(i + 1) * c])
                        for i in range(heads)], 1)


class ChannelAttention(torch.autograd.Function):
    """``beta * residual + project_out(channel_attention(q, k, v)) (+ bias)`` in one Function.

    ``apply(src, dw_weight, dw_bias, k_src, temperature, weight, bias, residual, heads, beta, keep=None,
    out_dtype=None)``: ``src`` goes through the depthwise convolution (``dw_weight``, ``dw_bias``;
    skipped if ``dw_weight`` is None). With ``k_src`` None, that gives the (B, 3C, H, W) qkv map (q,
    k, v = its thirds); otherwise the (B, 2C, H, W) qv map, ``k_src`` being the (B, C, H, W) keys.
    ``weight`` (C_out, C) is the output 1x1 projection, ``bias`` (C_out,) or None, ``residual`` (B,
    C_out, H, W) or None, ``beta`` a number, ``keep`` None or the number of largest scores of every
    row that the softmax keeps (:func:`keep_largest`; the others get zero weight and zero gradient).
    Returns (B, C_out, H, W) in channels_last, in ``out_dtype`` if given (the plain formulation's
    dtype under autocast when a scale tensor multiplies the projection), else in the compute dtype
    promoted with the residual's.

    Forward: per head, ``S = t * (q^T k) / (|q| |k|^T)`` (C/heads square), ``P = softmax(S)``; then
    ``out = v @ M`` with ``M = blockdiag(P^T) @ W^T`` (C x C_out per image). Saved: the inputs, P,
    S/t, the norms and M (all small but the inputs); the depthwise convolution is recomputed in
    the backward pass. Under autocast (:func:`compute_dtypes`) the inputs are saved in the autocast
    dtype (in float16, q and k are normalised before their product, which could overflow), and S, P,
    M and the norms are float32.
    """

    @staticmethod
    def forward(ctx, src, dw_weight, dw_bias, k_src, temperature, weight, bias, residual, heads, beta, keep=None,
                out_dtype=None):
        b, _, h, w = src.shape
        act, acc = compute_dtypes(src)
        out_dtype = _result_dtype(act, residual, out_dtype)
        with _no_autocast(src.device.type):
            src, k_src = src.to(act), _cast(k_src, act)
            qkv = src if dw_weight is None else _dwconv(src, dw_weight.to(act), _cast(dw_bias, act))
            q, k, v = _split_qkv(qkv, k_src)
            c_all, c_out = q.shape[-1], weight.shape[0]
            c = c_all // heads
            q_norm = torch.sum(q.square(), 1, dtype=acc).sqrt_()  # (B, C)
            k_norm = torch.sum(k.square(), 1, dtype=acc).sqrt_()
            if act not in SMALL_RANGE_DTYPES:  # q^T k (one rounding per entry), then divided by the norms
                gram = _head_grams(q, k, heads).to(acc)  # (B, heads, c, c)
                denom = (q_norm.clamp_min(NORM_EPS).view(b, heads, c, 1)
                         * k_norm.clamp_min(NORM_EPS).view(b, heads, 1, c))
                cosine = gram.div_(denom)
            else:  # float16: q and k normalised first (q^T k sums over the pixels and could overflow)
                qn, kn = q.new_empty(q.shape), k.new_empty(k.shape)  # q / |q| rounded once
                _into(qn, torch.mul, q, q_norm.clamp_min(NORM_EPS).reciprocal().unsqueeze(1))
                _into(kn, torch.mul, k, k_norm.clamp_min(NORM_EPS).reciprocal().unsqueeze(1))
                cosine = _head_grams(qn, kn, heads).to(acc)
                del qn, kn
            attn = torch.softmax(keep_largest(cosine * temperature.to(acc), keep), dim=-1)
            w_heads = weight.to(acc).view(c_out, heads, c).permute(1, 2, 0)  # (heads, c, C_out)
            mix = torch.matmul(attn.transpose(-1, -2), w_heads).reshape(b, c_all, c_out)
            if residual is not None and residual.dtype == act == out_dtype:
                out = torch.baddbmm(_batched_rows(residual), v, mix.to(act), beta=beta)
                if bias is not None:
                    out.add_(bias)
            else:
                out = _add_residual(torch.bmm(v, mix.to(act)).to(out_dtype),
                                    None if residual is None else _batched_rows(residual), beta, bias)
        ctx.save_for_backward(src, dw_weight, dw_bias, k_src, temperature, weight, attn, cosine, q_norm, k_norm, mix)
        ctx.heads, ctx.beta = heads, beta
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        return from_rows(out, b, h, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        src, dw_weight, dw_bias, k_src, temperature, weight, attn, cosine, q_norm, k_norm, mix = ctx.saved_tensors
        need_src, need_dw_w, need_dw_b, need_k, need_t, need_w, need_b, need_res = ctx.needs_input_grad[:8]
        heads = ctx.heads
        b, c_src, h, w = src.shape
        act, acc = src.dtype, attn.dtype
        nones = (None, ) * 4  # heads, beta, keep, out_dtype
        with _no_autocast(src.device.type):
            dw_w, dw_b = _cast(dw_weight, act), _cast(dw_bias, act)
            qkv = src if dw_weight is None else _dwconv(src, dw_w, dw_b)
            q, k, v = _split_qkv(qkv, k_src)
            c_all, c_out = q.shape[-1], weight.shape[0]
            c = c_all // heads
            g = _batched_rows(grad)  # (B, N, C_out)
            g_act = g.to(act)

            # out = v @ mix
            grad_mix = torch.bmm(v.transpose(1, 2), g_act).view(b, heads, c, c_out).to(acc)  # (B, heads, c_j, C_out)
            w_heads = weight.to(acc).view(c_out, heads, c).permute(1, 2, 0)
            grad_w = grad_b = grad_res = None
            if need_w:
                grad_w = torch.matmul(attn, grad_mix).sum(0).permute(2, 0, 1).reshape(c_out, c_all)
            if need_b and ctx.has_bias:
                grad_b = g.sum((0, 1), dtype=acc)
            if need_res and ctx.has_residual:
                grad_res = grad if ctx.beta == 1 else grad * ctx.beta
            # mix = blockdiag(attn^T) @ W^T -> attn; softmax; temperature
            grad_attn = torch.matmul(w_heads, grad_mix.transpose(-1, -2))  # (B, heads, c_i, c_j)
            grad_s = attn * (grad_attn - (grad_attn * attn).sum(-1, keepdim=True))
            grad_t = (grad_s * cosine).sum((0, 2, 3)).view_as(temperature) if need_t else None
            grad_cos = grad_s.mul_(temperature.to(acc))
            if not (need_src or need_dw_w or need_dw_b or need_k):
                return (None, None, None, None, grad_t, grad_w, grad_b, grad_res) + nones

            # cosine = (q^T k) / (|q| |k|^T) with F.normalize's clamp of the norms at eps
            dq, dk = q_norm.clamp_min(NORM_EPS), k_norm.clamp_min(NORM_EPS)
            scaled = _narrow(grad_cos / (dq.view(b, heads, c, 1) * dk.view(b, heads, 1, c)), act)  # d/d(q^T k)
            gc = grad_cos * cosine
            coef_q = torch.where(q_norm > NORM_EPS, gc.sum(-1).view(b, c_all) / dq.square(), 0).unsqueeze(1)
            coef_k = torch.where(k_norm > NORM_EPS, gc.sum(-2).view(b, c_all) / dk.square(), 0).unsqueeze(1)

            grad_rows = q.new_empty(b, h * w, c_src)
            grad_qkv = from_rows(grad_rows, b, h, w)
            if k_src is None:
                grad_q, grad_k, grad_v = (grad_rows[..., :c_all], grad_rows[..., c_all:2 * c_all],
                                          grad_rows[..., 2 * c_all:])
                grad_k_src = None
            else:
                grad_q, grad_v = grad_rows[..., :c_all], grad_rows[..., c_all:]
                grad_k = q.new_empty(b, h * w, c_all)
                grad_k_src = from_rows(grad_k, b, h, w)
            _into(grad_q, torch.mul, q, coef_q.neg_())  # (computed in acc, rounded once into act)
            _into(grad_k, torch.mul, k, coef_k.neg_())
            for i in range(heads):
                sl = slice(i * c, (i + 1) * c)
                grad_q[..., sl].baddbmm_(k[..., sl], scaled[:, i].transpose(1, 2))
                grad_k[..., sl].baddbmm_(q[..., sl], scaled[:, i])
            _into(grad_v, torch.bmm, g_act, mix.to(act).transpose(1, 2))
            del qkv, q, k, v, g_act
            if dw_weight is None:
                return (grad_qkv, None, None, grad_k_src, grad_t, grad_w, grad_b, grad_res) + nones
            grad_src, grad_dw_w, grad_dw_b = _dwconv_backward(grad_qkv, src, dw_w, dw_bias is not None, need_src,
                                                              need_dw_w, need_dw_b)
        return (grad_src, grad_dw_w, grad_dw_b, grad_k_src, grad_t, grad_w, grad_b, grad_res) + nones


class ProjectedAttention(nn.Module):
    """Base of :class:`Attention` and VLU-Net's cross-attention: ``attend`` needs the subclass's
    ``temperature``, ``num_heads`` and ``project_out``."""

    def attend(self, src, dwconv, k_src, residual=None, scale=None, beta=1.0):
        """Attention of the qkv map ``dwconv(src)`` (or qv map ``dwconv(src)`` and keys ``k_src``),
        projected, scaled, added; ``dwconv`` the depthwise ``nn.Conv2d`` (recomputed in the backward
        pass rather than stored), or None when ``src`` is already the qkv / qv map."""
        if not use_fused(src):
            src = src if dwconv is None else dwconv(src)
            if k_src is None:
                q, k, v = src.chunk(3, dim=1)
            else:
                (q, v), k = src.chunk(2, dim=1), k_src
            out = self.project_out(channel_attention(q, k, v, self.temperature, self.num_heads))
            out = out if scale is None else scale * out
            if residual is None:
                return out
            return residual + out if beta == 1 else out - residual if beta == -1 else out + beta * residual
        weight, bias = _flat(self.project_out.weight), self.project_out.bias
        out_dtype = None
        if scale is not None:
            weight = weight * scale
            bias = None if bias is None else bias * scale
            act = compute_dtypes(src)[0]
            if act in REDUCED_DTYPES and torch.is_tensor(scale) and scale.dim() and scale.is_floating_point():
                # the plain formulation's ``scale * project_out(.)`` promotes to the scale's dtype
                out_dtype = torch.promote_types(act, scale.dtype)
                out_dtype = out_dtype if residual is None else torch.promote_types(out_dtype, residual.dtype)
        dw_weight, dw_bias = (None, None) if dwconv is None else (dwconv.weight, dwconv.bias)
        return ChannelAttention.apply(src, dw_weight, dw_bias, k_src, self.temperature, weight, bias, residual,
                                      self.num_heads, float(beta), None, out_dtype)


class Attention(ProjectedAttention):
    """MDTA: multi-Dconv-head transposed self-attention (Restormer).

    ``forward(x, residual=None, scale=None, norm=None, beta=1.0)``: ``project_out(attention)``,
    multiplied by ``scale`` (a number or tensor, e.g. a learnt step size), plus ``beta * residual``
    when a residual is given (``beta`` is 1 or -1 on the plain path).
    """

    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x, residual=None, scale=None, norm=None, beta=1.0):
        """``norm``: a channel :class:`LayerNorm` applied to x first (fused with the qkv projection)."""
        qkv = self.qkv(x) if norm is None else norm_conv1x1(norm, self.qkv, x)
        return self.attend(qkv, self.qkv_dwconv, None, residual, scale, beta)


class ChannelCrossAttention(ProjectedAttention):
    """Transposed (channel) attention with queries from ``x`` and keys/values from ``y``.

    ``q = q_dwconv(q(x))``, ``(k, v) = kv_dwconv(kv(y))`` with a ``kv_kernel_size`` depthwise
    convolution (AdaIR 3, MoCE-IR 7), then MDTA's attention and ``project_out``;
    ``forward(x, y, residual=None)`` adds ``residual`` to the result. x and y have the same shape.
    """

    def __init__(self, dim, num_heads, bias, kv_kernel_size=3):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.q_dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=bias)
        self.kv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.kv_dwconv = nn.Conv2d(dim * 2, dim * 2, kernel_size=kv_kernel_size, padding=kv_kernel_size // 2,
                                   groups=dim * 2, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x, y, residual=None):
        k, v = depthwise(self.kv_dwconv, self.kv(y)).chunk(2, dim=1)
        return self.attend(torch.cat([depthwise(self.q_dwconv, self.q(x)), v], 1), None, k, residual)


# ------------------------------------------------------------------------------------------------
# gated-Dconv feed-forward network


def _gelu_(x):
    """In-place exact GELU of a contiguous tensor (GELU of a strided half-width view is ~3x slower on CPU)."""
    return torch.ops.aten.gelu.out(x, out=x)


def _gelu_grad(grad, x, out=None):
    """``grad * gelu'(x)`` (exact GELU)."""
    if out is None:
        return torch.ops.aten.gelu_backward(grad, x)
    return torch.ops.aten.gelu_backward.grad_input(grad, x, grad_input=out)


class GatedLinear(torch.autograd.Function):
    """``residual + conv1x1(gelu(a) * b)`` with (a, b) = channels [0, h) and [h, 2h) of ``dwconv(src)``.

    ``apply(src, dw_weight, dw_bias, weight, bias, residual, hidden)``: src (B, C_src, H, W),
    C_src >= 2h (channels past 2h are padding, ignored), goes through the depthwise convolution
    (``dw_weight``, ``dw_bias``; skipped if ``dw_weight`` is None); weight (C_out, h); bias (C_out,)
    or None; residual (B, C_out, H, W) or None; ``hidden`` = h. Returns (B, C_out, H, W) in
    channels_last. Keeps ``src`` only: the depthwise convolution and the gate are recomputed in the
    backward pass. Under autocast (:func:`compute_dtypes`) ``src`` is kept, and the gate computed,
    in the autocast dtype; the result is in that dtype promoted with the residual's.
    """

    @staticmethod
    def forward(ctx, src, dw_weight, dw_bias, weight, bias, residual, hidden):
        b, _, h, w = src.shape
        act, _ = compute_dtypes(src)
        with _no_autocast(src.device.type):
            src = src.to(act)
            rows = to_rows(src if dw_weight is None else _dwconv(src, dw_weight.to(act), _cast(dw_bias, act)))
            gated = _gelu_(rows[:, :hidden].contiguous()).mul_(rows[:, hidden:2 * hidden])
            del rows
            w_act = weight.to(act)
            if residual is None:
                out = F.linear(gated, w_act, _cast(bias, act))
            elif residual.dtype == act:
                out = torch.addmm(to_rows(residual), gated, w_act.t())
                if bias is not None:
                    out.add_(bias)
            else:
                out = _add_residual(F.linear(gated, w_act, _cast(bias, act)), to_rows(residual))
        ctx.save_for_backward(src, dw_weight, dw_bias, weight)
        ctx.hidden, ctx.has_bias, ctx.has_residual = hidden, bias is not None, residual is not None
        return from_rows(out, b, h, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        src, dw_weight, dw_bias, weight = ctx.saved_tensors
        need_src, need_dw_w, need_dw_b, need_w, need_b, need_res = ctx.needs_input_grad[:6]
        hidden = ctx.hidden
        b, _, h, w = src.shape
        act, acc = src.dtype, torch.float32 if src.dtype in REDUCED_DTYPES else src.dtype
        grad_src = grad_dw_w = grad_dw_b = grad_w = grad_b = None
        with _no_autocast(src.device.type):
            dw_w, dw_b = _cast(dw_weight, act), _cast(dw_bias, act)
            rows, g = to_rows(src if dw_weight is None else _dwconv(src, dw_w, dw_b)), to_rows(grad.to(act))
            a, gate = rows[:, :hidden].contiguous(), rows[:, hidden:2 * hidden]
            gelu_a = F.gelu(a)
            if need_w:
                grad_w = g.t().mm(gelu_a * gate).to(weight.dtype)
            if need_b and ctx.has_bias:
                grad_b = g.sum(0, dtype=acc)
            if need_src or need_dw_w or need_dw_b:
                grad_gated = g.mm(weight.to(act))
                grad_rows = rows.new_empty(rows.shape)
                grad_rows[:, 2 * hidden:] = 0
                _into(grad_rows[:, hidden:2 * hidden], torch.mul, grad_gated, gelu_a)
                del gelu_a
                _into(grad_rows[:, :hidden], _gelu_grad, grad_gated.mul_(gate), a)
                del rows, a, gate, grad_gated
                grad_src = from_rows(grad_rows, b, h, w)
                if dw_weight is not None:
                    grad_src, grad_dw_w, grad_dw_b = _dwconv_backward(grad_src, src, dw_w, dw_bias is not None,
                                                                      need_src, need_dw_w, need_dw_b)
        grad_res = grad if ctx.has_residual and need_res else None
        return grad_src, grad_dw_w, grad_dw_b, grad_w, grad_b, grad_res, None


def _pad_out_channels(tensor, pad):
    """Zero output channels (dim 0) appended to a weight or bias; differentiable (the pad gets no gradient)."""
    if tensor is None or not pad:
        return tensor
    return F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, pad))


class FeedForward(nn.Module):
    """GDFN: gated-Dconv feed-forward network, ``project_out(gelu(a) * b)`` with (a, b) = dwconv(project_in(x)).

    ``forward(x, residual=None, norm=None)``: ``norm`` (a channel :class:`LayerNorm`) is applied to
    x first, ``residual`` added to the result.

    On the fused path the 2h hidden channels are padded with zero channels to a multiple of
    ``CHANNEL_ALIGN`` (zero rows of the ``project_in`` and ``dwconv`` weights): oneDNN's depthwise
    convolution is up to ~1.6x faster on, e.g., 512 channels than on the published 510.
    """

    CHANNEL_ALIGN = 16

    def __init__(self, dim, ffn_expansion_factor, bias):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def activate_input(self, x):
        """What runs between ``project_in`` and the depthwise conv (nothing in GDFN; a variant may
        override it, e.g. MIRAGE's GELU; it must keep zero channels zero, for the fused path's padding)."""
        return x

    def forward(self, x, residual=None, norm=None):
        if not use_fused(x):
            a, b = self.dwconv(self.activate_input(self.project_in(x if norm is None else norm(x)))).chunk(2, dim=1)
            out = self.project_out(F.gelu(a) * b)
            return out if residual is None else residual + out
        hidden = self.project_out.weight.shape[1]
        pad = -2 * hidden % self.CHANNEL_ALIGN
        w_in = _pad_out_channels(_flat(self.project_in.weight), pad)
        b_in = _pad_out_channels(self.project_in.bias, pad)
        if norm is not None and norm.with_bias:
            src = NormLinear.apply(x, norm.body.weight, norm.body.bias, w_in, b_in)
        else:
            src = linear_map(x if norm is None else norm(x), w_in, b_in)
        return GatedLinear.apply(self.activate_input(src), _pad_out_channels(self.dwconv.weight, pad),
                                 _pad_out_channels(self.dwconv.bias, pad), _flat(self.project_out.weight),
                                 self.project_out.bias, residual, hidden)


class TransformerBlock(nn.Module):
    """x + MDTA(LN(x)), then x + GDFN(LN(x))."""

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):
        super().__init__()
        self.norm1 = LayerNorm(dim, LayerNorm_type)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, LayerNorm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x):
        x = self.attn(x, residual=x, norm=self.norm1)
        return self.ffn(x, residual=x, norm=self.norm2)


def transformer_blocks(num_blocks, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):
    return nn.Sequential(*[
        TransformerBlock(dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type) for _ in range(num_blocks)
    ])


# ------------------------------------------------------------------------------------------------
# embedding and resampling


class OverlapPatchEmbed(nn.Module):
    """3x3 convolution from image channels to features."""

    def __init__(self, in_c=3, embed_dim=48, bias=False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x):
        return self.proj(x)


class Downsample(nn.Module):
    """Halve H and W, double C: conv to C/2 channels, then PixelUnshuffle(2)."""

    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    """Double H and W, halve C: conv to 2C channels, then PixelShuffle(2)."""

    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)
