"""CPU inference with real integer matrix multiplies for a calibrated low-bit student.

Each quantized linear whose input activation is quantized per tensor becomes an
:class:`Int8Linear` (attention's ``in_proj`` and ``out_proj`` leaves too; the attention runs
its own forward around them): the input is rounded to its calibrated uint8 grid, multiplied
with the int8 weight codes in an integer GEMM (int32 accumulation), and rescaled to float,
which is the fake-quant computation carried out in integers. Two kernels, both shipped with torch:

- ``fbgemm``: ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` (static input
  scale/zero point, fused quantization, AVX2/AVX512-VNNI GEMM, float output);
- ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32) with the zero point folded out.

The attention q/k/v products, softmax, LayerNorms and the patch-embedding conv stay in float
(their quantizers still apply), as does every layer whose activation is float or per channel
(an integer GEMM takes one input scale; :func:`convert_to_int8` warns about such layers).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable

import torch
from torch import nn

from p4q_lightning.quant import ActivationQuantizer, QuantLinear, WeightQuantizer

log = logging.getLogger(__name__)


def _prepack_fbgemm(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> object:
    zero = torch.zeros(codes.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized-tensor constructors warn about their future
        warnings.simplefilter("ignore")
        # the on-grid float weight re-quantizes to exactly its codes (|error| << half a step)
        grid = codes.float() * scale.float()[:, None]
        qw = torch.quantize_per_channel(grid, scale.double(), zero, 0, torch.qint8)
        if not torch.equal(qw.int_repr(), codes):
            raise RuntimeError("int8 prepack changed the weight codes; please report this")
        torch.backends.quantized.engine = "fbgemm"
        return torch.ops.quantized.linear_prepack(qw, bias)


@functools.cache
def fbgemm_exact() -> bool:
    """Whether fbgemm's u8 x s8 GEMM is exact for 8-bit inputs on this CPU.

    Without VNNI (AVX2, or AVX-512 without VNNI) fbgemm multiplies pairs of u8 x s8 products
    into an int16 intermediate that saturates at 32767; two products of 255 x 127 already
    exceed it, so full-range 8-bit activations come out wrong. The probe runs exactly that
    worst case and compares with float arithmetic. False when fbgemm is not built in.
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        codes = torch.full((16, 64), 127, dtype=torch.int8)
        codes[:8, 1::2] = -127  # rows that stay in int16 range as a control
        scale = torch.full((16,), 0.01)
        packed = _prepack_fbgemm(codes, scale, None)
        x = torch.full((4, 64), 2.55)  # every input at uint8 code 255
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, 0.01, 0, packed)
    except (RuntimeError, AttributeError) as e:
        log.warning("fbgemm int8 GEMM unavailable (%s); using torch._int_mm", e)
        return False
    ref = (torch.full((4, 64), 255.0) @ codes.float().t()) * 1e-4
    return bool(torch.allclose(y, ref, rtol=1e-5, atol=1e-4))


@functools.cache
def int8_backend() -> str:
    """The kernel the int8 path uses here: ``fbgemm`` where it is exact, else ``int_mm``."""
    if fbgemm_exact():
        return "fbgemm"
    if "fbgemm" in torch.backends.quantized.supported_engines:
        log.warning("fbgemm int8 GEMM saturates on this CPU (no VNNI); using torch._int_mm")
    return "int_mm"


