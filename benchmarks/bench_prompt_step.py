"""The prompt step at scale: a plain CoOp step against the P4Q w4a4 step as ``lightning fit``
runs it (feature cache on, shared-prefix text encoding), with the FLOP floor of the text pass.

    python benchmarks/bench_prompt_step.py [--model ViT-B-32] [--classes 100 [1000 ...]]
        [--batch 32] [--reps 5] [--n-ctx 16] [--memory-classes 100]

*Plain CoOp* is written out here as CoOp does it: float open_clip, frozen; the image tower on
the batch every step; every class prompt ``[SOS] ctx_1..ctx_16 <name> . [EOS]`` padded to the
full 77 tokens, one text pass over all classes forward and backward; SGD on the context.
*P4Q* is ``P4QModule(quant='w4a4', features=FeatureArgs(views=1))`` inside ``Trainer.fit`` on
random images (random-weight towers: the same compute as pretrained ones); a callback times
each training batch (forward, backward, optimiser step). Per class count the plain reps run
before and after the fit, and the medians (with min-max) of the steady-state steps are compared.

Memory is counted device-independently: the bytes autograd keeps for the backward pass of the
text pass (unique saved storages, frozen weights excluded; the image tower runs without grad in
both), measured on ``--memory-classes`` classes and scaled linearly to 1,000.
The floor is the text pass's matmul FLOPs (counted by ``torch.utils.flop_counter`` on the
shared-prefix path, forward and backward) over the measured float32 matmul rate. Last, the
text pass alone, forward and backward, through the frozen float tower and the w4a4 student
(same prompts; full and shared-prefix paths) gives the cost of fake quantization.
Prints markdown tables. CPU timings vary with machine load: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import open_clip
import torch
import torch.nn.functional as F
from bench_text_memory import saved_bytes
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from p4q_lightning.args import FeatureArgs, PromptArgs
from p4q_lightning.data.feature_serving import FeatureServing
from p4q_lightning.model.text_encoder import TextTower, encode_prompts
from p4q_lightning.module import P4QModule

MINMAX = {
    g: {"a_observer": "minmax"}
    for g in ("patch_embed", "attn_qkv", "attn_out", "attn_internals", "mlp_fc", "mlp_proj")
}  # calibration speed only; the step's compute does not depend on the observer


def classnames(n: int) -> list[str]:
    names = list(open_clip.IMAGENET_CLASSNAMES)
    return [names[i % len(names)] + ("" if i < len(names) else f" {i}") for i in range(n)]


class PlainCoOp:
    """CoOp's training step on a frozen float CLIP (unified context, class token at the end)."""

    def __init__(self, model: nn.Module, tokenizer, names: list[str], n_ctx: int) -> None:  # type: ignore[no-untyped-def]
        self.model = model.eval().requires_grad_(False)
        width = model.token_embedding.weight.shape[1]
        self.ctx = nn.Parameter(torch.empty(n_ctx, width).normal_(0, 0.02))
        tokens = tokenizer([" ".join(["X"] * n_ctx) + f" {name}." for name in names])
        with torch.no_grad():
            embedding = model.token_embedding(tokens)
        self.prefix, self.suffix = embedding[:, :1], embedding[:, 1 + n_ctx :]
        self.eot = tokens.argmax(dim=-1)
        self.optimizer = torch.optim.SGD([self.ctx], lr=2e-3, momentum=0.9)

    def text_features(self) -> torch.Tensor:
        m, n = self.model, self.prefix.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(n, -1, -1)
        x = torch.cat([self.prefix, ctx, self.suffix], dim=1) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        return x[torch.arange(n), self.eot] @ m.text_projection

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            image = F.normalize(self.model.encode_image(images), dim=-1)
        text = F.normalize(self.text_features(), dim=-1)
        loss = F.cross_entropy(self.model.logit_scale.exp() * image @ text.t(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


class RandomImages(FeatureServing, LightningDataModule):
    """Random images and labels with the attributes P4QModule reads from a datamodule, serving
    cached features as FewShotDataModule does."""

    def __init__(self, names: list[str], images: torch.Tensor, batch: int) -> None:
        super().__init__()
        self.classnames, self.templates = names, ["a photo of a {}."]
        self.num_classes = len(names)
        labels = torch.arange(images.shape[0]) % len(names)
        self.dataset = TensorDataset(images, labels)
        self.batch = batch

    def train_dataloader(self) -> DataLoader:
        return self.serve(
            DataLoader(self.dataset, batch_size=self.batch, shuffle=True, drop_last=True)
        )


def step_trainer(
    max_steps: int, callbacks: list[Callback], accelerator: str = "cpu", precision: str = "32-true"
) -> Trainer:
    """A quiet one-device Trainer that only trains (no logger, checkpoints, validation or
    progress bar): what every step benchmark times."""
    return Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


class StepTimer(Callback):
    """Wall time of each training batch: forward, backward and optimiser step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:  # type: ignore[no-untyped-def]
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:  # type: ignore[no-untyped-def]
        self.times.append(time.perf_counter() - self.start)


def weight_ptrs(*modules: nn.Module) -> set[int]:
    return {
        t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())
    }


def matmul_rate(reps: int = 20) -> float:
    """Measured float32 matmul FLOP/s (median) at a text-tower shape."""
    a, b = torch.randn(2048, 512), torch.randn(512, 2048)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048 * 512 * 2048 / statistics.median(times)


def quantized_vs_float(module: P4QModule, reps: int) -> dict[str, tuple[list[float], ...]]:
    """Text pass forward + backward through the frozen float teacher and the w4a4 student,
    the same prompts, on the full (77 -> longest prompt) and the shared-prefix path,
    interleaved."""
    pl = module.classifier.prompt_learner
    towers = {"float": module.classifier.teacher, "w4a4": module.classifier.student}
    fixed = {k: pl.embed_fixed(TextTower(m).token_embedding) for k, m in towers.items()}
    times: dict[str, tuple[list[float], ...]] = {}
    for path, shared in (("truncated, full path", 0), ("shared prefix", pl.shared_prefix_length)):
        times[path] = ([], [])
        for rep in range(reps + 1):
            for i, (kind, model) in enumerate(towers.items()):
                start = time.perf_counter()
                encode_prompts(
                    model, pl(fixed[kind]), pl.eot_index, shared_prefix=shared
                ).sum().backward()
                if rep:  # the first round warms up
                    times[path][i].append(time.perf_counter() - start)
    return times


def build_p4q(args, names: list[str], size: int) -> P4QModule:  # type: ignore[no-untyped-def]
    module = P4QModule(
        args.model,
        None,
        quant="w4a4",
        quant_overrides=MINMAX,
        prompt=PromptArgs(n_ctx=args.n_ctx),
        features=FeatureArgs(views=1),
        classnames=names,
        templates=["a photo of a {}."],
    )
    gen = torch.Generator().manual_seed(0)
    module.classifier.calibrate([torch.randn(8, 3, size, size, generator=gen)], progress=False)
    return module


def fit_steps(module: P4QModule, names: list[str], args, size: int) -> list[float]:  # type: ignore[no-untyped-def]
    images = torch.randn(2 * args.batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    timer = StepTimer()
    trainer = step_trainer(args.warmup + args.reps, [timer])
    trainer.fit(module, datamodule=RandomImages(names, images, args.batch))
    return timer.times[args.warmup :]


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--classes", type=int, nargs="+", default=[100])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--memory-classes", type=int, default=100)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (1: on a shared machine a second thread's waits dominate)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    print(f"| {args.model} | batch {args.batch} | threads {torch.get_num_threads()} |")
    print("\n| classes | plain CoOp step (s) | P4Q w4a4 step (s) | P4Q / plain |")
    print("|---:|---:|---:|---:|")
    size, p4q_median = 224, {}
    for n in args.classes:
        names = classnames(n)
        model, _, tokenizer = open_clip.create_model_and_transforms(args.model, pretrained=None)
        size = model.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        gen = torch.Generator().manual_seed(2)
        images = torch.randn(args.batch, 3, size, size, generator=gen)
        labels = torch.randint(0, n, (args.batch,), generator=gen)
        tokenizer = open_clip.get_tokenizer(args.model)
        plain = PlainCoOp(model, tokenizer, names, args.n_ctx)
        plain.step(images, labels)  # warm-up
        plain_times = [plain.step(images, labels) for _ in range(max(1, args.reps // 2))]
        module = build_p4q(args, names, size)
        p4q_times = fit_steps(module, names, args, size)
        plain_times += [plain.step(images, labels) for _ in range(args.reps - len(plain_times))]
        p4q_median[n] = statistics.median(p4q_times)
        ratio = p4q_median[n] / statistics.median(plain_times)
        print(f"| {n} | {summary(plain_times)} | {summary(p4q_times)} | {ratio:.3f}x |")
        del plain, model

    # memory: bytes kept for the backward of the text pass, scaled to 1,000 classes
    n = args.memory_classes
    names = classnames(n)
    model, _, _ = open_clip.create_model_and_transforms(args.model, pretrained=None)
    tokenizer = open_clip.get_tokenizer(args.model)
    plain = PlainCoOp(model, tokenizer, names, args.n_ctx)
    plain_kept = saved_bytes(plain.text_features, weight_ptrs(model))
    module = build_p4q(args, names, size)
    module.train()
    p4q_kept = saved_bytes(module.classifier.student_text_features, weight_ptrs(module))
    scale = 1000 / n
    mb = 2**20
    print("\n| kept for backward, 1,000 classes (MB) | plain CoOp | P4Q w4a4 | P4Q / plain |")
    print("|---|---:|---:|---:|")
    print(
        f"| measured on {n} classes, scaled x{scale:g} | {plain_kept * scale / mb:,.0f} "
        f"| {p4q_kept * scale / mb:,.0f} | {p4q_kept / plain_kept:.3f}x |"
    )

    # floor: counted matmul FLOPs of the P4Q text pass over the measured matmul rate
    n = args.classes[0]
    module = build_p4q(args, classnames(n), size)
    module.train()
    with FlopCounterMode(display=False) as counter:
        module.classifier.student_text_features().sum().backward()
    flops = counter.get_total_flops()
    rate = matmul_rate()
    text_times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        module.classifier.student_text_features().sum().backward()
        text_times.append(time.perf_counter() - start)
    floor = flops / rate
    pl = module.classifier.prompt_learner
    print(f"\n| P4Q text pass, {n} classes | value |")
    print("|---|---:|")
    print(
        f"| shared prefix / per-class positions | {pl.shared_prefix_length} / "
        f"{pl.seq_len - pl.shared_prefix_length} |"
    )
    print(f"| matmul GFLOP per step (fwd + bwd) | {flops / 1e9:.1f} |")
    print(f"| measured matmul rate (GFLOP/s) | {rate / 1e9:.1f} |")
    print(f"| floor (s) | {floor:.3f} |")
    print(f"| text pass fwd + bwd (s) | {summary(text_times)} |")
    reached = floor / statistics.median(text_times)
    quant_cost = quantized_vs_float(module, args.reps)
    print(f"| fraction of the floor reached, text pass | {reached:.2f} |")
    print(f"| fraction of the floor reached, P4Q step in fit | {floor / p4q_median[n]:.2f} |")
    print(f"\n| text pass fwd + bwd, {n} classes (s) | float | w4a4 | w4a4 / float |")
    print("|---|---:|---:|---:|")
    for path, (t_float, t_quant) in quant_cost.items():
        print(
            f"| {path} | {summary(t_float)} | {summary(t_quant)} "
            f"| {statistics.median(t_quant) / statistics.median(t_float):.2f}x |"
        )


if __name__ == "__main__":
    main()
