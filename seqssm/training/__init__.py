"""Training: next-base language-model pretraining (data, loop, checkpoints) and the k-mer Markov baseline.

    data    FASTA in memory, the held-out split, training/validation windows, scored-target masks
    lm      TrainConfig, the warm-up + cosine schedule, Trainer (AdamW, accumulation, bf16 on CUDA,
            atomic checkpoints, exact resume), evaluate(), metrics.jsonl and curves.png
    markov  order-k Markov baseline (k = 0..10) on the same held-out positions
    mlm     masked language modeling for Caduceus: masking, loss, held-out evaluation, RC augmentation,
            the Caduceus AdamW recipe

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
from seqssm.training.mlm import CaduceusOptimConfig, MaskingConfig, evaluate_mlm, mask_tokens, mlm_batch, mlm_loss

__all__ = [
    "SHARED_CONTEXT", "DataSplit", "Region", "Stretch", "WindowSampler", "load_split", "make_split",
    "parse_region", "target_masks", "validation_windows", "StopRule", "TrainConfig", "Trainer", "evaluate",
    "latest_checkpoint", "load_checkpoint", "lr_at", "save_checkpoint", "kmer_count_tables", "markov_baseline",
    "CaduceusOptimConfig", "MaskingConfig", "evaluate_mlm", "mask_tokens", "mlm_batch", "mlm_loss",
]