def cpu_int8_report() -> dict[str, object]:
    """What decides the int8 kernel on this machine, for benchmarks and bug reports."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": [f for f in wanted if f in flags],
        "fbgemm_instructions_env": os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS"),
        "fbgemm_exact": fbgemm_exact(),
        "int8_backend": int8_backend(),
    }


def _check_backend(backend: str) -> None:
    if backend not in ("fbgemm", "int_mm"):
        raise ValueError(f"unknown int8 backend {backend!r}: use 'fbgemm' or 'int_mm'")
    if backend == "fbgemm" and not fbgemm_exact():
        raise ValueError(
            "int8 backend 'fbgemm' would give wrong results on this CPU (its int16 "
            "intermediate saturates without VNNI, or fbgemm is not built in): use "
            "backend='int_mm' or leave backend unset to pick the exact kernel"
        )


class Int8Linear(nn.Module):
    """A linear layer computed as ``s_x * s_w * (int8 GEMM(q(x), codes))`` + bias (CPU).

    Built from an on-grid weight, its per-output-channel scale and the calibrated per-tensor
    input quantizer (bits <= 8). Holds no trainable state: for inference only.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        act: ActivationQuantizer,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if act.bits is None or act.bits > 8 or act.per_channel or not bool(act.calibrated):
            raise ValueError(
                "Int8Linear needs a calibrated per-tensor input quantizer of <= 8 bits"
            )
        self.backend = backend or int8_backend()
        _check_backend(self.backend)
        w = weight.detach().float().cpu()
        scale = weight_scale.detach().float().cpu()
        codes = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)  # any grid
        self.out_features, self.in_features = codes.shape
        self.x_scale = float(act.scale.reshape(-1)[0])
        self.x_zp = int(act.zero_point.reshape(-1)[0])
        self.a_qmax = 2**act.bits - 1
        # inputs outside the grid are clipped first, so the kernel's uint8 range equals the grid's
        self.clip_lo = (0 - self.x_zp) * self.x_scale
        self.clip_hi = (self.a_qmax - self.x_zp) * self.x_scale
        self.needs_clip = act.bits < 8
        b = None if bias is None else bias.detach().float().cpu()
        if self.backend == "fbgemm":
            self._packed = _prepack_fbgemm(codes, scale, b)
        else:
            self.register_buffer("codes_t", codes.t().contiguous(), persistent=False)
            # x_q - zp = (x_q - 128) - (zp - 128): int8 input, zero point folded into a row term
            self.register_buffer(
                "zp_term", (self.x_zp - 128) * codes.to(torch.int32).sum(dim=1), persistent=False
            )
            self.register_buffer("out_scale", scale * self.x_scale, persistent=False)
            self.register_buffer("bias", b, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (on-grid) float weight, rebuilt on access.

        open_clip reads ``mlp.c_fc.weight.dtype`` to pick the text tower's compute dtype; the
        integer codes and scales are all this layer stores.
        """
        if self.backend == "fbgemm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qw, _ = torch.ops.quantized.linear_unpack(self._packed)
                return qw.dequantize()
        return self.codes_t.t().float() * (self.out_scale / self.x_scale)[:, None]

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear, backend: str | None = None) -> Int8Linear:
        return cls(
            _grid(layer.weight, layer.weight_quantizer),
            layer.weight_quantizer.scale,
            layer.bias,
            layer.input_quantizer,
            backend,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if self.needs_clip:
            x2 = x2.clamp(self.clip_lo, self.clip_hi)
        if self.backend == "fbgemm":
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                x2, self.x_scale, self.x_zp, self._packed
            )
        else:
            xq = torch.fake_quantize_per_tensor_affine(x2, self.x_scale, self.x_zp, 0, self.a_qmax)
            xq = (torch.round(xq / self.x_scale) + (self.x_zp - 128)).to(torch.int8)
            acc = _int_mm(xq, self.codes_t) - self.zp_term
            y = acc.float() * self.out_scale
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, backend={self.backend}"


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` with the small-batch padding some builds require (M > 16)."""
    m = a.shape[0]
    if m <= 16:
        a = torch.cat([a, a.new_zeros(17 - m, a.shape[1])])
    return torch._int_mm(a, b)[:m]


def _grid(weight: torch.Tensor, wq: WeightQuantizer) -> torch.Tensor:
    """The on-grid weight the fake-quant layer multiplies with (dynamic quantizers: now)."""
    return wq(weight.detach()) if wq.dynamic else weight.detach()


def int8_convertible(module: nn.Module, fqn: str = "") -> bool:
    """The filter :func:`convert_to_int8` applies to every module (torchao's ``filter_fn``):
    a quantized linear whose integer GEMM computes what its fake-quant forward does.

    That needs a calibrated per-tensor input quantizer of at most 8 bits and a quantized
    weight; attention's ``in_proj`` and ``out_proj`` are such leaves like any MLP layer.
    """
    if not isinstance(module, QuantLinear):
        return False
    act, wq = module.input_quantizer, module.weight_quantizer
    return (
        wq.enabled
        and act.enabled
        and not act.per_channel
        and act.bits <= 8
        and bool(act.calibrated)
        and (wq.dynamic or bool(wq.calibrated))
    )


def _replace_leaves(
    parent: nn.Module,
    filter_fn: Callable[[nn.Module, str], bool],
    replace: Callable[[nn.Module], nn.Module],
    prefix: str = "",
) -> int:
    """Replace, in place, every descendant of ``parent`` that ``filter_fn(module, fqn)`` picks
    (without looking inside it); return how many were replaced."""
    count = 0
    for name, child in list(parent.named_children()):
        fqn = f"{prefix}{name}"
        if filter_fn(child, fqn):
            setattr(parent, name, replace(child))
            count += 1
        else:
            count += _replace_leaves(child, filter_fn, replace, f"{fqn}.")
    return count


def convert_to_int8(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Swap every quantized linear that :func:`int8_convertible` accepts for an
    :class:`Int8Linear`, attention projections included; the attention keeps its own forward.

    In place; returns ``model`` (in eval mode). Layers that cannot run in integers (float or
    per-channel activations) keep their fake-quant float computation.
    """
    backend = backend or int8_backend()
    _check_backend(backend)
    if isinstance(model, QuantLinear):
        raise TypeError(
            "convert_to_int8 converts the children of a model; wrap a bare QuantLinear first"
        )
    model.eval()
    converted = _replace_leaves(
        model, int8_convertible, lambda m: Int8Linear.from_quant_linear(m, backend)
    )
    log.info("int8 inference: converted %d layers (backend %s)", converted, backend)
    per_channel = _per_channel_input_layers(model)
    if per_channel:
        log.warning(
            "int8 inference: %d quantized layer(s) (e.g. %s) have per-channel input ranges, "
            "which an integer GEMM cannot take (it needs one input scale); they keep their "
            "fake-quant float computation. Quantize with a_per_channel: false (e.g. preset "
            "p4q-448 instead of p4q-official) for int8 kernels on those layers",
            len(per_channel),
            per_channel[0],
        )
    return model


def _per_channel_input_layers(model: nn.Module) -> list[str]:
    """Names of the quantized linears left unconverted for per-channel inputs."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            act = module.input_quantizer
            if act.enabled and act.per_channel and module.weight_quantizer.enabled:
                names.append(name)
    return names
