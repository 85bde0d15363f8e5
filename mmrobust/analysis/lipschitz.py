"""Guaranteed upper bounds on an encoder's global l2 Lipschitz constant (SPEC section 5, sound certificate).

The bound is a product/sum over layers, each factor a *proven* upper bound of that layer's l2 Lipschitz constant:

- convolution (BatchNorm folded in with its running statistics, i.e. eval-mode semantics): the minimum of two
  proven bounds on the operator norm, see `conv_norm_bound`;
- linear layer: its exact spectral norm; stand-alone BatchNorm: max_c |gamma_c| / sqrt(var_c + eps);
- ReLU, identity, dropout (eval): 1;
- max pooling: sqrt(n_h * n_w) with n = floor((k - 1) / s) + 1 the most windows one input index falls in per axis
  (|max a - max b| <= max |a - b| on a window, and an input can be counted in n_h * n_w windows; this is tight,
  so the often quoted "max-pool is 1-Lipschitz" is wrong for overlapping windows such as ResNet's 3x3/2);
- global average pooling of an H x W map: 1 / sqrt(H W) (Cauchy-Schwarz);
- residual block relu(main(x) + shortcut(x)): Lip(main) + Lip(shortcut) (identity shortcut: 1);
- a FrameEncoder's mean over T frames, as a function of all T frames: Lip(frame net) / sqrt(T), since
  ||(1/T) sum_t f(x_t) - f(x'_t)|| <= (L/T) sum_t ||d_t|| <= (L/sqrt(T)) ||d||.

Rules are looked up by module type (MRO order) in `LIPSCHITZ_RULES`; `register_lipschitz` adds rules for new
modules. A rule maps (module, one sample's input shape) to (bound, output shape). For a FrameEncoder subclass the
rule bounds `frame_features` on one frame (C, H, W); `lipschitz_upper_bound` handles the time axis.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmrobust.models.encoders import BasicBlock, FrameEncoder, PatchTransformer, ResNet

Shape = tuple[int, ...]
Rule = Callable[[nn.Module, Shape], tuple[float, Shape]]
LIPSCHITZ_RULES: dict[type, Rule] = {}

_FFT_BUDGET = 2 ** 22  # complex entries per chunk of the frequency sweep (64 MiB in complex128)
# Relative slack for float64 rounding in the eigenvalue computations (their errors are ~1e-13 relative).
_ROUNDING = 1 + 1e-9


def register_lipschitz(*types: type):
    def deco(fn: Rule) -> Rule:
        for t in types:
            LIPSCHITZ_RULES[t] = fn
        return fn
    return deco


def module_lipschitz(module: nn.Module, in_shape: Sequence[int]) -> tuple[float, Shape]:
    """(upper bound on the l2 Lipschitz constant of `module` on inputs of shape in_shape, output shape)."""
    for t in type(module).__mro__:
        if t in LIPSCHITZ_RULES:
            return LIPSCHITZ_RULES[t](module, tuple(in_shape))
    raise NotImplementedError(f"no Lipschitz rule for {type(module).__name__}; add one with "
                              f"mmrobust.analysis.register_lipschitz({type(module).__name__})")


def lipschitz_upper_bound(encoder: nn.Module, input_shape: Sequence[int]) -> float:
    """Guaranteed upper bound on sup ||phi(x) - phi(x')||_2 / ||x - x'||_2 for one sample of shape input_shape
    ((C, H, W), or (T, C, H, W) for a FrameEncoder, which then averages T per-frame features)."""
    shape = tuple(int(s) for s in input_shape)
    if isinstance(encoder, FrameEncoder) and len(shape) == 4:
        frame, _ = module_lipschitz(encoder, shape[1:])
        return frame / math.sqrt(shape[0])
    return module_lipschitz(encoder, shape)[0]


# ---------------------------------------------------------------- convolutions

def spectral_norm(a: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each matrix in a batch (..., r, c), as sqrt(lambda_max) of the smaller Gram
    matrix: a Hermitian eigenvalue problem is several times cheaper than an SVD at the same float64 accuracy."""
    a = a.to(torch.complex128 if a.is_complex() else torch.float64)
    ah = a.mH
    gram = ah @ a if a.shape[-1] <= a.shape[-2] else a @ ah
    return torch.linalg.eigvalsh(gram)[..., -1].clamp(min=0).sqrt() * _ROUNDING


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def fantastic_four_bound(weight: torch.Tensor) -> float:
    """sqrt(h w) * min(||R||_2, ||S||_2, ||T||_2, ||U||_2) for a kernel of shape (c_out, c_in, h, w) with
    R[(o,a),(i,b)], S[(o,b),(i,a)], T[o,(i,a,b)], U[(o,a,b),i] = weight[o,i,a,b] (Singla & Feizi, ICLR 2021).

    Upper bound on the operator norm of the stride-1 convolution with zero padding of any size, on any input
    size. Proof for T: y_p = T v_p with v_p the stacked input window at p; every input pixel lies in at most h w
    windows, so sum_p ||y_p||^2 <= ||T||^2 h w ||x||^2. U: the same argument on the adjoint. R: with u_{r,q}
    the (padded) input row r on the column window at q, y[:, p1, q] = sum_a block_a(R u_{p1+a, q}), where
    block_a picks the c_out rows of kernel row a; Cauchy-Schwarz over a gives a factor h, each R u_{r,q} is used
    once per a, and every input pixel lies in at most w column windows. S: rows and columns swapped.
    A stride-s convolution keeps a subset of the stride-1 outputs, so the bound holds for it too.
    """
    w = weight.detach().double()
    co, ci, h, k = w.shape
    mats = [w.permute(0, 2, 1, 3).reshape(co * h, ci * k), w.permute(0, 3, 1, 2).reshape(co * k, ci * h),
            w.reshape(co, ci * h * k), w.permute(0, 2, 3, 1).reshape(co * h * k, ci)]
    return math.sqrt(h * k) * min(float(spectral_norm(m)) for m in mats)


def circulant_embedding_bound(weight: torch.Tensor, in_hw: Sequence[int], padding=0) -> float:
    """max over the N1 x N2 DFT grid of sigma_max(K_hat(w)), K_hat(w) = sum_{a,b} K[:, :, a, b] e^{-2 pi i
    (w1 a / N1 + w2 b / N2)}, with N = n + total padding (at least the kernel size).

    This is the exact norm of the *circular* convolution on N1 x N2 maps (Sedghi et al., 2019). It bounds the
    zero-padded convolution on n1 x n2 inputs because that operator is a restriction of it: embed the padded
    input in the N-grid (an isometry); every output the zero-padded convolution keeps reads indices < N, so no
    wrap-around occurs, and dropping outputs (including stride subsampling) cannot increase the norm.
    Evaluated on the n x n grid instead (the usual use for circular padding), it would NOT be a valid bound.
    Cost: one Hermitian eigenproblem of size min(c_in, c_out) per frequency, N1 (N2 // 2 + 1) of them, on the
    kernel's device (minutes on a CPU for a width-64 ResNet18 on 128 x 1024 spectrograms).
    """
    w = weight.detach().double()
    co, ci, h, k = w.shape
    if isinstance(padding, str):
        total = (0, 0) if padding == "valid" else (h - 1, k - 1)  # "same": total padding d (k - 1), d = 1
    else:
        total = tuple(2 * p for p in _pair(padding))
    n1, n2 = max(int(in_hw[0]) + total[0], h), max(int(in_hw[1]) + total[1], k)
    half = n2 // 2 + 1  # K is real: sigma(K_hat(-w)) = sigma(K_hat(w)), so half of the w2 axis covers the grid
    rows = max(1, _FFT_BUDGET // (co * ci * half))
    best = 0.0
    for lo in range(0, n1, rows):
        w1 = torch.arange(lo, min(lo + rows, n1), dtype=torch.float64, device=w.device)
        a = torch.arange(h, dtype=torch.float64, device=w.device)
        phase = torch.exp(-2j * math.pi * w1[:, None] * a / n1)  # (r, h)
        part = torch.einsum("oiab,ra->roib", w.to(phase.dtype), phase)
        khat = torch.fft.fft(part, n=n2, dim=-1)[..., :half]  # (r, co, ci, half)
        sig = spectral_norm(khat.permute(0, 3, 1, 2))
        best = max(best, float(sig.max()))
    return best


def conv_norm_bound(weight: torch.Tensor, in_hw: Sequence[int], padding=0) -> float:
    """min(fantastic_four_bound, circulant_embedding_bound): both are proven upper bounds on the operator norm
    of the zero-padded convolution (any stride) with this kernel on in_hw inputs, so their minimum is one too."""
    return min(fantastic_four_bound(weight), circulant_embedding_bound(weight, in_hw, padding))


def _check_conv(conv: nn.Conv2d):
    if conv.padding_mode != "zeros" or conv.groups != 1 or _pair(conv.dilation) != (1, 1):
        raise NotImplementedError(f"Lipschitz bound: only zero-padded, ungrouped, undilated convolutions are "
                                  f"supported, got {conv}")


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    if bn.running_var is None:
        raise ValueError(f"{bn}: no running statistics (track_running_stats=False), cannot fold into a conv")
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    return scale * bn.weight.detach().double() if bn.affine else scale


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> nn.Conv2d:
    """A new Conv2d equal to bn(conv(x)) with bn in eval mode: W' = W s, b' = (b - mu) s + beta,
    s = gamma / sqrt(var + eps) per output channel."""
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels,
                                                                                 dtype=torch.float64)
    if bn is not None:
        s = _bn_scale(bn)
        weight = weight * s[:, None, None, None]
        bias = (bias - bn.running_mean.double()) * s
        if bn.affine:
            bias = bias + bn.bias.detach().double()
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out.to(conv.weight.device)


def _conv_out_shape(conv: nn.Conv2d, shape: Shape) -> Shape:
    x = torch.empty(1, *shape, device="meta")
    return tuple(F.conv2d(x, conv.weight.to("meta"), None, conv.stride, conv.padding, conv.dilation,
                          conv.groups).shape[1:])


def conv_bn_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, shape: Shape) -> tuple[float, Shape]:
    """Bound for x -> bn(conv(x)) (eval-mode BatchNorm folded into the kernel; biases do not matter)."""
    _check_conv(conv)
    weight = conv.weight.detach().double()
    if bn is not None:
        weight = weight * _bn_scale(bn)[:, None, None, None]
    return conv_norm_bound(weight, shape[1:], conv.padding), _conv_out_shape(conv, shape)


