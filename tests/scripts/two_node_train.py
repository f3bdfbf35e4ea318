"""One "node" of a two-node launch on one machine: run twice, with NODE_RANK=0 and NODE_RANK=1.

Lightning's launcher starts the second local rank of each node; with 2 ranks per node the data
parallel group spans both nodes, so the gradient reducer takes its hierarchical path exactly as
it would on a cluster. Each global rank saves its parameters to OUT_DIR/rank{r}.pt.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from lightning_utils import FixedTokens, UserModule, loader, params_of, quiet_trainer  # noqa: E402

import lightning_attn_parallel as lap  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = UserModule()
    strategy = lap.AttnHybridStrategy(plan=lap.ParallelPlan(hierarchical="always", bucket_mb=0.005))
    trainer = quiet_trainer(strategy=strategy, devices=2, num_nodes=2, max_steps=3,
                            accumulate_grad_batches=2)
    rank = trainer.global_rank
    trainer.fit(module, loader(FixedTokens(), 2, replicas=4, rank=rank))
    buckets = trainer.strategy.gradient_reducer.buckets
    torch.save({"params": params_of(module), "hierarchical": sum(b.hierarchical for b in buckets),
                "node_rank": int(os.environ["NODE_RANK"])}, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
