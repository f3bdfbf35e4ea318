"""Train from a source checkout: `python train.py [overrides]` (see lightning_attn_parallel/train.py)."""
from lightning_attn_parallel.train import main

if __name__ == "__main__":
    main()
