"""One training step of our `retinanet` against torchvision's `RetinaNet`, same backbone, same batch.

    .venv/bin/python bench/train_step.py                       # CPU: 2 images of 512×512, resnet50-FPN
    .venv/bin/python bench/train_step.py --device cuda --batch 8 --size 1000x600 --amp

Both models: ResNet-50 + FPN (P3–P7) without pretrained weights (trainable BatchNorm, all layers
trainable, as torchvision builds it for random init), 80 classes, the same anchors and transform
sizes, torchvision's `RetinaNet` with its default per-image loss loop and ours with its batched
loss. A step is forward + backward + SGD step. Repetitions are interleaved (A B, B A, ...) after
warm-up, so that drifting machine load hits both alike; medians are reported. With `--device
cuda` it also reports peak GPU memory per training step and steady-state inference images/s.
A third comparison times the loss computation alone (assignment + losses + backward) on the same
head outputs. Not a test: timings depend on the machine and on whatever else runs on it; when
another torch job shares the cores, two-thread runs spin against each other (`--threads 1` is
steadier there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from torchvision.models.detection import retinanet_resnet50_fpn  # noqa: E402

from detector import build_model  # noqa: E402

NUM_CLASSES = 80


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=2, help="images per step")
    p.add_argument("--size", default="512x512", help="image WIDTHxHEIGHT (the transform keeps it)")
    p.add_argument("--amp", action="store_true", help="autocast (bf16, or fp16 with --amp-dtype fp16)")
    p.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--reps", type=int, default=None, help="timed steps per model (default 5 on CPU, 20 on GPU)")
    p.add_argument("--infer-reps", type=int, default=None, help="timed inference batches per model (GPU default 20; CPU default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); 1 is steadier when other jobs share the cores")
    return p.parse_args()


def make_batch(num_images: int, width: int, height: int, device: torch.device, seed: int):
    """Random images in [0, 1] and 3 boxes each (the same for both models)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(num_images):
        images.append(torch.rand(3, height, width, generator=g).to(device))
        xy = torch.rand(3, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = (0.1 + 0.3 * torch.rand(3, 2, generator=g)) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], dim=1)
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(0, NUM_CLASSES, (3,), generator=g).to(device)})
    return images, targets


def build_pair(width: int, height: int, device: torch.device):
    min_size, max_size = min(width, height), max(width, height)
    torch.manual_seed(0)
    ours = build_model("retinanet", NUM_CLASSES, backbone="resnet50", img_size=min_size, max_size=max_size)
    torch.manual_seed(0)
    theirs = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=min_size, max_size=max_size,
        detections_per_img=100,
    )
    # Identical weights: the networks then do identical work (same sizes, same candidate counts).
    theirs.backbone.load_state_dict(ours.backbone.state_dict())
    return {"ours": ours.to(device), "torchvision": theirs.to(device)}


