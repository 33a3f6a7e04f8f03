"""images/s of `mocoserve embed` from tar shards against the model-alone bound (and the folder).

One run: a folder of photo-sized JPEGs (embed_throughput's), written as shards by
`write_shards`, one model (a fresh MoCo v2 ResNet package):
  bound   the exported model alone (ONNX Runtime) on pre-decoded, pre-cropped tensors;
  shards  `embed_folders` on the shards folder (shards.json) into a new index, in a fresh
          interpreter: list by index, decoders read each member at its offset, embed, SQLite,
          FAISS;
  folder  the same images from the folder, the same way.
Usage: python benchmarks/embed_shards.py [--images 300] [--shard-size 100] [--arch resnet18]
       [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.embed_throughput import bound, embed_in_fresh_process, make_jpegs
from benchmarks.export_throughput import make_package
from mocoserve.core.decode import default_workers
from mocoserve.core.shardwriter import write_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_jpegs(tmp / "images", args.images)
        files = sorted(root.rglob("*.jpg"))
        shards = write_shards(root, tmp / "shards", args.shard_size, labels_from_folders=True)
        _, pkg = make_package(args.arch, tmp)
        r: dict = {
            "images": len(files),
            "shards": len(shards.shards),
            "arch": args.arch,
            "workers": args.workers,
            "cpu_count": os.cpu_count(),
        }
        r["bound_img_s"] = bound(pkg, files, args.batch)
        r["shards_img_s"] = embed_in_fresh_process(shards.out, pkg, tmp / "shards.faiss", args)
        r["folder_img_s"] = embed_in_fresh_process(root, pkg, tmp / "folder.faiss", args)
        r["shards_vs_bound"] = r["shards_img_s"] / r["bound_img_s"]
        r["folder_vs_bound"] = r["folder_img_s"] / r["bound_img_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
