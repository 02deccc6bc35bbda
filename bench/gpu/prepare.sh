#!/usr/bin/env bash
# Stage, here, what bench/gpu/run.sh needs on the GPU machine, in two halves under .cache/gpu/
# (ignored by git): one device-tool call carries at most 64 MiB, SmolLM2's GGUF alone is 94 MiB.
#
#   bench/gpu/prepare.sh            # after `make test` or `make run` has built .venv
#
# .cache/gpu/a: the GGUF's first half; gguf and bitsandbytes (CUDA 13 libraries only) as a
#               PYTHONPATH folder, since the GPU image has neither.
# .cache/gpu/b: the second half and its checksum; Beauty prepared; a CE SASRec table trained here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
G=.cache/gpu
rm -rf "$G"
mkdir -p "$G/a/site" "$G/b"

gguf=$($PY -c "import importlib.util as u, pathlib, e4srec.backbones as b
print(pathlib.Path(u.find_spec(b.SMOLLM2_PACKAGE).origin).parent / b.SMOLLM2_FILE)")
split -n 2 -d "$gguf" "$G/smol.part."
mv "$G/smol.part.00" "$G/a/"
mv "$G/smol.part.01" "$G/b/"
md5sum "$gguf" | cut -d' ' -f1 > "$G/b/smol.md5"

site=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp -r "$site/gguf" "$site/bitsandbytes" "$G/a/site/"
find "$G/a/site" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$G"/a/site/bitsandbytes/libbitsandbytes_{cuda11,cuda12,rocm,xpu}*.so  # keep CUDA 13 (the image's) and CPU

.venv/bin/e4srec prepare-data --input data/Beauty.txt --output "$G/b/data" --no-tracking
.venv/bin/e4srec pretrain-sasrec --data "$G/b/data" --output "$G/sasrec" --loss ce --threads 2 \
    --no-tracking
mkdir -p "$G/b/sasrec"
cp "$G/sasrec/item_embeddings.safetensors" "$G/sasrec/metrics.json" "$G/sasrec/config.json" "$G/b/sasrec/"
du -sh "$G/a" "$G/b"
