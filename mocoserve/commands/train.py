"""`mocoserve train` and `mocoserve lincls` (the train package is imported inside the commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mocoserve.commands.options import (
    TRAIN_MODULES,
    ConfigOpt,
    DeviceOpt,
    OutOpt,
    QuietOpt,
    SeedOpt,
    WorkersOpt,
    batch_size_opt,
    guarded,
    needs,
)

app = typer.Typer()

# The defaults shown are the config's (mocoserve/train/config.py and the method registry,
# mocoserve/train/methods); None means "the config decides", so --config and --preset apply.
# They are written out because importing the train package here would load torch for --help.
DataArg = Annotated[
    str,
    typer.Argument(
        help="Image folder: flat (unlabelled) or class/image (labelled); or tar shards: "
        "'shards/shard-{000000..000127}.tar', a folder with a shards.json (mocoserve shards), "
        "or img2dataset's output (labels from --label-key). Shards are read by offset, so "
        "they must be local files (not pipe:).",
    ),
]
ValOpt = Annotated[
    str | None,
    typer.Option(
        "--val",
        help="Labelled folder (class/image) or labelled shards for the k-NN monitor: its "
        "accuracy every --knn-every epochs and at the end.",
    ),
]
LabelKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--label-key",
        help="Tar shards: the field of each sample's json holding its class (img2dataset's "
        "metadata), instead of the cls part.",
        show_default="the cls part",
    ),
]
ResumeOpt = Annotated[
    str | None,
    typer.Option(
        "--resume",
        help="'auto' (latest checkpoint in --out, if any) or a checkpoint path.",
        show_default="a new run",
    ),
]
LrOpt = Annotated[
    float | None,
    typer.Option(
        "--lr",
        help="Learning rate at optim.lr_batch images per step (256), scaled linearly with "
        "the global batch.",
        show_default="0.03; supcon 0.05; cifar 0.06",
    ),
]
EpochsOpt = Annotated[
    int | None, typer.Option("--epochs", help="Epochs to train for.", show_default="200")
]
BatchSizeOpt = batch_size_opt("256; cifar 512")
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Any config field: --set section.field=value (repeatable), e.g. --set "
        "optim.warmup_epochs=10 --set data.mean=[0.5,0.5,0.5]. See the YAML sections.",
    ),
]


def _fit(
    method: str | None,
    preset: str | None,
    config: Path | None,
    overrides: dict[str, Any],
    resume: str | None,
) -> None:
    from mocoserve.train import distributed
    from mocoserve.train.trainer import fit, prepare_config

    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg, ckpt = prepare_config(method, preset, str(config) if config else None, overrides, resume)
    try:
        result = fit(cfg, ckpt)
        main = distributed.is_main()
    finally:
        distributed.teardown()
    if main:
        if result.stopped == "max_steps":
            print(
                f"stopped after {result.step} steps (--max-steps); checkpoint: {result.checkpoint}"
            )
        elif result.stopped is None:
            print(
                f"done: {result.epoch} epochs, {result.step} steps; checkpoint: {result.checkpoint}"
            )
    if distributed.launched_by_torchrun():
        from mocoserve.core.processes import exit_worker

        exit_worker(0)


@app.command()
def train(
    data: DataArg,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="moco-v1 | moco-v2 | moco-v3 | supcon | supcon-queue | linear. moco-v3 takes "
            "the paper's ViT recipe (AdamW) for timm ViTs and nets without BatchNorm, its "
            "ResNet recipe (LARS) for BN nets.",
            show_default="moco-v2",
        ),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            "--arch",
            "-a",
            help="A torchvision ResNet (resnet18, resnet50, ...) or timm:<name> "
            "(timm:vit_small_patch16_224, timm:convnext_tiny, timm:resnet50d; random weights), "
            "sized by --set 'model.timm_kwargs={img_size: 32, patch_size: 4, depth: 2}'.",
            show_default="resnet50; cifar resnet18",
        ),
    ] = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    out: OutOpt = Path("runs/train"),
    queue_size: Annotated[
        int | None,
        typer.Option(
            "--queue-size",
            "-K",
            help="Negatives in the queue.",
            show_default="65536; supcon-queue 8192; cifar 4096",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset", help="'cifar': small-image recipe (32 px, 3x3 stem).", show_default="none"
        ),
    ] = None,
    bn_splits: Annotated[
        int | None,
        typer.Option(
            "--bn-splits", help="Split BatchNorm groups (one process).", show_default="1; cifar 8"
        ),
    ] = None,
    val: ValOpt = None,
    label_key: LabelKeyOpt = None,
    resume: ResumeOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    lr: LrOpt = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            "-T",
            help="Softmax temperature of the contrastive loss.",
            show_default="0.2; moco-v1 and supcon 0.07",
        ),
    ] = None,
    momentum: Annotated[
        float | None,
        typer.Option(
            "--moco-m", help="Momentum of the key encoder.", show_default="0.999; cifar 0.99"
        ),
    ] = None,
    dim: Annotated[
        int | None, typer.Option("--dim", help="Embedding dim of the head.", show_default="128")
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", help="Crop size in px.", show_default="224; cifar 32"),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option("--precision", help="CUDA: bf16 | fp16 | fp32.", show_default="bf16"),
    ] = None,
    compile_model: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile", help="torch.compile the encoders.", show_default="no-compile"
        ),
    ] = None,
    contrast_mode: Annotated[
        str | None,
        typer.Option("--contrast-mode", help="SupCon anchors: all | one.", show_default="all"),
    ] = None,
    pretrained: Annotated[
        Path | None, typer.Option("--pretrained", help="Linear probe: pretraining checkpoint.")
    ] = None,
    save_every: Annotated[
        int | None,
        typer.Option("--save-every", help="Keep a checkpoint every N epochs.", show_default="10"),
    ] = None,
    knn_every: Annotated[
        int | None,
        typer.Option(
            "--knn-every", help="k-NN monitor every N epochs (with --val).", show_default="10"
        ),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop, with a checkpoint, after N steps.")
    ] = None,
    gpu_augment: Annotated[
        bool | None,
        typer.Option(
            "--gpu-augment/--cpu-augment",
            help="Colour jitter, grayscale and blur batched on the device; workers only crop.",
            show_default="cpu-augment",
        ),
    ] = None,
    settings: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain an image encoder (MoCo v1/v2, SupCon, SupCon with a queue) on an image folder or
    tar shards.

    Under `torchrun --nproc_per_node N -m mocoserve train ...` it trains with DDP.
    """

    def work() -> None:
        needs("train", *TRAIN_MODULES, command="train")
        from mocoserve.train.config import parse_set

        _fit(method, preset, config, {**options, **parse_set(settings or [])}, resume)

    options = {
        "data.root": str(data),
        "data.val": str(val) if val else None,
        "data.label_key": label_key,
        "data.workers": workers,
        "data.image_size": image_size,
        "data.gpu_augment": gpu_augment,
        "model.arch": arch,
        "model.bn_splits": bn_splits,
        "model.dim": dim,
        "method.queue_size": queue_size,
        "method.temperature": temperature,
        "method.momentum": momentum,
        "method.contrast_mode": contrast_mode,
        "method.pretrained": str(pretrained) if pretrained else None,
        "optim.epochs": epochs,
        "optim.batch_size": batch_size,
        "optim.lr": lr,
        "run.out": str(out),
        "run.seed": seed,
        "run.device": device,
        "run.precision": precision,
        "run.compile": compile_model,
        "run.save_every": save_every,
        "run.knn_every": knn_every,
        "run.max_steps": max_steps,
        "run.progress": False if quiet else None,
    }
    guarded(work)


