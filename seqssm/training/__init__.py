"""Training: next-base language-model pretraining (data, loop, checkpoints) and the k-mer Markov baseline.

    data    FASTA in memory, the held-out split, training/validation windows, scored-target masks
    lm      TrainConfig, the warm-up + cosine schedule, Trainer (AdamW, accumulation, bf16 on CUDA,
            atomic checkpoints, exact resume), evaluate(), metrics.jsonl and curves.png
    markov  order-k Markov baseline (k = 0..10) on the same held-out positions

The command-line job on top of these is seqssm.pipelines.pretrain (`seqssm pretrain`).
"""

from seqssm.training.data import (
    SHARED_CONTEXT,
    DataSplit,
    Region,
    Stretch,
    WindowSampler,
    load_split,
    make_split,
    parse_region,
    target_masks,
    validation_windows,
)
from seqssm.training.lm import (
    StopRule,
    TrainConfig,
    Trainer,
    evaluate,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
    save_checkpoint,
)
from seqssm.training.markov import kmer_count_tables, markov_baseline

__all__ = [
    "SHARED_CONTEXT", "DataSplit", "Region", "Stretch", "WindowSampler", "load_split", "make_split",
    "parse_region", "target_masks", "validation_windows", "StopRule", "TrainConfig", "Trainer", "evaluate",
    "latest_checkpoint", "load_checkpoint", "lr_at", "save_checkpoint", "kmer_count_tables", "markov_baseline",
]
