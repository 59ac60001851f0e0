"""P4Q training step: cached image features vs live images, and the slim checkpoint size.

    python benchmarks/bench_train_step.py [--model ViT-B-32-quickgelu] [--preset w8a8]
        [--classes 100] [--batch 32] [--steps 3] [--chunk 0] [--checkpointing]

Builds a P4QModule (random weights unless ``--pretrained``), calibrates it on random images,
then times full training steps (forward, backward, optimiser step) two ways in one run,
interleaved: *live* (student and teacher image towers run on the batch's images, as with
``features.views: 0``) and *cached* (the batch's pre-adapter student and teacher features come
from the feature cache, ``features.views > 0``). The text tower with the learned prompt runs
for every class in both. Prints the medians, the speedup, and the bytes a checkpoint holds
(state dict + optimiser state) against the float32 open_clip state dict.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import open_clip
import torch

from p4q_lightning.args import PromptArgs
from p4q_lightning.losses import cosine_logits, p4q_loss
from p4q_lightning.module import P4QModule
from p4q_lightning.training.optim import PromptAdapterOptimizer, param_groups


def step(module: P4QModule, optimizer: torch.optim.Optimizer, batch) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    student, teacher, labels = module._batch_features(batch)
    model = module.classifier
    logits = cosine_logits(model.adapt(student), model.student_text_features(), model.logit_scale)
    t_logits = cosine_logits(teacher, model.teacher_text_features(), model.logit_scale)
    loss = p4q_loss(logits, labels, t_logits)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def nbytes(obj: object) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="ViT-B-32-quickgelu")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--preset", default="w8a8")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunk", type=int, default=0, help="prompt.chunk_size (0: all at once)")
    p.add_argument("--checkpointing", action="store_true", help="prompt.checkpointing")
    args = p.parse_args()

    names = list(open_clip.IMAGENET_CLASSNAMES[: args.classes])
    module = P4QModule(
        args.model,
        args.pretrained,
        quant=args.preset,
        classnames=names,
        prompt=PromptArgs(chunk_size=args.chunk or None, checkpointing=args.checkpointing),
    )
    size = module.classifier.teacher.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, size, size, generator=gen) for _ in range(2)]
    module.classifier.calibrate(calib, progress=False)
    module.classifier.teacher_text_features()  # computed once per run, not per step
    # no Trainer: no schedule needed
    optimizer = PromptAdapterOptimizer(param_groups(module.classifier, module.optim_args))
    module.train()

    images = torch.randn(args.batch, 3, size, size, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
    cached = {
        "student": module.classifier.student_image_features(images),
        "teacher": module.classifier.teacher_image_features(images),
        "label": labels,
    }
    live_batch = (images, labels)
    step(module, optimizer, cached)  # warm-up
    live, fast = [], []
    for _ in range(args.steps):
        live.append(step(module, optimizer, live_batch))
        fast.append(step(module, optimizer, cached))
    t_live, t_fast = statistics.median(live), statistics.median(fast)

    ckpt = nbytes(module.state_dict()) + nbytes(optimizer.state_dict())
    full = nbytes(module.classifier.teacher.state_dict())
    print(
        f"| {args.model} {args.preset} | classes {args.classes} | batch {args.batch} "
        f"| threads {torch.get_num_threads()} |"
    )
    print("|---|---|---|---|")
    print(f"| live step (s) | {t_live:.3f} | cached step (s) | {t_fast:.3f} |")
    print(
        f"| speedup | {t_live / t_fast:.2f}x "
        f"| prompt seq len | {module.classifier.prompt_learner.seq_len} |"
    )
    print(
        f"| checkpoint (MB) | {ckpt / 2**20:.2f} | float32 state dict (MB) | {full / 2**20:.1f} |"
    )


if __name__ == "__main__":
    main()