# lincls trains on labels and reports the probe's own accuracy: its folders and defaults
ProbeDataArg = Annotated[
    str,
    typer.Argument(
        help="Labelled image folder (class/image) or labelled tar shards to train the "
        "classifier on."
    ),
]
ProbeValOpt = Annotated[
    str | None,
    typer.Option(
        "--val",
        help="Labelled folder (class/image) or labelled shards: the probe's top-1/top-5 every "
        "10 epochs and at the end.",
    ),
]
ProbeEpochsOpt = Annotated[
    int | None, typer.Option("--epochs", help="Epochs to train for.", show_default="100")
]
ProbeLrOpt = Annotated[
    float | None,
    typer.Option(
        "--lr",
        help="Learning rate at optim.lr_batch images per step (256), scaled linearly with "
        "the global batch.",
        show_default="30",
    ),
]


@app.command()
def lincls(
    data: ProbeDataArg,
    pretrained: Annotated[
        Path, typer.Option("--pretrained", help="Pretraining checkpoint whose backbone to probe.")
    ],
    val: ProbeValOpt = None,
    label_key: LabelKeyOpt = None,
    epochs: ProbeEpochsOpt = None,
    batch_size: batch_size_opt("256") = None,
    out: OutOpt = Path("runs/lincls"),
    lr: ProbeLrOpt = None,
    resume: ResumeOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    settings: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Linear probe (MoCo protocol): train a linear classifier on a frozen pretrained backbone."""
    guarded(lambda: needs("train", *TRAIN_MODULES, command="lincls"))
    train(
        data,
        method="linear",
        pretrained=pretrained,
        val=val,
        label_key=label_key,
        epochs=epochs,
        batch_size=batch_size,
        out=out,
        lr=lr,
        resume=resume,
        seed=seed,
        device=device,
        workers=workers,
        config=config,
        settings=settings,
        quiet=quiet,
    )
