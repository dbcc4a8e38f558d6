"""Pruning-aware fine-tuning (stage 1), compaction, then fine-tuning of the compact model (stage 2).

python train.py                                  # the CPU demo on DeiT-Tiny (conf/train.yaml)
python train.py +experiment=nvit_base            # the paper recipe (conf/experiment/)
python train.py -m pruner.eta=0,5e-4 pruner.target=0.5,0.7   # a sweep, one run dir per job

The same as `nvit-train` after `pip install .`; the code lives in nvit_lightning/cli/train.py.
"""

from nvit_lightning.cli.train import main

if __name__ == "__main__":
    main()