# ---------------------------------------------------------------- rules

@register_lipschitz(nn.Conv2d)
def _conv(conv, shape):
    return conv_bn_lipschitz(conv, None, shape)


@register_lipschitz(nn.BatchNorm2d, nn.BatchNorm1d)
def _bn(bn, shape):
    return float(_bn_scale(bn).abs().max()), shape


@register_lipschitz(nn.ReLU, nn.Identity, nn.Dropout)
def _one(module, shape):
    return 1.0, shape


@register_lipschitz(nn.Linear)
def _linear(lin, shape):
    return float(spectral_norm(lin.weight.detach())), (*shape[:-1], lin.out_features)


@register_lipschitz(nn.Flatten)
def _flatten(flat, shape):
    full = (1, *shape)
    start, end = flat.start_dim % len(full), flat.end_dim % len(full)
    return 1.0, (*full[1:start], math.prod(full[start:end + 1]), *full[end + 1:])


@register_lipschitz(nn.MaxPool2d)
def _maxpool(pool, shape):
    if _pair(pool.dilation) != (1, 1):
        raise NotImplementedError("Lipschitz bound: dilated max pooling is not supported")
    overlap = math.prod((k - 1) // s + 1 for k, s in zip(_pair(pool.kernel_size), _pair(pool.stride)))
    out = F.max_pool2d(torch.empty(1, *shape, device="meta"), pool.kernel_size, pool.stride, pool.padding,
                       pool.dilation, pool.ceil_mode)
    return math.sqrt(overlap), tuple(out.shape[1:])


@register_lipschitz(nn.AdaptiveAvgPool2d)
def _global_avgpool(pool, shape):
    if _pair(pool.output_size) != (1, 1):
        raise NotImplementedError("Lipschitz bound: only global average pooling (output size 1) is supported")
    return 1.0 / math.sqrt(shape[-1] * shape[-2]), (*shape[:-2], 1, 1)


@register_lipschitz(nn.Sequential)
def _sequential(seq, shape):
    """Product of the layers' bounds; a Conv2d directly followed by a BatchNorm2d is bounded as one folded conv."""
    layers, lip, i = list(seq), 1.0, 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
            factor, shape = conv_bn_lipschitz(layer, layers[i + 1], shape)
            i += 2
        else:
            factor, shape = module_lipschitz(layer, shape)
            i += 1
        lip *= factor
    return lip, shape


@register_lipschitz(BasicBlock)
def _basic_block(block, shape):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)): Lip <= L(conv1 bn1) L(conv2 bn2) + L(shortcut)."""
    l1, mid = conv_bn_lipschitz(block.conv1, block.bn1, shape)
    l2, out = conv_bn_lipschitz(block.conv2, block.bn2, mid)
    short = 1.0 if block.downsample is None else _sequential(block.downsample, shape)[0]
    return l1 * l2 + short, out


@register_lipschitz(ResNet)
def _resnet(net, shape):
    """frame_features: maxpool(relu(bn1(conv1 x))) -> layer1..4 -> mean over H x W."""
    lip, shape = conv_bn_lipschitz(net.conv1, net.bn1, shape)
    factor, shape = _maxpool(net.maxpool, shape)
    lip *= factor
    for name in ("layer1", "layer2", "layer3", "layer4"):
        factor, shape = _sequential(getattr(net, name), shape)
        lip *= factor
    return lip / math.sqrt(shape[-1] * shape[-2]), shape[:1]


@register_lipschitz(PatchTransformer)
def _transformer(net, shape):
    raise NotImplementedError("Lipschitz bound: PatchTransformer has no global l2 Lipschitz bound (dot-product "
                              "self-attention is not globally Lipschitz, Kim et al. 2021), so no sound certified "
                              "radius exists for it; use a ResNet encoder or the empirical CRMT bound r(x)")


# ---------------------------------------------------------------- empirical check

def jacobian_spectral_norm(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int = 30,
                           seed: int = 0, max_dense: int = 512) -> float:
    """||J_fn(x)||_2, a *lower* estimate of the Lipschitz constant of fn near x, for checking the upper bounds.

    With at most max_dense outputs the Jacobian is built (one vectorised reverse pass per output) and its norm
    is exact; otherwise power iteration on J^T J (forward- and reverse-mode products) for `iters` steps.
    fn sees x with its batch dimension: pass one sample (batch of 1) for a per-sample value.
    """
    with torch.no_grad():
        n_out = fn(x).numel()
    if n_out <= max_dense:
        jac = torch.autograd.functional.jacobian(fn, x, vectorize=True).reshape(n_out, -1)
        return float(torch.linalg.matrix_norm(jac.double(), ord=2))
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        _, jv = torch.autograd.functional.jvp(fn, x, v)
        _, jtjv = torch.autograd.functional.vjp(fn, x, jv)
        sigma = float(jv.norm())
        n = jtjv.norm()
        if n == 0:
            break
        v = jtjv / n
    return sigma