class Stepper:
    """Times training steps and inference batches of one model, synchronising the GPU around each."""

    def __init__(self, model, device, amp_dtype):
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9, weight_decay=1e-4)
        use_scaler = amp_dtype == torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, images, targets) -> tuple[float, float, int]:
        """Wall seconds and process CPU seconds of one step, and the peak GPU bytes it allocated (0 on CPU)."""
        self.model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        with self._autocast():
            losses = self.model(images, targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._sync()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        return elapsed, cpu, peak

    @torch.no_grad()
    def infer(self, images) -> float:
        self.model.eval()
        self._sync()
        start = time.perf_counter()
        with self._autocast():
            self.model(images)
        self._sync()
        return time.perf_counter() - start


def loss_steppers(steppers: dict[str, Stepper], images, targets) -> dict:
    """Timers of the loss computation alone: matcher + losses + backward, on the same head outputs."""
    from torchvision.ops import box_iou

    from detector.losses import assign_anchors, detection_losses

    ours, theirs = steppers["ours"].model, steppers["torchvision"].model
    device = steppers["ours"].device
    with torch.no_grad():
        ours.train()
        _, resized_targets, outputs, anchors, _ = ours._run_network(images, targets)
    outputs = {k: v.detach().float() for k, v in outputs.items()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_ours() -> float:
        leaves = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
        sync()
        start = time.perf_counter()
        assignment = assign_anchors(anchors, resized_targets, ours.matcher)
        losses = detection_losses(leaves, anchors, assignment, ours.box_coder, ours.loss_settings)
        sum(losses.values()).backward()
        sync()
        return time.perf_counter() - start

    def run_theirs() -> float:
        leaves = {"cls_logits": outputs["cls_logits"].clone().requires_grad_(True),
                  "bbox_regression": outputs["bbox_deltas"].clone().requires_grad_(True)}
        sync()
        start = time.perf_counter()
        matched = [theirs.proposal_matcher(box_iou(t["boxes"], anchors)) for t in resized_targets]
        losses = theirs.head.compute_loss(resized_targets, leaves, [anchors] * len(resized_targets), matched)
        sum(losses.values()).backward()
        sync()
        return time.perf_counter() - start

    return {"ours": run_ours, "torchvision": run_theirs}


def interleaved(steppers: dict[str, Stepper], run, warmup: int, reps: int) -> dict[str, list]:
    """Warm each model up, then alternate the order every repetition; return the results per model."""
    names = list(steppers)
    for name in names:
        for _ in range(warmup):
            run(steppers[name])
    results = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            results[name].append(run(steppers[name]))
    return results


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    width, height = (int(v) for v in args.size.lower().split("x"))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype] if args.amp else None
    reps = args.reps if args.reps is not None else (20 if device.type == "cuda" else 5)
    infer_reps = args.infer_reps if args.infer_reps is not None else (20 if device.type == "cuda" else 0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)

    images, targets = make_batch(args.batch, width, height, device, args.seed)
    steppers = {name: Stepper(m, device, amp_dtype) for name, m in build_pair(width, height, device).items()}
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"batch {args.batch} × {width}×{height}, amp {args.amp_dtype if args.amp else 'off'}, "
        f"torch {torch.__version__}, {reps} interleaved reps after {args.warmup} warm-up"
    )

    train = interleaved(steppers, lambda s: s.train_step(images, targets), args.warmup, reps)
    medians, cpu_medians = {}, {}
    for name, runs in train.items():
        times = [t for t, _, _ in runs]
        medians[name] = statistics.median(times)
        cpu_medians[name] = statistics.median(c for _, c, _ in runs)
        line = f"train step  {name:12s} median {medians[name]:.3f} s  (min {min(times):.3f}, max {max(times):.3f})  {args.batch / medians[name]:.2f} images/s"
        if device.type == "cuda":
            line += f"  peak memory {max(p for _, _, p in runs) / 2**30:.2f} GiB"
        else:
            # On a shared machine the process's CPU time is steadier than the wall clock.
            line += f"  process CPU time median {cpu_medians[name]:.3f} s"
        print(line)
    print(f"ratio ours / torchvision (train step, median wall time): {medians['ours'] / medians['torchvision']:.3f}")
    # Each repetition runs the two back to back, so their ratio sees nearly the same machine load.
    paired = statistics.median(a[0] / b[0] for a, b in zip(train["ours"], train["torchvision"]))
    print(f"ratio ours / torchvision (train step, median of per-repetition ratios): {paired:.3f}")
    if device.type == "cpu":
        print(f"ratio ours / torchvision (train step, median CPU time): {cpu_medians['ours'] / cpu_medians['torchvision']:.3f}")

    loss_times = interleaved(loss_steppers(steppers, images, targets), lambda f: f(), args.warmup, max(reps, 5))
    loss_medians = {name: statistics.median(times) for name, times in loss_times.items()}
    for name, m in loss_medians.items():
        print(f"loss only   {name:12s} median {m:.3f} s  (assignment + losses, forward and backward, same head outputs)")
    print(f"ratio ours / torchvision (loss only, median): {loss_medians['ours'] / loss_medians['torchvision']:.3f}")

    if infer_reps > 0:
        infer = interleaved(steppers, lambda s: s.infer(images), args.warmup, infer_reps)
        med = {name: statistics.median(times) for name, times in infer.items()}
        for name, m in med.items():
            print(f"inference   {name:12s} median {m:.3f} s per batch  {args.batch / m:.2f} images/s")
        print(f"ratio ours / torchvision (inference, median): {med['ours'] / med['torchvision']:.3f}")


if __name__ == "__main__":
    main()
