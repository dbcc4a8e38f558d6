"""One-/few-shot pruning of a checkpoint to a latency target, compaction, export and report.

python prune.py                                   # DeiT-Tiny to 0.7x CPU latency (conf/prune.yaml)
python prune.py pruner.criterion=magnitude recovery_steps=100
python prune.py mode=export checkpoint=outputs/train/<run>/checkpoints/last.ckpt
python prune.py pruner=ovit                       # oViT: one sparse model per sparsity level

The same as `nvit-prune` after `pip install .`; the code lives in nvit_lightning/cli/prune.py.
"""

from nvit_lightning.cli.prune import main

if __name__ == "__main__":
    main()
