"""Only what the cached-feature training step reads stays in memory during a fit.

Once the image features are cached, a training step reads the student's text tower (through
the prompt), the prompt, the adapter, the cached features and the cached text targets. The float
teacher, both image towers and the student's token table (the prompt learner keeps the
embeddings of its fixed tokens) are not read again until evaluation or export, yet they are
most of the process's memory (ViT-B/32: about 1 GB of the two 600 MB models). The
:class:`FrozenOffload` writes those frozen weights to a file once, leaves each parameter an
empty tensor of its dtype and device, and reads them back, unchanged, whenever something needs
them (validation inside the fit, the end of the fit, an error). Parameter objects stay the same,
so nothing that holds a reference to one notices.

The kept modules' frozen quantized weights (the student's text tower) are held as int8 codes
and per-channel scales over the same window (:meth:`QuantLinear.hold_as_codes
<p4q_lightning.quant.modules.QuantLinear.hold_as_codes>`): a quarter of their float bytes, and
bitwise the same step. A layer whose codes would not reproduce its weight exactly stays float.

Only parameters are moved: quantizer buffers (scales, ranges) are small and checkpoints keep
them. The file is private to the process and deleted when the fit ends. Lightning calls no
module hook when a fit fails, so then the weights come back at the module's next ``setup``
(any later fit, validate, test or predict).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from p4q_lightning.quant.modules import QuantLinear

log = logging.getLogger(__name__)

#: smaller parameters (LayerNorms, biases, the logit scale) stay: moving them saves nothing
MIN_NUMEL = 4096


class FrozenOffload:
    """The frozen parameters of ``release`` that ``keep`` does not share, moved out of memory
    between :meth:`release` and :meth:`restore`, and the quantized linear layers of ``keep``
    held as codes over the same window (see the module docstring)."""

    def __init__(
        self,
        release: Iterable[nn.Module],
        keep: Iterable[nn.Module | nn.Parameter],
        as_codes: bool = True,
    ) -> None:
        keep = list(keep)
        params = (p for m in keep for p in (m.parameters() if isinstance(m, nn.Module) else [m]))
        self._kept = list({id(p): p for p in params}.values())
        kept = {id(p) for p in self._kept}
        modules = [m for m in keep if isinstance(m, nn.Module)]
        #: the kept layers that may be held as codes (``as_codes``), each once
        self.layers = (
            list(
                {
                    id(q): q for m in modules for q in m.modules() if isinstance(q, QuantLinear)
                }.values()
            )
            if as_codes
            else []
        )
        seen: set[int] = set()
        self.params: dict[str, nn.Parameter] = {}
        for i, module in enumerate(release):
            for name, p in module.named_parameters():
                if id(p) in kept or id(p) in seen or p.numel() < MIN_NUMEL or p.requires_grad:
                    continue
                seen.add(id(p))
                self.params[f"{i}.{name}"] = p
        #: bytes the moved parameters occupy when resident
        self.nbytes = sum(p.numel() * p.element_size() for p in self.params.values())
        self._dir: Path | None = None
        self.released = False

    def release(self) -> None:
        """Write the parameters once (they are frozen) and drop them from memory."""
        if self.released:
            return
        if self._dir is None and self.params:
            self._dir = Path(tempfile.mkdtemp(prefix="p4q-frozen-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
            state = {k: p.detach().cpu() for k, p in self.params.items()}
            torch.save(state, self._dir / "frozen.pt")
            del state
        for p in self.params.values():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        held = [q for q in self.layers if q.hold_as_codes()]
        self.released = True
        log.debug("released %.1f MB of frozen weights during the fit", self.nbytes / 2**20)
        if len(held) < len(self.layers):
            log.debug(
                "%d of %d kept layers stay float", len(self.layers) - len(held), len(self.layers)
            )

    def held_nbytes(self) -> int:
        """Bytes of the codes and scales the kept layers are held as now (0 when restored)."""
        return sum(q.held.nbytes for q in self.layers if q.held is not None)

    def kept_nbytes(self) -> int:
        """Bytes the kept modules' parameters occupy now, held codes and scales included."""
        return sum(p.numel() * p.element_size() for p in self._kept) + self.held_nbytes()

    def restore(self) -> None:
        """Read the parameters back (bitwise the ones released)."""
        if not self.released:
            return
        for q in self.layers:
            q.restore_float()
        if self._dir is not None:
            state = torch.load(self._dir / "frozen.pt", map_location="cpu", weights_only=True)
            for k, p in self.params.items():
                p.data = state.pop(k).to(p.device)
        self.released = False

    def close(self) -> None:
        """Restore the parameters and delete the file."""
        self.restore()
        if self._dir is not None:
            self._cleanup()
            self._dir = None
